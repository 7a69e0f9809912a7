"""Hostile clients against the real server (issue 13): thousands of slow connections, request
smuggling, and keyless uploads. Raw sockets against a live waitress, or `python wsgi.py`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests

from app.runtime.server import FD_MARGIN, raise_fd_limit
from settings import build_settings
from tests.conftest import live_server, provider
from tests.processes import free_port, stop

ROOT = Path(__file__).resolve().parent.parent
KEY, OTHER = "sk-hostile-0123456789abcdef", "sk-unknown-0123456789abcdef"
ADMIN = "admin-key-xyz-123"
CHAT = json.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
MOCK = {"name": "mock", "type": "mock", "models": ["mock-model"]}
MB = 1024 * 1024


def sha(key):
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture
def keyed_app(make_app):
    """Keys required (one client key and the admin key), the mock provider, a 1 MB body limit."""
    def make(**server):
        return make_app([MOCK], admin_api_key=ADMIN,
                        auth={"api_keys_required": True,
                              "api_keys": [{"id": "k", "sha256": sha(KEY)}]},
                        server={"max_request_body_mb": 1, **server})
    return make


def port_of(url):
    return int(url.rsplit(":", 1)[1])


def read_until_closed(sock, seconds):
    """What the server sends until it closes the connection; (bytes, closed), within ``seconds``."""
    deadline = time.monotonic() + seconds
    data = b""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def read_response(sock, seconds=2.0):
    """One whole response (headers and Content-Length body) from a kept-alive connection."""
    deadline = time.monotonic() + seconds
    data = b""
    while time.monotonic() < deadline:
        if b"\r\n\r\n" in data:
            status, headers, body = responses(data)[0]
            if len(body) >= int(headers.get("content-length", 0)):
                return status, headers, body
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    raise AssertionError(f"no whole response within {seconds} s: {data!r}")


def exchange(url, data, seconds=2.0):
    """Send ``data`` on a new connection (the server may cut it short); then read as above."""
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=seconds) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(data)
        return read_until_closed(sock, seconds)


def responses(raw):
    """The HTTP responses in ``raw``: [(status, headers, body)], bodies by Content-Length."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", len(rest)))
        out.append((int(lines[0].split()[1]), headers, rest[:length]))
        raw = rest[length:]
    return out


def head(method, path, *lines, version="1.1"):
    return (f"{method} {path} HTTP/{version}\r\nHost: proxy\r\n"
            + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode()


def the_only_response(raw):
    answers = responses(raw)
    assert len(answers) == 1, raw
    return answers[0]


def openai_error(body):
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def temp_files():
    """Temporary files this process holds open, deleted ones included (waitress spills bodies
    to unnamed temp files, which psutil's open_files() leaves out)."""
    tmp = tempfile.gettempdir()
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
    return [path for path in paths if path.startswith(tmp)]


# -- defect 9: Content-Length with Transfer-Encoding ------------------------------------------

def smuggling_request(chat_path="/v1/chat/completions"):
    """CL.TE: Content-Length covers everything; read as chunked, a second request follows."""
    smuggled = head("POST", chat_path, f"Content-Length: {len(CHAT)}") + CHAT
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT), CHAT)
    return head("POST", chat_path, f"Content-Length: {len(chunked + smuggled)}",
                "Transfer-Encoding: chunked") + chunked + smuggled


def test_content_length_with_chunked_is_refused_with_400_and_the_smuggled_request_never_served(
        make_app, upstream):
    app = make_app([provider(upstream.url, models=["mock-model"])])
    with live_server(app) as url:
        raw, closed = exchange(url, smuggling_request())
        status, headers, body = the_only_response(raw)
        assert status == 400 and closed
        assert headers["content-type"] == "application/json"
        assert headers["connection"] == "close"
        error = openai_error(body)
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "ambiguous_message_length"
        assert upstream.calls == 0
        assert requests.get(url + "/health/live", timeout=2).status_code == 200


def test_transfer_encoding_on_http_1_0_is_refused_as_ambiguous(make_app, upstream):
    app = make_app([provider(upstream.url, models=["mock-model"])])
    with live_server(app) as url:
        smuggled = head("POST", "/v1/chat/completions", f"Content-Length: {len(CHAT)}") + CHAT
        data = (head("POST", "/v1/chat/completions", "Connection: keep-alive",
                     "Transfer-Encoding: chunked", version="1.0")
                + b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled))
        raw, closed = exchange(url, data)
        status, _, body = the_only_response(raw)
        assert status == 400 and closed
        assert openai_error(body)["code"] == "ambiguous_message_length"
        assert upstream.calls == 0


