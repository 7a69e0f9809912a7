"""A TCP forwarder on loopback that a test can cut or stall: a database (or any server) going
away or hanging under a live app, without stopping the real server."""

from __future__ import annotations

import select
import socket
import struct
import threading

POLL = 0.05  # seconds each thread sleeps at most before it looks at the state again


def _close_hard(sock: socket.socket):
    """Close with a reset (SO_LINGER 0), as a dead peer or a dropped link looks to the other
    side, instead of an orderly end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Link:
    """One client connection and its connection to the target."""

    def __init__(self, client: socket.socket, target: socket.socket):
        self.sockets = (client, target)
        self.dead = False
        self._lock = threading.Lock()

    def kill(self):
        """Wake the pumping thread out of any wait (it then closes both sockets)."""
        with self._lock:
            self.dead = True
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed or not connected
                    pass

    def close(self):
        with self._lock:
            self.dead = True
            for sock in self.sockets:
                _close_hard(sock)


class CuttableProxy:
    """Forwards every connection to 127.0.0.1:``port`` on to (``target_host``,
    ``target_port``), in background threads, until closed.

    ``cut()`` resets every open connection and refuses new ones (accepted and reset at once)
    until ``restore()``; ``stall()`` keeps accepting but forwards nothing, on new and open
    connections alike (the bytes wait in the kernel's buffers) until ``restore()``."""

    def __init__(self, target_host: str, target_port: int, *, connect_timeout: float = 2.0):
        self.target = (target_host, target_port)
        self.connect_timeout = connect_timeout
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(POLL)
        self.port = self._listener.getsockname()[1]
        self.address = ("127.0.0.1", self.port)
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()
        self._cut = False
        self._acceptor = self._start(self._accept, "accept")

    # -- what a test does ------------------------------------------------------------------

    def cut(self):
        """Reset every open connection; new ones are reset as soon as accepted."""
        with self._lock:
            self._cut = True
            links = list(self._links)
        for link in links:
            link.kill()

    def stall(self):
        """Forward nothing, either way, on any connection, until ``restore()``."""
        self._flowing.clear()

    def restore(self):
        """Forward again: new connections reach the target, stalled bytes move on."""
        with self._lock:
            self._cut = False
        self._flowing.set()

    def close(self):
        """Stop accepting, close every connection and wait for every thread (bounded)."""
        self._closed.set()
        self._flowing.set()
        self._acceptor.join(timeout=5)  # first: no link is added after this
        self._listener.close()
        with self._lock:
            links, threads = list(self._links), list(self._threads)
        for link in links:
            link.kill()
        for thread in threads:
            thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the threads -----------------------------------------------------------------------

    def _start(self, target, name, *args):
        thread = threading.Thread(target=target, args=args, daemon=True,
                                  name=f"tcp-proxy-{self.port}-{name}")
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
        return thread

    def _accept(self):
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if self._cut:
                _close_hard(client)
                continue
            try:
                target = socket.create_connection(self.target, timeout=self.connect_timeout)
            except OSError:  # the target is down: the client sees the same
                _close_hard(client)
                continue
            # Blocking from here: a kill() (shutdown) wakes a send the peer does not read.
            client.settimeout(None)
            target.settimeout(None)
            link = _Link(client, target)
            with self._lock:  # checked again with the add: a cut() meanwhile misses no link
                refused = self._cut
                if not refused:
                    self._links.add(link)
            if refused:
                link.close()
                continue
            self._start(self._pump, "pump", link)

    def _pump(self, link: _Link):
        """Copy bytes both ways until either side ends or the link is killed; an end on one
        side ends both (no half-open connections: neither psycopg nor the tests need them)."""
        client, target = link.sockets
        other = {client: target, target: client}
        try:
            while not link.dead and not self._closed.is_set():
                if not self._flowing.wait(POLL):
                    continue
                readable, _, _ = select.select([client, target], [], [], POLL)
                if link.dead or not self._flowing.is_set():
                    continue
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    other[sock].sendall(data)
        except (OSError, ValueError):  # reset, killed, or closed under select
            return
        finally:
            with self._lock:
                self._links.discard(link)
            link.close()
