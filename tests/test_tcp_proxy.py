"""tests/tcp_proxy.py: bytes pass both ways, a cut ends connections at once and refuses new
ones, a stall holds bytes until restored, and closing leaves no thread behind."""

from __future__ import annotations

import socket
import socketserver
import threading
import time

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from tests.databases import database_url
from tests.tcp_proxy import CuttableProxy

WAIT = 2.0  # the longest any socket read here may block


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo():
    """A real echo server on a free loopback port; yields its port."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def connect(proxy) -> socket.socket:
    return socket.create_connection(proxy.address, timeout=WAIT)


def round_trip(sock, payload=b"hello") -> bytes:
    """``payload`` sent and what comes back of its length; sent from a thread of its own, so
    a payload larger than the buffers on the way does not wait on the reads."""
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    sender.join(timeout=WAIT)
    return received


def ended(sock) -> bool:
    """Whether the connection is over: the next read sees its end or a reset, not a timeout."""
    try:
        sock.sendall(b"x")
        return sock.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def refused(proxy) -> bool:
    """Whether a new connection fails at once: accepted by the kernel, then reset (before or
    after connect() returns)."""
    try:
        sock = connect(proxy)
    except ConnectionError:
        return True
    with sock:
        return ended(sock)


def proxy_threads(proxy) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"tcp-proxy-{proxy.port}-")]


def test_bytes_pass_both_ways_on_several_connections(echo):
    with CuttableProxy("127.0.0.1", echo) as proxy:
        first, second = connect(proxy), connect(proxy)
        big = bytes(range(256)) * 4096  # 1 MiB: more than one read each way
        assert round_trip(first, big) == big
        assert round_trip(second) == b"hello"
        first.close(), second.close()


def test_a_cut_ends_open_connections_and_refuses_new_ones_until_restored(echo):
    with CuttableProxy("127.0.0.1", echo) as proxy:
        before = connect(proxy)
        assert round_trip(before) == b"hello"
        proxy.cut()
        started = time.monotonic()
        assert ended(before)
        assert refused(proxy)
        assert time.monotonic() - started < 1.0
        proxy.restore()
        assert round_trip(connect(proxy)) == b"hello"


def test_a_stall_holds_the_bytes_until_restored(echo):
    with CuttableProxy("127.0.0.1", echo) as proxy:
        sock = connect(proxy)
        assert round_trip(sock) == b"hello"
        proxy.stall()
        fresh = connect(proxy)  # still accepted: a server that hangs, not one that is down
        sock.sendall(b"held")
        fresh.sendall(b"held too")
        sock.settimeout(0.3)
        with pytest.raises(socket.timeout):
            sock.recv(65536)
        proxy.restore()
        sock.settimeout(WAIT)
        assert sock.recv(65536) == b"held"
        assert fresh.recv(65536) == b"held too"


def test_closing_ends_every_thread_and_connection(echo):
    proxy = CuttableProxy("127.0.0.1", echo)
    socks = [connect(proxy) for _ in range(3)]
    assert [round_trip(s) for s in socks] == [b"hello"] * 3
    proxy.stall()  # pumps waiting on a stall end too
    assert len(proxy_threads(proxy)) == 4  # the acceptor and one per connection
    proxy.close()
    assert proxy_threads(proxy) == []
    assert all(ended(s) for s in socks)
    with pytest.raises(OSError):
        socket.create_connection(proxy.address, timeout=WAIT)


def test_postgresql_through_the_proxy_fails_fast_when_cut_and_works_when_restored(
        postgres_url):
    server = conninfo_to_dict(postgres_url)
    with CuttableProxy(server.get("host", "127.0.0.1"), int(server.get("port", 5432))) as proxy:
        url = database_url(postgres_url, server.get("dbname", "postgres"), proxy.address)
        with psycopg.connect(url, connect_timeout=2) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            proxy.cut()
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(url, connect_timeout=2)
            assert time.monotonic() - started < 2.0
        proxy.restore()
        with psycopg.connect(url, connect_timeout=2) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