def test_a_chunked_request_without_content_length_is_still_served(keyed_app):
    with live_server(keyed_app()) as url:
        data = (head("POST", "/v1/chat/completions", f"Authorization: Bearer {KEY}",
                     "Transfer-Encoding: chunked", "Connection: close")
                + b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT), CHAT))
        status, _, body = the_only_response(exchange(url, data)[0])
        assert status == 200
        assert json.loads(body)["choices"][0]["message"]["content"]


# -- defect 10: what unauthenticated traffic can make the proxy hold ------------------------

@pytest.mark.parametrize("auth_lines,code", [
    ((), "missing_api_key"),
    ((f"Authorization: Bearer {OTHER}",), "invalid_api_key"),
    (("Expect: 100-continue",), "missing_api_key"),
])
def test_a_post_without_a_valid_key_gets_401_before_its_body_is_sent(keyed_app, auth_lines,
                                                                      code):
    with live_server(keyed_app()) as url:
        started = time.monotonic()
        # A 20 MB body announced, none sent: the answer must not wait for it.
        raw, closed = exchange(url, head("POST", "/v1/chat/completions",
                                         f"Content-Length: {20 * MB}", *auth_lines))
        assert time.monotonic() - started < 1.5
        status, headers, body = the_only_response(raw)  # no "100 Continue" before it
        assert status == 401 and closed
        assert headers["www-authenticate"] == "Bearer"
        error = openai_error(body)
        assert error["type"] == "authentication_error" and error["code"] == code


def test_a_debug_post_needs_the_admin_key_before_its_body_is_sent(keyed_app):
    with live_server(keyed_app()) as url:
        raw, closed = exchange(url, head("POST", "/debug/cache/clear", f"X-API-Key: {KEY}",
                                         f"Content-Length: {MB}"))
        status, _, body = the_only_response(raw)
        assert status == 401 and closed
        assert openai_error(body)["code"] == "invalid_admin_key"
        cleared = requests.post(url + "/debug/cache/clear", data=b"{}",
                                headers={"Authorization": f"Bearer {ADMIN}"}, timeout=2)
        assert cleared.status_code == 200


def test_a_post_with_a_valid_key_is_served(keyed_app):
    with live_server(keyed_app()) as url:
        answer = requests.post(url + "/v1/chat/completions", data=CHAT,
                               headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["message"]["content"]


def test_a_content_length_over_the_body_limit_gets_413_before_the_body_is_sent(keyed_app):
    with live_server(keyed_app()) as url:
        started = time.monotonic()
        raw, closed = exchange(url, head("POST", "/v1/chat/completions", f"X-API-Key: {KEY}",
                                         f"Content-Length: {MB + MB // 2}"))
        assert time.monotonic() - started < 1.5
        status, _, body = the_only_response(raw)
        assert status == 413 and closed
        assert openai_error(body)["code"] == "payload_too_large"


def test_a_chunked_body_past_the_limit_is_cut_off_with_a_json_413(keyed_app):
    with live_server(keyed_app()) as url:
        piece = b"x" * (256 * 1024)
        data = (head("POST", "/v1/chat/completions", f"X-API-Key: {KEY}",
                     "Transfer-Encoding: chunked")
                + b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(10)))
        raw, closed = exchange(url, data)
        status, _, body = the_only_response(raw)
        assert status == 413 and closed
        assert openai_error(body)["code"] == "payload_too_large"


def test_headers_over_max_header_kb_get_a_json_431(keyed_app):
    with live_server(keyed_app(max_header_kb=4)) as url:
        raw, closed = exchange(url, head("GET", "/health/live", "X-Padding: " + "p" * 5000))
        status, _, body = the_only_response(raw)
        assert status == 431 and closed
        assert openai_error(body)["code"] == "headers_too_large"
        assert requests.get(url + "/health/live", headers={"X-Small": "s" * 3000},
                            timeout=2).status_code == 200


def test_thirty_keyless_uploads_park_no_temp_files_and_are_answered_at_once(keyed_app):
    """Each sends its headers (20 MB announced) and 1 MB of body before it reads: waitress used
    to buffer past 512 KB to a temp file each, and wait for the rest."""
    with live_server(keyed_app()) as url:
        before = len(temp_files())
        started = time.monotonic()
        clients = []
        try:
            for _ in range(30):
                sock = socket.create_connection(("127.0.0.1", port_of(url)), timeout=2)
                clients.append(sock)
                with contextlib.suppress(ConnectionResetError, BrokenPipeError, socket.timeout):
                    sock.sendall(head("POST", "/v1/chat/completions",
                                      f"Content-Length: {20 * MB}") + b"x" * MB)
            held, deadline = 0, time.monotonic() + 1.0  # what the server spills, as it reads
            while time.monotonic() < deadline:
                held = max(held, len(temp_files()) - before)
                time.sleep(0.05)
            deadline = time.monotonic() + 2.0
            answers = [read_until_closed(sock, max(0.05, deadline - time.monotonic()))
                       for sock in clients]
        finally:
            for sock in clients:
                sock.close()
        elapsed = time.monotonic() - started
        assert held == 0
        assert all(closed for _, closed in answers)
        assert [the_only_response(raw)[0] for raw, _ in answers] == [401] * 30
        assert elapsed < 6
        assert requests.get(url + "/health/live", timeout=2).status_code == 200


