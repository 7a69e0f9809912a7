"""The loopback load test: what the proxy costs per request, and what it serves on one core.

nginx answering a fixed completion is the upstream (never the bottleneck), wrk the load; the
proxy (``python wsgi.py``) has core 0 to itself, nginx and wrk share core 1. Each scenario gets a
fresh proxy; each row is a warm-up and a measured wrk run at one concurrency.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import psutil

from bench import cli, machine, report, services

TOOLS = ("nginx", "wrk", "taskset")
TITLE = "loopback benchmark"
OUTPUT = "latest"
QUICK = {"duration": 2.0, "warmup": 1.0}
LIMITS = {"duration": (1, 120), "warmup": (0, 30), "retries": (0, 5)}


@dataclass
class Scenario:
    """One thing to load: the upstream itself, or a proxy built from ``providers``.

    ``providers(upstream_url)`` returns the YAML provider list; None means wrk talks to nginx
    directly. ``proxy_env``/``proxy_config`` adjust the proxy (e.g. ENVIRONMENT=production, a
    cache section); ``headers`` are sent with every request (an API key).
    """
    name: str
    title: str
    providers: object = None
    proxy_env: dict = field(default_factory=dict)
    proxy_config: dict = field(default_factory=dict)
    needs_upstream: bool = True
    headers: dict = field(default_factory=dict)


BENCH_KEY = "sk-bench-0123456789abcdef0123"
BENCH_AUTH = {"Authorization": f"Bearer {BENCH_KEY}"}
PRODUCTION_ENV = {"ENVIRONMENT": "production", "THREADS": "256", "HOST": "127.0.0.1",
                  "PROXY_API_KEYS": f"bench:{BENCH_KEY}", "RATE_LIMIT_REQUESTS": "100000000"}
NO_CACHE = {"cache": {"enabled": False}}


def _openai_upstream(upstream):
    return [{"name": "bench-upstream", "type": "openai", "base_url": upstream + "/v1",
             "models": ["bench-model"]}]


def _mock(upstream):
    return [{"name": "mock", "type": "mock", "models": ["bench-model"]}]


SCENARIOS = {s.name: s for s in (
    Scenario("direct", "wrk -> nginx"),
    # The same request over and over: the cache is off so every one goes upstream.
    Scenario("passthrough", "wrk -> proxy -> nginx", providers=_openai_upstream,
             proxy_config=NO_CACHE),
    Scenario("cachehit", "wrk -> proxy (response cache hit)", providers=_openai_upstream),
    Scenario("mock", "wrk -> proxy (mock provider)", providers=_mock, needs_upstream=False,
             proxy_config=NO_CACHE),
    # Everything on: the production profile (256 threads, API keys required and checked, rate
    # limits checked (set high enough not to refuse the load), metrics, the JSON access log,
    # breakers, bulkheads, caches and the memory manager).
    Scenario("prod-passthrough", "wrk -> proxy -> nginx, production profile",
             providers=_openai_upstream, proxy_env=PRODUCTION_ENV, proxy_config=NO_CACHE,
             headers=BENCH_AUTH),
    Scenario("prod-cachehit", "wrk -> proxy (cache hit), production profile",
             providers=_openai_upstream, proxy_env=PRODUCTION_ENV, headers=BENCH_AUTH),
    # GC tuning (gc.freeze and thresholds at start-up; off by default) on, to compare with "mock".
    Scenario("mock-gc-on", "wrk -> proxy (mock provider, GC tuning on)", providers=_mock,
             needs_upstream=False, proxy_config=NO_CACHE,
             proxy_env={"GC_TUNING_ENABLED": "true"}),
    Scenario("prod-passthrough-gc-on", "wrk -> proxy -> nginx, production profile, GC tuning on",
             providers=_openai_upstream, proxy_env={**PRODUCTION_ENV, "GC_TUNING_ENABLED": "true"},
             proxy_config=NO_CACHE, headers=BENCH_AUTH),
)}

TARGETS = (  # (label, key in the summary, comparison, limit, unit)
    ("pass-through req/s at c16", "passthrough_rps_c16", ">=", 1200, "req/s"),
    ("added p50 at c1 (proxy - direct)", "added_p50_ms_c1", "<=", 0.8, "ms"),
    ("idle RSS of the proxy", "idle_rss_mb", "<=", 60, "MB"),
    ("cache hit req/s at c16", "cachehit_rps_c16", ">=", 4000, "req/s"),
    ("cache hit p50 at c1", "cachehit_p50_ms_c1", "<=", 0.3, "ms"),
    ("production: pass-through req/s at c16", "prod_passthrough_rps_c16", ">=", 1200, "req/s"),
    ("production: added p50 at c1", "prod_added_p50_ms_c1", "<=", 0.8, "ms"),
    ("production: pass-through p99/p50 at c16", "prod_p99_over_p50_c16", "<=", 3, "x"),
    ("production: cache hit req/s at c16", "prod_cachehit_rps_c16", ">=", 3500, "req/s"),
    ("production: cache hit p50 at c1", "prod_cachehit_p50_ms_c1", "<=", 0.35, "ms"),
    ("production: idle RSS", "prod_idle_rss_mb", "<=", 60, "MB"),
)


def add_arguments(p) -> None:
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured run (10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each (2)")
    p.add_argument("--scenarios", type=cli.names(SCENARIOS), default=list(SCENARIOS),
                   help=f"comma-separated, from: {', '.join(SCENARIOS)}")
    p.add_argument("--connections", type=lambda v: [int(c) for c in v.split(",")],
                   default=[1, 16], help="wrk concurrency levels (1,16)")
    p.add_argument("--threads", type=int, default=64,
                   help="waitress threads of the proxy (64; the production rows use 256)")
    p.add_argument("--smoke", action="store_true",
                   help="one 1 s run of passthrough at c1, no warm-up: does the bench work?")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each run, wait up to this long for an idle machine")
    p.add_argument("--retries", type=int, default=0,
                   help="run a *shared* row again, at most this often (0-5), keeping the cleanest")


def configure(p, args) -> None:
    if args.smoke:
        args.duration, args.warmup, args.scenarios, args.connections = 1.0, 0, ["passthrough"], [1]


def measure(args, procs, tmp) -> dict:
    """Every chosen scenario at every concurrency: the raw numbers and the targets."""
    rows, memory = [], {}
    upstream = None
    if any(SCENARIOS[s].needs_upstream for s in args.scenarios):
        upstream = services.start_nginx(procs, tmp)
    for name in args.scenarios:
        scenario, proxy = SCENARIOS[name], None
        url = upstream
        if scenario.providers is not None:
            proxy = services.start_proxy(
                procs, tmp, name, scenario.providers(upstream), threads=args.threads,
                env=scenario.proxy_env, config=scenario.proxy_config, source=args.source)
            url = proxy.url
        services.check_answer(url + services.PATH, headers=scenario.headers)  # and for RSS
        if proxy:
            memory[name] = {"idle_rss_mb": _rss_mb(proxy.process.pid)}
        script = services.write_wrk_script(tmp, name, services.CHAT_BODY,
                                           headers=scenario.headers)
        for c in args.connections:
            rows.append(_measure_row(args, procs, scenario, proxy, url + services.PATH, script,
                                     c))
        if proxy:
            memory[name]["loaded_rss_mb"] = _rss_mb(proxy.process.pid)
            procs.stop(proxy.process)
    summary = _summary(rows, memory)
    return {"settings": {"duration_s": args.duration, "warmup_s": args.warmup,
                         "threads": args.threads},
            "rows": rows, "memory": memory, "summary": summary, "targets": _targets(summary),
            "pass": not any(row["errors"] for row in rows)}


def _measure_row(args, procs, scenario, proxy, target, script, connections) -> dict:
    """Warm up, then one measured wrk run; again (bounded) while other work shared the CPU."""
    best = None
    for attempt in range(args.retries + 1):
        machine.wait_quiet(args.wait_quiet)
        report.progress(f"{scenario.name} c={connections}: {args.warmup:g} s warm-up, "
                        f"{args.duration:g} s run" + (f" (retry {attempt})" if attempt else ""))
        if args.warmup:
            services.run_wrk(target, script, connections=connections, seconds=args.warmup)
        with machine.cpu_meter(proxy.process.pid if proxy else None, procs) as cpu:
            raw = services.run_wrk(target, script, connections=connections,
                                   seconds=args.duration)
        row = _row(scenario, connections, raw, cpu)
        if best is None or row["others_cpu_pct"] < best["others_cpu_pct"]:
            best = row
        if not machine.shared(best):
            break
    if best["errors"]:
        script = services.write_wrk_script(os.path.dirname(script), scenario.name,
                                           services.CHAT_BODY, headers=scenario.headers,
                                           count=True)
        best["failure_sample"] = services.run_wrk(target, script, connections=connections,
                                                  seconds=2)["statuses"]
        report.progress(f"{scenario.name} c={connections} had {best['errors']} errors; statuses"
                        f" in a 2 s diagnostic run: {best['failure_sample']}")
    return best


def _row(scenario, connections, raw, cpu) -> dict:
    seconds = raw["duration_us"] / 1e6
    if scenario.providers is None:
        cpu["proxy_cpu_pct"] = None
    return {"scenario": scenario.name, "title": scenario.title, "connections": connections,
            "rps": round(raw["requests"] / seconds, 1), "p50_ms": raw["p50_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000, "requests": raw["requests"],
            "non_2xx": raw["status"],  # wrk counts status >= 400 (no 1xx/3xx happen here)
            "errors": services.wrk_errors(raw), **cpu, "raw": raw}


def _rss_mb(pid) -> float:
    return round(psutil.Process(pid).memory_info().rss / 1024 / 1024, 1)


def _summary(rows, memory) -> dict:
    def find(name, c):
        return next((r for r in rows if r["scenario"] == name and r["connections"] == c), {})
    direct, through = find("direct", 1).get("p50_ms"), find("passthrough", 1).get("p50_ms")
    prod = find("prod-passthrough", 1).get("p50_ms")
    prod16 = find("prod-passthrough", 16)
    return {"prod_idle_rss_mb": memory.get("prod-passthrough", {}).get("idle_rss_mb"),
            "prod_passthrough_rps_c16": prod16.get("rps"),
            "prod_added_p50_ms_c1": None if direct is None or prod is None
            else round(prod - direct, 3),
            "prod_p99_over_p50_c16": round(prod16["p99_ms"] / prod16["p50_ms"], 2)
            if prod16.get("p50_ms") else None,
            "prod_cachehit_rps_c16": find("prod-cachehit", 16).get("rps"),
            "prod_cachehit_p50_ms_c1": find("prod-cachehit", 1).get("p50_ms"),
            "passthrough_rps_c16": find("passthrough", 16).get("rps"),
            "cachehit_rps_c16": find("cachehit", 16).get("rps"),
            "cachehit_p50_ms_c1": find("cachehit", 1).get("p50_ms"),
            "added_p50_ms_c1": None if direct is None or through is None
            else round(through - direct, 3),
            "idle_rss_mb": memory.get("passthrough", memory.get("mock", {})).get("idle_rss_mb")}


def _targets(summary) -> list[dict]:
    out = []
    for label, key, op, limit, unit in TARGETS:
        value = summary.get(key)
        if value is None:
            out.append({"target": label, "measured": "-", "limit": f"{op} {limit:,} {unit}",
                        "result": "n/a (scenario not run)"})
        else:
            ok = value >= limit if op == ">=" else value <= limit
            out.append(report.target(label, f"{value:,} {unit}", f"{op} {limit:,} {unit}", ok))
    return out


def render(rep) -> list[str]:
    """One row per run, then the proxies' memory."""
    s = rep["settings"]
    lines = [f"- settings: {s['duration_s']:g} s runs after {s['warmup_s']:g} s warm-up; "
             f"waitress threads {s['threads']}; proxy on core {services.PROXY_CORE}, nginx and "
             f"wrk on core {services.LOAD_CORE}",
             "", "| scenario | path | conc. | req/s | p50 ms | p99 ms | non-2xx | errors | "
             "proxy CPU | other processes CPU | steal |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rep["rows"]:
        flag = " **FLAGGED: errors**" if r["errors"] else ""
        flag += " *(shared)*" if machine.shared(r) else ""
        cpu = "-" if r["proxy_cpu_pct"] is None else f"{r['proxy_cpu_pct']:.0f}%"
        lines.append(f"| {r['scenario']}{flag} | {r['title']} | {r['connections']} | "
                     f"{r['rps']:,.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['non_2xx']} |"
                     f" {r['errors']} | {cpu} | {r['others_cpu_pct']:.0f}% |"
                     f" {r['steal_pct']:.0f}% |")
    for r in rep["rows"]:
        for status, seen in r.get("failure_sample", {}).items():
            if seen["example"]:
                lines.append(f"\n**FLAGGED** {r['scenario']} c{r['connections']}: in a 2 s "
                             f"diagnostic run, {seen['count']} x {status}: `{seen['example']}`")
    lines += report.shared_note(rep["rows"])
    lines += ["", "| proxy | idle RSS MB | RSS after load MB |", "| --- | ---: | ---: |"]
    for name, mem in rep["memory"].items():
        lines.append(f"| {name} | {mem['idle_rss_mb']} | {mem.get('loaded_rss_mb', '-')} |")
    return lines
