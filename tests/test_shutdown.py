"""SIGTERM and SIGINT: stop accepting, let the requests in flight finish (streams included) for
up to ``server.shutdown_grace`` seconds, exit 0. Real ``python wsgi.py`` processes on loopback,
with the mock provider as the slow upstream."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tests.processes import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """\
providers:
  - {name: slow, type: mock, models: [slow], latency_ms: 1500}
  - {name: slower, type: mock, models: [slower], latency_ms: 5000}
  - {name: streamer, type: mock, models: [streamed], chunks: 8, chunk_delay_ms: 250}
"""
WAIT = 20.0  # the longest any wait here may take


class Proxy:
    """``python wsgi.py`` on a free loopback port with CONFIG; its output in a file."""

    def __init__(self, tmp_path: Path, **env):
        self.port = free_port()
        (tmp_path / "proxy.yaml").write_text(CONFIG)
        self.log_path = tmp_path / "proxy.log"
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "wsgi.py")], cwd=tmp_path, stdout=log,
            stderr=subprocess.STDOUT,
            env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOST": "127.0.0.1",
                 "PORT": str(self.port), "PROXY_CONFIG": str(tmp_path / "proxy.yaml"),
                 "THREADS": "8", "LOG_LEVEL": "WARNING", "DATABASE_ENABLED": "false", **env})
        log.close()
        wait_for(self.ready, f"the proxy to serve (log: {self.log_path})")

    def log(self) -> str:
        return self.log_path.read_text()

    def ready(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"the proxy exited with {self.process.returncode}: {self.log()}")
        try:
            return self.get("/health/ready")[0] == 200
        except OSError:
            return False

    def connect(self, timeout: float = 5.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def get(self, path: str) -> tuple[int, bytes]:
        conn = self.connect(timeout=2.0)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def in_flight(self) -> float:
        _, text = self.get("/metrics")
        line = next(line for line in text.decode().splitlines()
                    if line.startswith("llm_proxy_requests_in_flight "))
        return float(line.split()[1])

    def chat(self, model: str, stream: bool = False):
        """A chat request sent; the response object (its headers read)."""
        conn = self.connect(timeout=WAIT)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(
            {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}),
            headers={"Content-Type": "application/json"})
        return conn.getresponse()

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def proxy(tmp_path):
    started = []

    def start(**env) -> Proxy:
        started.append(Proxy(tmp_path, **env))
        return started[-1]

    yield start
    for p in started:
        p.stop()


def in_background(function):
    """Run ``function`` in a thread; the returned list gets its result or exception."""
    outcome = []

    def target():
        try:
            outcome.append(function())
        except Exception as e:  # reported by the test's assertion
            outcome.append(e)
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def first_event(response) -> bytes:
    data = b""
    while b"data: " not in data:
        chunk = response.read1(4096)
        assert chunk, "the stream ended before its first event"
        data += chunk
    return data


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_lets_requests_in_flight_finish_refuses_new_connections_and_exits_0(
        proxy, signum):
    server = proxy(SHUTDOWN_GRACE="10")
    stream = server.chat("streamed", stream=True)
    assert stream.status == 200
    streamed = first_event(stream)
    slow, outcome = in_background(lambda: (lambda r: (r.status, r.read()))(server.chat("slow")))
    wait_for(lambda: server.in_flight() == 2, "both requests in flight")

    signalled = time.monotonic()
    server.process.send_signal(signum)
    wait_for(lambda: "stopped accepting" in server.log(), "the proxy to stop accepting")
    assert refused(server.port), "a new connection after the signal must be refused"

    streamed += stream.read()  # the rest of the stream, to its end
    assert streamed.rstrip().endswith(b"data: [DONE]"), streamed
    slow.join(timeout=WAIT)
    status, body = outcome[0]
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]
    assert server.process.wait(timeout=WAIT) == 0, server.log()
    assert time.monotonic() - signalled < 10
    assert "Traceback" not in server.log()


def test_a_request_still_running_at_the_end_of_the_grace_is_cut_and_the_process_exits_0(
        proxy):
    server = proxy(SHUTDOWN_GRACE="0.5")
    slow, outcome = in_background(lambda: server.chat("slower").read())
    wait_for(lambda: server.in_flight() == 1, "the request in flight")
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=WAIT) == 0, server.log()
    took = time.monotonic() - signalled
    assert took < 2.5, f"latency is 5 s and the grace 0.5 s; it took {took:.2f} s"
    slow.join(timeout=WAIT)
    assert isinstance(outcome[0], (http.client.HTTPException, OSError))  # cut, not answered
    assert "still in flight after the 0.5 s grace" in server.log()


def test_the_supervisor_forwards_sigterm_and_its_workers_drain_before_it_exits_0(proxy):
    server = proxy(WORKERS="2", SHUTDOWN_GRACE="10")
    # Ready answers from one worker; the signal must find both serving.
    wait_for(lambda: server.log().count("listening on") == 2, "both workers to listen")
    stream = server.chat("streamed", stream=True)
    assert stream.status == 200
    streamed = first_event(stream)

    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    wait_for(lambda: server.log().count("stopped accepting") == 2, "both workers to stop "
             "accepting")
    assert refused(server.port), "a new connection after the signal must be refused"
    streamed += stream.read()
    assert streamed.rstrip().endswith(b"data: [DONE]"), streamed
    assert server.process.wait(timeout=WAIT) == 0, server.log()
    assert time.monotonic() - signalled < 10
    assert "Traceback" not in server.log()
