"""Scale-out: throughput with WORKERS=1 and WORKERS=2, with and without Redis.

The proxy processes may use both cores (``taskset -c 0,1``); nginx and wrk are pinned to core 1
and are cheap next to the proxy (nginx answers a fixed completion at tens of thousands of
requests a second): at the proxy's rates they take about a tenth of a core. Pass-through runs
with the cache off; the cache-hit rows repeat one request with the cache in Redis. Redis is the
one at ``BENCH_REDIS_URL`` (default 127.0.0.1:6379), under a key prefix of this run's own,
deleted afterwards.
"""

from __future__ import annotations

import os
import time
import uuid

import redis

from bench import report, services

TOOLS = ("nginx", "wrk", "taskset")
TITLE = "scale-out benchmark"
OUTPUT = "scaleout"
QUICK = {"duration": 2.0}
LIMITS = {"duration": (1, 120), "connections": (1, 1024)}
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
TARGET_RATIO = 1.6
CASES = (("passthrough", 1, False, False), ("passthrough", 2, False, False),
         ("passthrough", 1, True, False), ("passthrough", 2, True, False),
         ("cache hit (Redis)", 1, True, True), ("cache hit (Redis)", 2, True, True))


def add_arguments(p) -> None:
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured run (10)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (32)")


def measure(args, procs, tmp) -> dict:
    prefix = f"llmproxy-bench:{uuid.uuid4().hex}:"
    rows = []
    try:
        upstream = services.start_nginx(procs, tmp)
        script = services.write_wrk_script(tmp, "chat", services.CHAT_BODY)
        for path, workers, use_redis, cache in CASES:
            name = f"{path.split()[0]}-w{workers}-{'redis' if use_redis else 'local'}"
            config = {"cache": {"enabled": cache},
                      "providers": [{"name": "up", "type": "openai", "base_url": upstream + "/v1",
                                     "models": ["bench-model"]}]}
            if use_redis:
                config["redis"] = {"url": REDIS_URL, "prefix": prefix}
            proxy = services.start_proxy_env(
                procs, tmp, name, config, source=args.source, cores="0,1",
                env={"WORKERS": str(workers), "LOG_LEVEL": "WARNING",
                     "ACCESS_LOG_ENABLED": "false"})
            time.sleep(1.0 if workers > 1 else 0.2)  # every worker listening
            target = proxy.url + services.PATH
            services.run_wrk(target, script, connections=args.connections, seconds=2)
            raw = services.run_wrk(target, script, connections=args.connections,
                                   seconds=args.duration)
            procs.stop(proxy.process)
            rows.append({"path": path, "workers": workers, "redis": use_redis,
                         "rps": raw["requests"] / (raw["duration_us"] / 1e6),
                         "p50_ms": raw["p50_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
                         "errors": services.wrk_errors(raw)})
            report.progress(f"scaleout {name}: {rows[-1]['rps']:,.0f} req/s")
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    by = {(r["path"], r["workers"], r["redis"]): r["rps"] for r in rows}
    found = []
    for use_redis in (False, True):
        one, two = by.get(("passthrough", 1, use_redis)), by.get(("passthrough", 2, use_redis))
        if one and two:
            found.append(report.target(
                f"WORKERS=2 / WORKERS=1, pass-through, Redis {'on' if use_redis else 'off'}",
                f"{two / one:.2f}x", f">= {TARGET_RATIO}x", two / one >= TARGET_RATIO))
    return {"settings": {"duration_s": args.duration, "connections": args.connections},
            "rows": rows, "targets": found}


def render(rep) -> list[str]:
    lines = ["- proxy on cores 0-1, nginx and wrk on core 1; cache off for pass-through",
             "", "| path | WORKERS | Redis | req/s | p50 ms | p99 ms | errors |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rep["rows"]:
        lines.append(f"| {r['path']} | {r['workers']} | {'yes' if r['redis'] else 'no'} | "
                     f"{r['rps']:,.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['errors']} |")
    return lines
