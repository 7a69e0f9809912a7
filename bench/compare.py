"""Compare: one production row of ``run`` for several proxy variants, interleaved, with ratios.

A change's before and after in one run: each ``--variant`` is a checkout (``DIR``, default this
one) and environment added to the production profile (``NAME=DIR?VAR=value&VAR=value``), or a
floor of bench/floors (``naive``, ``tuned``, ``ping``). Each round starts a fresh server of each
variant in turn (every other round reversed) on the proxy's core and measures it with wrk at
each ``--connections``; the report gives each one's median and rounds, and its ratio to the
first variant's median. ``--path``: ``passthrough`` (the ``prod-passthrough`` row: database on,
a key with a budget) or ``cachehit`` (``prod-cachehit``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics

from bench import machine, report, run, services, targets

TOOLS = ("nginx", "wrk", "taskset")
TITLE = "compare: production rows of several variants, interleaved"
OUTPUT = "compare"
QUICK = {"rounds": 1, "duration": 1.0}
LIMITS = {"rounds": (1, 20), "duration": (1, 60)}
PATHS = {"passthrough": "prod-passthrough", "cachehit": "prod-cachehit"}
FLOORS = ("naive", "tuned", "ping")


def add_arguments(p) -> None:
    p.add_argument("--variant", action="append", dest="variants", metavar="NAME[=DIR?VAR=v&..]",
                   help="a proxy (this checkout, another DIR, environment added) or a floor "
                        "(naive, tuned, ping); repeatable, the first is the reference")
    p.add_argument("--path", choices=PATHS, default="passthrough",
                   help="the production row: passthrough (default) or cachehit")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measured run (5)")
    p.add_argument("--connections", type=lambda v: [int(c) for c in v.split(",")],
                   default=[1, 16],
                   help="wrk concurrency levels (1,16)")


def configure(p, args) -> None:
    args.parsed = []
    for spec in args.variants or ["current"]:
        name, _, rest = spec.partition("=")
        source, _, extra = rest.partition("?")
        source = os.path.abspath(source) if source else args.source
        if name not in FLOORS and not os.path.exists(os.path.join(source, "wsgi.py")):
            p.error(f"--variant {spec}: no wsgi.py in {source}")
        env = dict(pair.split("=", 1) for pair in extra.split("&") if "=" in pair)
        args.parsed.append((name, source, env))
    if len({name for name, _, _ in args.parsed}) < len(args.parsed):
        p.error("--variant names must differ")


def measure(args, procs, tmp) -> dict:
    upstream = services.start_nginx(procs, tmp)
    rows = []
    for round_ in range(1, args.rounds + 1):
        order = args.parsed if round_ % 2 else args.parsed[::-1]
        for name, source, env in order:
            with contextlib.ExitStack() as cleanup:
                server, scenario = _start(args, procs, tmp, name, source, env, upstream,
                                          cleanup)
                target = server.url + scenario.path
                services.check_answer(target, scenario.body, headers=scenario.headers,
                                      expect=scenario.expect)
                script = services.write_wrk_script(tmp, name, scenario.body,
                                                   headers=scenario.headers)
                for connections in args.connections:
                    services.run_wrk(target, script, connections=connections, seconds=1)
                    with machine.cpu_meter(server.process.pid, procs) as cpu:
                        raw = services.run_wrk(target, script, connections=connections,
                                               seconds=args.duration)
                    rows.append({"round": round_, "variant": name, "connections": connections,
                                 "rps": raw["requests"] / (raw["duration_us"] / 1e6),
                                 "p50_ms": raw["p50_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
                                 "errors": services.wrk_errors(raw), **cpu})
                    report.progress(f"compare round {round_} {name} c={connections}: "
                                    f"{rows[-1]['rps']:,.0f} req/s")
                procs.stop(server.process)
    return {"settings": {"path": args.path, "rounds": args.rounds, "duration_s": args.duration,
                         "variants": [{"name": n, "source": s, "env": e}
                                      for n, s, e in args.parsed]},
            "rows": rows, "medians": _medians(args, rows),
            "pass": not any(r["errors"] for r in rows)}


def _start(args, procs, tmp, name, source, env, upstream, cleanup):
    """A fresh server of the variant, and the scenario its load follows."""
    scenario = run.SCENARIOS[PATHS[args.path]]
    if name in FLOORS:
        floor = targets.Subject(name, name, "floor", floor=name)
        return targets._start_floor(procs, tmp, floor, upstream), scenario
    scenario = dataclasses.replace(scenario, proxy_env={**scenario.proxy_env, **env})
    options = type("Options", (), {"threads": targets.production_threads(), "source": source})
    proxy, key = run._start_proxy(options, procs, tmp, name, scenario,
                                  scenario.providers(upstream), cleanup)
    return proxy, run._with_key(scenario, key)


def _medians(args, rows) -> list[dict]:
    found = []
    for connections in args.connections:
        reference = None
        for name, _, _ in args.parsed:
            mine = [r for r in rows if r["variant"] == name and r["connections"] == connections]
            median = statistics.median(r["rps"] for r in mine)
            reference = reference or median
            found.append({"variant": name, "connections": connections, "rps": median,
                          "rounds": [round(r["rps"]) for r in mine],
                          "p50_ms": statistics.median(r["p50_ms"] for r in mine),
                          "p99_ms": statistics.median(r["p99_ms"] for r in mine),
                          "ratio": median / reference})
    return found


def render(rep) -> list[str]:
    s = rep["settings"]
    lines = [f"- {s['path']}: {s['rounds']} rounds of {s['duration_s']:g} s runs, the variants in "
             "turn (every other round reversed), each server fresh; on core "
             f"{services.PROXY_CORE}, nginx and wrk on core {services.LOAD_CORE}", ""]
    for v in s["variants"]:
        extra = " ".join(f"{k}={val}" for k, val in v["env"].items())
        lines.append(f"- `{v['name']}`: {v['source']}{' ' + extra if extra else ''}")
    lines += ["", "| variant | conc. | req/s (median) | x first | p50 ms | p99 ms | rounds |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for m in rep["medians"]:
        lines.append(f"| {m['variant']} | {m['connections']} | {m['rps']:,.0f} | "
                     f"{m['ratio']:.2f}x | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} | "
                     f"{', '.join(f'{r:,}' for r in m['rounds'])} |")
    return lines