def test_an_http_client_uploading_without_a_key_still_reads_its_401(keyed_app):
    """requests (urllib3) sends the whole body first; the server closes without reading it,
    and the client still gets the answer, not a connection error."""
    with live_server(keyed_app()) as url:
        answer = requests.post(url + "/v1/chat/completions", data=b"x" * (4 * MB), timeout=5)
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "missing_api_key"


def test_refusals_before_the_app_are_logged_and_counted_in_metrics(keyed_app, caplog):
    caplog.set_level(logging.WARNING, logger="llm_proxy.server")
    with live_server(keyed_app()) as url:
        exchange(url, head("POST", "/v1/chat/completions", "Content-Length: 10"))
        exchange(url, head("POST", "/v1/embeddings", f"X-API-Key: {OTHER}", "Content-Length: 10"))
        exchange(url, smuggling_request())
        text = requests.get(url + "/metrics", timeout=2).text
    counts = {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("llm_proxy_rejected_requests_total{")}
    assert counts["no_key"] == 1 and counts["bad_key"] == 1 and counts["smuggling"] == 1
    assert counts["header_timeout"] == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "llm_proxy.server"]
    assert len(lines) == 3
    assert "POST '/v1/embeddings' from 127.0.0.1 with 401" in lines[1] and "bad_key" in lines[1]


# -- the header timeout (slowloris) ---------------------------------------------------------

def closed_within(sock, seconds, drip=None):
    """Seconds until the server closed ``sock`` (None if it did not within ``seconds``),
    sending ``drip`` every 0.1 s meanwhile."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            if drip:
                sock.sendall(drip)
            sock.settimeout(0.1)
            if sock.recv(1024) == b"":
                return time.monotonic() - started
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
    return None


def test_a_client_dripping_its_headers_is_disconnected_after_header_timeout(keyed_app):
    with live_server(keyed_app(header_timeout=0.4)) as url:
        with socket.create_connection(("127.0.0.1", port_of(url)), timeout=1) as sock:
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: proxy\r\nX-Drip: ")
            after = closed_within(sock, 2.0, drip=b"a")  # a byte every 0.1 s: never idle
        assert after is not None and 0.3 < after < 1.0
        assert requests.get(url + "/health/live", timeout=2).status_code == 200


def test_a_connection_that_sends_nothing_is_closed_after_header_timeout(keyed_app):
    with live_server(keyed_app(header_timeout=0.4)) as url:
        with socket.create_connection(("127.0.0.1", port_of(url)), timeout=1) as sock:
            after = closed_within(sock, 2.0, drip=None)
        assert after is not None and after < 1.0


def test_an_idle_keep_alive_connection_outlives_the_header_timeout(keyed_app):
    with live_server(keyed_app(header_timeout=0.3)) as url:
        with socket.create_connection(("127.0.0.1", port_of(url)), timeout=1) as sock:
            sock.sendall(head("GET", "/health/live"))
            assert read_response(sock)[0] == 200
            time.sleep(0.7)  # idle, not in the middle of headers: channel_timeout governs
            sock.sendall(head("GET", "/health/live"))
            assert read_response(sock)[0] == 200


def test_a_slow_body_from_a_keyed_client_is_not_cut_by_the_header_timeout(keyed_app):
    with live_server(keyed_app(header_timeout=0.3)) as url:
        with socket.create_connection(("127.0.0.1", port_of(url)), timeout=2) as sock:
            sock.sendall(head("POST", "/v1/chat/completions", f"X-API-Key: {KEY}",
                              f"Content-Length: {len(CHAT)}", "Connection: close"))
            for i in range(0, len(CHAT), len(CHAT) // 4 + 1):  # over about 0.6 s
                time.sleep(0.15)
                sock.sendall(CHAT[i:i + len(CHAT) // 4 + 1])
            raw, _ = read_until_closed(sock, 2.0)
        assert the_only_response(raw)[0] == 200


# -- defect 1: thousands of connections -----------------------------------------------------

def test_the_open_file_limit_is_raised_to_what_connections_and_pools_need():
    settings = build_settings({
        "providers": [provider("http://a"), provider("http://b", name="b"), MOCK],
        "server": {"connection_limit": 2000, "threads": 256},
        "http_client": {"max_keepalive_connections": 200}})
    set_to = []
    limit = raise_fd_limit(settings, getrlimit=lambda which: (1024, 20000),
                           setrlimit=lambda which, value: set_to.append(value))
    assert set_to == [(2000 + 2 * 256 + 256 + FD_MARGIN, 20000)]
    assert limit == 2000


def test_a_hard_open_file_limit_too_low_is_a_warning_and_caps_the_connections(caplog):
    settings = build_settings({"providers": [provider("http://a")],
                               "server": {"connection_limit": 2000, "threads": 100},
                               "http_client": {"max_keepalive_connections": 100}})
    set_to = []
    with caplog.at_level(logging.WARNING, logger="llm_proxy.server"):
        limit = raise_fd_limit(settings, getrlimit=lambda which: (1024, 1500),
                               setrlimit=lambda which, value: set_to.append(value))
    assert set_to == [(1500, 1500)]
    assert limit == 1500 - (100 + 100 + FD_MARGIN)
    assert "below the 2264" in caplog.text and f"at most {limit} connections" in caplog.text


@contextlib.contextmanager
def open_file_limit(wanted):
    """This process may open ``wanted`` files (or as many as the hard limit allows)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, raised), hard))
    try:
        yield max(soft, raised)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def typical_open_file_limit():
    """In the proxy's process before exec: the usual soft limit of 1024, so it must raise it."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))


def live(url, seconds):
    """GET /health/live until it answers 200, for at most ``seconds``; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            if requests.get(url + "/health/live", timeout=1).status_code == 200:
                return time.monotonic() - started
        except requests.RequestException:
            time.sleep(0.1)
    return None


