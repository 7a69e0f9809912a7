"""What hostile upstreams cost the proxy: RSS, CPU seconds and time per case, measured.

``python -m bench.hostile`` starts a hostile OpenAI-compatible upstream (in this process, on a
free loopback port) and the real proxy (``python wsgi.py``, the production profile with a key)
in front of it, then sends one request per case and samples the proxy's RSS every 10 ms and its
CPU time around the request:

- ``bomb``: a 300 KB gzip body that inflates to 300 MB;
- ``giant``: a 300 MB plain body;
- ``boundless``: a stream of 100 MB with no event boundary;
- ``drip``: a whole answer dripping one byte every 0.5 s (the deadline must stop it);
- ``endless``: a stream of events that never ends (``STREAM_MAX_DURATION`` must stop it).

Then ``--connections`` idle client connections (partial request headers, as slowloris sends
them) are held open while ``/health/live`` is asked to answer. Results: stdout,
``bench/results/hostile.md`` and ``.json``. Everything on 127.0.0.1, every loop bounded.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import resource
import socket
import tempfile
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil

from bench import machine, services

KEY = "bench-hostile-key-0123456789"
MB = 1024 * 1024


def _bomb(inflated_mb: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [packer.compress(bytes(MB)) for _ in range(inflated_mb)]
    return b"".join(parts) + packer.flush()


class HostileServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # the proxy hanging up mid-answer is what every case expects


class Hostile(BaseHTTPRequestHandler):
    """Answers by the requested model's name: bomb, giant, boundless, drip, endless."""
    protocol_version = "HTTP/1.1"
    bomb = b""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        case = body.get("model", "")
        try:
            if case == "bomb":
                self._send({"Content-Encoding": "gzip"}, [self.bomb], len(self.bomb))
            elif case == "giant":
                self._send({}, itertools.repeat(b"x" * MB, 300), 300 * MB)
            elif case == "boundless":
                self._send({"Content-Type": "text/event-stream"},
                           itertools.repeat(b"data: " + b"x" * (MB - 6), 100), None)
            elif case == "drip":
                self._send({}, (b"{" for _ in range(600)), 600, delay=0.5)
            elif case == "endless":
                event = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
                self._send({"Content-Type": "text/event-stream"}, itertools.repeat(event),
                           None, delay=0.01)
        except OSError:
            self.close_connection = True  # the proxy hung up: what each case expects

    def _send(self, headers, pieces, length, delay=0.0):
        self.send_response(200)
        headers = {"Content-Type": "application/json", **headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header(*(("Content-Length", str(length)) if length is not None
                           else ("Transfer-Encoding", "chunked")))
        self.end_headers()
        for piece in pieces:
            if delay:
                time.sleep(delay)
            self.wfile.write(piece if length is not None else b"%x\r\n%s\r\n" % (len(piece), piece))
        if length is None:
            self.wfile.write(b"0\r\n\r\n")


def measure(proxy, pid, case, stream, timeout) -> dict:
    """One request of ``case``; the proxy's peak RSS, CPU seconds and the answer's end."""
    process = psutil.Process(pid)
    before = process.memory_info().rss
    cpu = sum(process.cpu_times()[:2])
    peak, stop = [before], threading.Event()

    def sample():
        while not stop.wait(0.01):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    body = json.dumps({"model": case, "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    with socket.create_connection(("127.0.0.1", int(proxy.rsplit(":", 1)[1])),
                                  timeout=timeout) as client:
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\n"
                       b"Authorization: Bearer " + KEY.encode() + b"\r\nConnection: close\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        answer = b""
        while len(answer) < 1_000_000:
            data = client.recv(65536)
            if not data:
                break
            answer += data
    seconds = time.monotonic() - started
    stop.set()
    sampler.join()
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "?"
    body = answer.find(b"\r\n\r\n") + 4
    last = max(body, answer.rfind(b"data: "))  # a stream's last event, else the whole body
    tail = answer[last:].split(b"\n", 1)[0][:200].decode(errors="replace")
    return {"case": case, "status": status, "seconds": round(seconds, 2),
            "cpu_seconds": round(sum(process.cpu_times()[:2]) - cpu, 2),
            "rss_before_mb": round(before / MB, 1), "rss_peak_mb": round(peak[0] / MB, 1),
            "end": tail}


def hold_idle(proxy, count, timeout=60.0) -> dict:
    """``count`` connections that sent half a request line, then /health/live asked."""
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, count + 512)), hard))
    held, deadline = [], time.monotonic() + timeout
    try:
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(b"GET /health/live HTTP/1.1\r\nHost: x")  # never finished
            held.append(s)
        time.sleep(1.0)  # the proxy's loop accepts what is queued
        started = time.monotonic()
        try:
            status, _ = services.request(proxy + "/health/live", timeout=10)
        except OSError as e:
            status = f"failed: {e}"
        return {"idle_connections": len(held), "health_live": status,
                "health_live_ms": round((time.monotonic() - started) * 1000, 1)}
    finally:
        for s in held:
            s.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=5000,
                   help="idle connections to hold (CONNECTION_LIMIT is set above it)")
    p.add_argument("--source", default=services.REPO, help="the proxy checkout to run")
    p.add_argument("--output", default="hostile", help="results name in bench/results")
    args = p.parse_args(argv)
    services.check_paths(p, args)
    services.interrupt_on_signals()
    Hostile.bomb = _bomb(300)
    upstream = HostileServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{upstream.server_address[1]}/v1"
    rows = []
    with services.ProcessSet() as procs, tempfile.TemporaryDirectory() as tmp:
        provider = {"name": "hostile", "type": "openai", "base_url": base, "models": ["*"]}
        env = {"ENVIRONMENT": "production", "PROXY_API_KEYS": f"bench:{KEY}",
               "CONNECTION_LIMIT": str(args.connections + 500), "HTTP_DEADLINE": "20",
               "STREAM_MAX_DURATION": "20", "CACHE_ENABLED": "false"}
        proxy = services.start_proxy(procs, tmp, "proxy", [provider], threads=256, env=env,
                                     source=args.source)
        for case, stream in (("bomb", False), ("giant", False), ("boundless", True),
                             ("drip", False), ("endless", True)):
            rows.append(measure(proxy.url, proxy.process.pid, case, stream, timeout=60))
            print(json.dumps(rows[-1]), flush=True)
        idle = hold_idle(proxy.url, args.connections)
        idle["proxy_alive"] = proxy.process.poll() is None
        print(json.dumps(idle), flush=True)
    upstream.shutdown()
    lines = [f"# Hostile upstreams and idle clients ({datetime.date.today()})", "",
             machine.summary(machine.describe()), "", "`python -m bench.hostile` (production profile, one "
             "process, 256 threads; upstream limits at their defaults, HTTP_DEADLINE and "
             "STREAM_MAX_DURATION 20 s)", "",
             "| case | status | seconds | proxy CPU s | RSS before MB | RSS peak MB | the answer's end |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['case']} | {r['status']} | {r['seconds']} | {r['cpu_seconds']} | "
              f"{r['rss_before_mb']} | {r['rss_peak_mb']} | `{r['end'][:110]}` |" for r in rows]
    lines += ["", f"Idle connections held: {idle['idle_connections']}; `/health/live` "
              f"answered {idle['health_live']} in {idle['health_live_ms']} ms; proxy alive: "
              f"{idle['proxy_alive']}.", ""]
    services.write_results(args.output, "\n".join(lines), {"cases": rows, "idle": idle})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
