"""Hostile upstreams and idle clients: what they cost the proxy, measured.

``bench.upstreams.hostile`` (core 1) answers a gzip bomb, a giant body, a boundless stream, a
drip and an endless stream, one request each through the proxy (production profile, core 0)
while its RSS is sampled every 10 ms; then ``--connections`` half-sent requests are held open
and ``/health/live`` is timed (bench/README.md).
"""

from __future__ import annotations

import json
import resource
import socket
import threading
import time

import psutil

from bench import report, services

TOOLS = ("taskset",)
TITLE = "hostile upstreams and idle clients"
OUTPUT = "hostile"
QUICK = {"connections": 500, "deadline": 5}
LIMITS = {"connections": (1, 100_000), "deadline": (1, 120)}
KEY = "bench-hostile-key-0123456789"
MB = 1024 * 1024
CASES = (("bomb", False), ("giant", False), ("boundless", True), ("drip", False),
         ("endless", True))


def add_arguments(p) -> None:
    p.add_argument("--connections", type=int, default=5000,
                   help="idle connections to hold (CONNECTION_LIMIT is set above it)")
    p.add_argument("--deadline", type=int, default=20,
                   help="the proxy's HTTP_DEADLINE and STREAM_MAX_DURATION, s (20)")


def measure(args, procs, tmp) -> dict:
    upstream, _ = services.start_upstream(procs, tmp, "hostile", lifetime=3600)
    provider = {"name": "hostile", "type": "openai", "base_url": upstream + "/v1",
                "models": ["*"]}
    env = {"ENVIRONMENT": "production", "PROXY_API_KEYS": f"bench:{KEY}",
           "CONNECTION_LIMIT": str(args.connections + 500), "HTTP_DEADLINE": str(args.deadline),
           "STREAM_MAX_DURATION": str(args.deadline), "CACHE_ENABLED": "false"}
    proxy = services.start_proxy(procs, tmp, "proxy", [provider], threads=256, env=env,
                                 source=args.source)
    rows = []
    for case, stream in CASES:
        rows.append(one_case(proxy.url, proxy.process.pid, case, stream,
                             timeout=args.deadline * 3))
        report.progress(f"hostile {json.dumps(rows[-1])}")
    idle = hold_idle(proxy.url, args.connections)
    idle["proxy_alive"] = proxy.process.poll() is None
    return {"settings": {"connections": args.connections, "deadline_s": args.deadline},
            "cases": rows, "idle": idle, "pass": idle["proxy_alive"]}


def one_case(proxy, pid, case, stream, timeout) -> dict:
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
    body = services.chat_body(case, "hi", stream=stream)
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
    start = answer.find(b"\r\n\r\n") + 4
    last = max(start, answer.rfind(b"data: "))  # a stream's last event, else the whole body
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


def render(rep) -> list[str]:
    s, idle = rep["settings"], rep["idle"]
    lines = [f"- production profile, one process, 256 threads; upstream limits at their "
             f"defaults, HTTP_DEADLINE and STREAM_MAX_DURATION {s['deadline_s']} s",
             "", "| case | status | seconds | proxy CPU s | RSS before MB | RSS peak MB | "
             "the answer's end |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['case']} | {r['status']} | {r['seconds']} | {r['cpu_seconds']} | "
              f"{r['rss_before_mb']} | {r['rss_peak_mb']} | `{r['end'][:110]}` |"
              for r in rep["cases"]]
    lines += ["", f"Idle connections held: {idle['idle_connections']}; `/health/live` "
              f"answered {idle['health_live']} in {idle['health_live_ms']} ms; proxy alive: "
              f"{idle['proxy_alive']}."]
    return lines
