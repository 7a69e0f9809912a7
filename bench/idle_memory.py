"""Where a production-profile proxy's idle memory goes: ``python -m bench.idle_memory``.

The proxy starts the way ``python -m bench run`` starts its ``prod-passthrough`` row (the
production profile, 256 threads, the database on with SQLite, a key made through the admin API,
nginx upstream) and its RSS is read the same way, after the key is made and one request answered;
then again after a few hundred more requests. Besides the RSS: /proc/PID/smaps_rollup split into
anonymous memory (the heap, thread stacks) and file-backed (shared libraries, mapped files), the
thread count. ``--source DIR`` (repeatable) measures other copies of the
tree in the same run, interleaved round by round, so before/after compare on the same machine
state; ``--database off`` measures with the database off; ``DIR?GC_TUNING_ENABLED=true`` adds to
that tree's environment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import urllib.request

import psutil

from bench import machine, services
from bench.run import (ADMIN_KEY, DATABASE_KEY, PRODUCTION_CONFIG, PRODUCTION_ENV,
                       _openai_upstream)

REQUESTS = 300  # "a few hundred": what a warm proxy has touched once


def measure(procs, tmp, source, upstream, *, database, label) -> dict:
    """One fresh proxy from ``source`` (a tree, then ``?NAME=value&...`` for its environment):
    its memory idle (as bench/run.py reads it) and after ``REQUESTS`` sequential pass-through
    requests."""
    source, _, extra = source.partition("?")
    env = {**PRODUCTION_ENV, "ADMIN_API_KEY": ADMIN_KEY,
           **dict(pair.split("=", 1) for pair in extra.split("&") if pair)}
    if database == "off":
        env["DATABASE_ENABLED"] = "false"
    proxy = services.start_proxy(procs, tmp, label, _openai_upstream(upstream), threads=256,
                                 env=env, config=PRODUCTION_CONFIG, source=source)
    try:
        key = (services.create_key(proxy.url, ADMIN_KEY, DATABASE_KEY) if database != "off"
               else PRODUCTION_ENV["PROXY_API_KEYS"].split(":", 1)[1])
        headers = {"Authorization": f"Bearer {key}"}
        target = proxy.url + services.PATH
        services.check_answer(target, services.CHAT_BODY, headers=headers)
        pid = proxy.process.pid
        idle = _memory(pid)
        for _ in range(REQUESTS):
            services.request(target, services.CHAT_BODY, headers=headers)
        loaded = _memory(pid)
        with urllib.request.urlopen(proxy.url + "/health/live", timeout=5) as r:
            r.read()
        return {"idle": idle, "loaded": loaded}
    finally:
        procs.stop(proxy.process)


def _memory(pid) -> dict:
    """RSS and its parts in MB, and the thread count."""
    rollup = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "kB":
                rollup[parts[0].rstrip(":")] = int(parts[1]) / 1024
    process = psutil.Process(pid)
    rss = process.memory_info().rss / 1024 / 1024
    return {"rss_mb": round(rss, 1), "anon_mb": round(rollup.get("Anonymous", 0), 1),
            "file_mb": round(rss - rollup.get("Anonymous", 0), 1),
            "threads": process.num_threads()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", action="append", default=[],
                        help="a copy of the tree to measure too (repeatable; the checkout first); "
                             "DIR?NAME=value&... adds to its environment")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database", choices=("sqlite", "off"), default="sqlite")
    parser.add_argument("--json", help="write every measurement here")
    args = parser.parse_args(argv)
    sources = [services.REPO, *args.source]
    seen = {s: [] for s in sources}
    with services.ProcessSet() as procs, tempfile.TemporaryDirectory() as tmp:
        upstream = services.start_nginx(procs, tmp)
        for round_ in range(args.rounds):
            for i, source in enumerate(sources):
                with machine.cpu_meter(None, procs) as cpu:
                    result = measure(procs, tmp, source, upstream, database=args.database,
                                     label=f"r{round_}-s{i}")
                seen[source].append({**result, "others_cpu_pct": cpu.get("others_cpu_pct"),
                                     "steal_pct": cpu.get("steal_pct")})
                print(f"round {round_} {source}: idle {result['idle']} "
                      f"loaded {result['loaded']} others {cpu.get('others_cpu_pct')}% "
                      f"steal {cpu.get('steal_pct')}%", flush=True)
    print(f"\n| tree | idle RSS MB | anon | file | after {REQUESTS} requests MB | threads |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for source, results in seen.items():
        def med(phase, field):
            return round(statistics.median(r[phase][field] for r in results), 1)
        print(f"| {source} | {med('idle', 'rss_mb')} | {med('idle', 'anon_mb')} | "
              f"{med('idle', 'file_mb')} | {med('loaded', 'rss_mb')} | "
              f"{med('idle', 'threads'):g} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(seen, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