def slowloris(port, count, into):
    """Open ``count`` connections that each send part of a request's headers."""
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nX-Drip: ")
        sock.setblocking(False)
        into.append(sock)


def drip(socks):
    """One more header byte on each connection; how many the server has closed."""
    closed = 0
    for sock in socks:
        try:
            if sock.recv(1) == b"":
                closed += 1
                continue
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
            continue
        try:
            sock.send(b"a")
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return closed


def test_3000_slowloris_connections_leave_the_proxy_alive_and_serving_once_they_time_out(
        tmp_path):
    """`python wsgi.py` started with the usual soft limit of 1024 open files. 2,400 slow
    clients (past select()'s 1,024) leave /health/live answering; 600 more put it over its
    connection limit of 2,500; the header timeout (6 s here, however busy they are) frees
    the slots, and normal requests are served again."""
    with open_file_limit(8192) as allowed:
        if allowed < 3300:
            pytest.skip(f"this process may open only {allowed} files")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = tmp_path / "proxy.log"
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "PORT": str(port),
               "CONNECTION_LIMIT": "2500", "HEADER_TIMEOUT": "6", "ACCESS_LOG_ENABLED": "false",
               "DATABASE_ENABLED": "false"}
        socks = []
        with open(log_path, "w") as log:
            proxy = subprocess.Popen([sys.executable, str(ROOT / "wsgi.py")], cwd=tmp_path,
                                     env=env, stdout=log, stderr=subprocess.STDOUT,
                                     preexec_fn=typical_open_file_limit)
        try:
            assert live(url, 20) is not None, log_path.read_text()[-2000:]
            started = time.monotonic()
            slowloris(port, 2400, socks)
            deadline = time.monotonic() + 10
            while psutil.Process(proxy.pid).num_fds() < 2400 and time.monotonic() < deadline:
                time.sleep(0.05)
            held = psutil.Process(proxy.pid).num_fds()
            assert held > 2400, log_path.read_text()[-2000:]
            assert live(url, 2) is not None  # past fd 1024, and answering
            slowloris(port, 600, socks)  # over the connection limit: the rest wait in backlog
            assert proxy.poll() is None
            deadline = time.monotonic() + 20
            while drip(socks) < 2400 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert live(url, 10) is not None, log_path.read_text()[-2000:]
            answer = requests.post(url + "/v1/chat/completions", data=CHAT, timeout=5)
            assert answer.status_code == 200
            elapsed = time.monotonic() - started
            metrics = requests.get(url + "/metrics", timeout=5).text
            timed_out = next(float(line.split()[-1]) for line in metrics.splitlines()
                             if line.startswith('llm_proxy_rejected_requests_total{reason='
                                                '"header_timeout"}'))
            assert timed_out >= 2400
            assert elapsed < 25
            assert proxy.poll() is None
            assert "filedescriptor out of range" not in log_path.read_text()
        finally:
            for sock in socks:
                sock.close()
            stop(proxy)
