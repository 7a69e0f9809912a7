"""Scale-out: throughput with WORKERS=1 and WORKERS=2, with and without Redis.

    .venv/bin/python -m bench.scaleout [--duration 10] [--connections 32]

The proxy processes may use both cores (``taskset -c 0,1``); nginx and wrk are pinned to core 1
and are cheap next to the proxy (nginx answers a fixed completion at tens of thousands of
requests a second), which is how they are kept out of the way: at the proxy's rates they take
about a tenth of a core. Pass-through runs with the cache off; the cache-hit row repeats one
request with the cache in Redis. Redis is the one on 127.0.0.1:6379, under a key prefix of
this run's own, deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid

import redis

from bench import services

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
CHAT = {"model": "bench-model", "messages": [{"role": "user", "content": "hello"}]}


def start_proxy(procs, tmp, name, upstream, *, workers, redis_prefix=None, cache=False):
    config = {"cache": {"enabled": cache},
              "providers": [{"name": "up", "type": "openai", "base_url": upstream + "/v1",
                             "models": ["bench-model"]}]}
    if redis_prefix:
        config["redis"] = {"url": REDIS_URL, "prefix": redis_prefix}
    path = os.path.join(tmp, f"{name}.yaml")
    with open(path, "w") as f:
        json.dump(config, f)  # JSON is YAML
    port = services.free_port()
    from settings import ENV_VARS
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(PROXY_CONFIG=path, HOST="127.0.0.1", PORT=str(port), WORKERS=str(workers),
               LOG_LEVEL="WARNING", ACCESS_LOG_ENABLED="false", PYTHONUNBUFFERED="1")
    log = os.path.join(tmp, f"{name}.log")
    process = procs.start(["taskset", "-c", "0,1", sys.executable, "wsgi.py"], log_path=log,
                          env=env, cwd=services.REPO)
    url = f"http://127.0.0.1:{port}"
    services.wait_ready(process, url + "/v1/models", log)
    time.sleep(1.0 if workers > 1 else 0.2)  # every worker listening
    return process, url


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--connections", type=int, default=32)
    args = p.parse_args(argv)
    prefix = f"llmproxy-bench:{uuid.uuid4().hex}:"
    rows = []
    cases = [("passthrough", 1, None, False), ("passthrough", 2, None, False),
             ("passthrough", 1, prefix, False), ("passthrough", 2, prefix, False),
             ("cache hit (Redis)", 1, prefix, True), ("cache hit (Redis)", 2, prefix, True)]
    try:
        with services.ProcessSet() as procs, tempfile.TemporaryDirectory() as tmp:
            upstream = services.start_nginx(procs, tmp)
            script = services.write_wrk_script(tmp, "chat", CHAT)
            for path, workers, redis_prefix, cache in cases:
                name = f"{path.split()[0]}-w{workers}-{'redis' if redis_prefix else 'local'}"
                process, url = start_proxy(procs, tmp, name, upstream, workers=workers,
                                           redis_prefix=redis_prefix, cache=cache)
                target = url + "/v1/chat/completions"
                services.run_wrk(target, script, connections=args.connections, seconds=2)
                result = services.run_wrk(target, script, connections=args.connections,
                                          seconds=args.duration)
                procs.stop(process)
                row = {"path": path, "workers": workers, "redis": bool(redis_prefix),
                       "rps": result["requests"] / (result["duration_us"] / 1e6),
                       "p50_ms": result["p50_us"] / 1000, "p99_ms": result["p99_us"] / 1000,
                       "errors": result["status"] + result["connect"] + result["read"]
                       + result["write"] + result["timeout"]}
                rows.append(row)
                print(f"bench: {name}: {row['rps']:,.0f} req/s", file=sys.stderr)
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    print(report(rows, args))
    return 0


def report(rows, args) -> str:
    lines = [f"# Scale-out, {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"`python -m bench.scaleout --duration {args.duration:g} --connections "
             f"{args.connections}`: proxy on cores 0-1, nginx and wrk on core 1.", "",
             "| path | WORKERS | Redis | req/s | p50 ms | p99 ms | errors |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['workers']} | {'yes' if r['redis'] else 'no'} | "
                     f"{r['rps']:,.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['errors']} |")
    by = {(r["path"], r["workers"], r["redis"]): r["rps"] for r in rows}
    for redis_on in (False, True):
        one, two = by.get(("passthrough", 1, redis_on)), by.get(("passthrough", 2, redis_on))
        if one and two:
            ratio = two / one
            lines.append(f"\nWORKERS=2 / WORKERS=1, pass-through, Redis {'on' if redis_on else 'off'}:"
                         f" {ratio:.2f}x ({'PASS' if ratio >= 1.6 else 'MISS'}, target 1.6x)")
    text = "\n".join(lines) + "\n"
    services.write_results("scaleout", text, rows)
    return text


if __name__ == "__main__":
    sys.exit(main())
