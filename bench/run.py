"""The loopback load test: what the proxy costs per request, and what it serves on one core.

nginx answering a fixed completion is the upstream (never the bottleneck), wrk the load; the
proxy (``python wsgi.py``) has core 0 to itself, nginx and wrk share core 1. Each scenario gets a
fresh proxy; each row is a warm-up and a measured wrk run at one concurrency. ``--rounds``
runs the chosen scenarios again, in turn, so that scenarios compared are measured interleaved
and the report gives each one's median and spread.

Every proxy has its database (keys, spend, the request log) on, as the proxy's default, in a
SQLite file of its own under the run's temporary directory, unless its scenario says PostgreSQL
(a database made for it on ``BENCH_POSTGRES_URL``'s server and dropped after) or off. After the
load, the rows its database holds are counted against the requests sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import statistics
from dataclasses import dataclass, field

import psutil

from bench import cli, machine, report, services

TOOLS = ("nginx", "wrk", "taskset")
TITLE = "loopback benchmark"
OUTPUT = "latest"
QUICK = {"duration": 2.0, "warmup": 1.0}
LIMITS = {"duration": (1, 120), "warmup": (0, 30), "retries": (0, 5), "rounds": (1, 10)}


@dataclass
class Scenario:
    """One thing to load: the upstream itself, or a proxy built from ``providers``.

    ``providers(upstream_url)`` returns the YAML provider list; None means wrk talks to nginx
    directly. ``proxy_env``/``proxy_config`` adjust the proxy (e.g. ENVIRONMENT=production, a
    cache section); ``headers`` are sent with every request (an API key). ``path`` and ``body``
    are what wrk POSTs (a chat completion unless a front end's), ``expect`` the (field, value)
    the one request before the load must answer with. ``database``: ``sqlite`` (the default),
    ``postgresql`` or ``off``; ``key``: the load's key, ``config`` (the one in ``headers``, from
    PROXY_API_KEYS) or ``database`` (one made with ``POST /admin/keys`` before the load, with a
    budget, so spend tracking and the budget check are on the path; it takes the place of
    ``BENCH_KEY`` in ``headers``). ``traces``: the share of new traces the proxy samples, its
    spans sent to a discarding OTLP/HTTP receiver (bench/upstreams/otlp.py); None: tracing off.
    """
    name: str
    title: str
    providers: object = None
    proxy_env: dict = field(default_factory=dict)
    proxy_config: dict = field(default_factory=dict)
    needs_upstream: bool = True
    headers: dict = field(default_factory=dict)
    path: str = services.PATH
    body: dict = field(default_factory=lambda: services.CHAT_BODY)
    expect: tuple = ("object", "chat.completion")
    database: str = "sqlite"
    key: str = "config"
    traces: float | None = None

    def profile(self) -> str:
        """What one proxy must share to serve several scenarios (``--one-proxy``)."""
        return repr((self.proxy_env, self.proxy_config, self.database, self.key, self.traces))


BENCH_KEY = "sk-bench-0123456789abcdef0123"
BENCH_AUTH = {"Authorization": f"Bearer {BENCH_KEY}"}
PRODUCTION_ENV = {"ENVIRONMENT": "production", "THREADS": "256", "HOST": "127.0.0.1",
                  "PROXY_API_KEYS": f"bench:{BENCH_KEY}", "RATE_LIMIT_REQUESTS": "100000000"}
NO_CACHE = {"cache": {"enabled": False}}
# Every proxy: the admin routes open to this key, to make keys and count the rows written.
ADMIN_KEY = "bench-admin-0123456789abcdef0123"
# The key the production rows' load goes through when it is made in the database: a budget no
# load reaches, so it is checked on every request and never refuses.
DATABASE_KEY = {"id": "bench-db", "budget": {"daily_usd": 1e9}}
# A price for every bench model (USD per million tokens; nginx answers with 1 prompt and 6
# completion tokens): each answer costs something, which spend tracking adds up.
PRICED = {"pricing": {"models": [{"model": "bench-*", "input": 3.0, "output": 15.0}]}}
PRODUCTION_CONFIG = {**NO_CACHE, **PRICED}
# The production rows: the profile, priced, and the load through a key made in the database
# with a budget (the database on: SQLite unless a scenario says otherwise).
PRODUCTION = {"proxy_env": PRODUCTION_ENV, "key": "database"}


def _openai_upstream(upstream):
    return [{"name": "bench-upstream", "type": "openai", "base_url": upstream + "/v1",
             "models": ["bench-model"]}]


def _mock(upstream):
    return [{"name": "mock", "type": "mock", "models": ["bench-model"]}]


def _anthropic_upstream(upstream):
    return [{"name": "bench-anthropic", "type": "anthropic", "base_url": upstream,
             "models": ["bench-model"]}]


def _responses_upstream(upstream):
    return [{"name": "bench-responses", "type": "openai", "base_url": upstream + "/v1",
             "models": ["bench-model"], "responses": True}]


# The front ends (app/protocols): what Claude Code and Codex send, in small, answered by nginx
# natively (an Anthropic Message, a Response) or by its chat completion, translated.
MESSAGES_BODY = {"model": "bench-model", "max_tokens": 64,
                 "messages": [{"role": "user", "content": "hello"}]}
RESPONSES_BODY = {"model": "bench-model", "input": "hello", "store": False}
MESSAGES = {"path": "/v1/messages", "body": MESSAGES_BODY, "expect": ("type", "message"),
            "headers": {"anthropic-version": "2023-06-01"}}
RESPONSES = {"path": "/v1/responses", "body": RESPONSES_BODY, "expect": ("object", "response")}
FRONT_ENDS = (  # name, path, providers, the client protocol (and its key header in production)
    ("messages-passthrough", "wrk -> proxy /v1/messages -> nginx (anthropic provider)",
     _anthropic_upstream, MESSAGES, {"x-api-key": BENCH_KEY}),
    ("messages-translated", "wrk -> proxy /v1/messages -> nginx chat (openai provider)",
     _openai_upstream, MESSAGES, {"x-api-key": BENCH_KEY}),
    ("responses-passthrough", "wrk -> proxy /v1/responses -> nginx (openai, responses: true)",
     _responses_upstream, RESPONSES, BENCH_AUTH),
    ("responses-translated", "wrk -> proxy /v1/responses -> nginx chat (openai provider)",
     _openai_upstream, RESPONSES, BENCH_AUTH),
)


def _front_end_scenarios():
    """Each front end with the defaults, then with the production profile (``prod-``)."""
    for name, title, providers, protocol, key in FRONT_ENDS:
        yield Scenario(name, title, providers=providers, proxy_config=NO_CACHE, **protocol)
        yield Scenario("prod-" + name, title + ", production profile", providers=providers,
                       proxy_config=PRODUCTION_CONFIG, **PRODUCTION,
                       **{**protocol, "headers": {**protocol.get("headers", {}), **key}})


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
    # breakers, bulkheads, caches and the memory manager), the database on (SQLite): a key made
    # in it with a budget, spend tracked, a request log row for every request.
    Scenario("prod-passthrough", "wrk -> proxy -> nginx, production profile, database on "
             "(SQLite), a database key with a budget", providers=_openai_upstream,
             proxy_config=PRODUCTION_CONFIG, headers=BENCH_AUTH, **PRODUCTION),
    Scenario("prod-cachehit", "wrk -> proxy (cache hit), production profile, database on "
             "(SQLite)", providers=_openai_upstream, proxy_config=PRICED, headers=BENCH_AUTH,
             **PRODUCTION),
    # Issue 18: what the database costs the production pass-through, against it off (the key
    # then from PROXY_API_KEYS), on PostgreSQL, and on SQLite with the configuration's key
    # (rows written, no budget checked) to tell the key's source from the writes.
    Scenario("prod-passthrough-db-off", "wrk -> proxy -> nginx, production profile, database "
             "off (the configuration's key)", providers=_openai_upstream,
             proxy_env=PRODUCTION_ENV, proxy_config=PRODUCTION_CONFIG, headers=BENCH_AUTH,
             database="off"),
    Scenario("prod-passthrough-postgres", "wrk -> proxy -> nginx, production profile, database "
             "on (PostgreSQL), a database key with a budget", providers=_openai_upstream,
             proxy_config=PRODUCTION_CONFIG, headers=BENCH_AUTH, database="postgresql",
             **PRODUCTION),
    Scenario("prod-passthrough-config-key", "wrk -> proxy -> nginx, production profile, "
             "database on (SQLite), the configuration's key", providers=_openai_upstream,
             proxy_env=PRODUCTION_ENV, proxy_config=PRODUCTION_CONFIG, headers=BENCH_AUTH),
    # Issue 19: what OpenTelemetry traces cost the production pass-through (prod-passthrough:
    # tracing off), every trace sampled and one in a hundred, sent to a discarding receiver.
    *(Scenario(name, "wrk -> proxy -> nginx, production profile, traces sampled "
               f"{ratio:.0%} to a discarding OTLP receiver", providers=_openai_upstream,
               proxy_config=PRODUCTION_CONFIG, headers=BENCH_AUTH, traces=ratio, **PRODUCTION)
      for name, ratio in (("prod-passthrough-traced", 1.0),
                          ("prod-passthrough-traced-1pct", 0.01))),
    # GC tuning (gc.freeze and thresholds at start-up; off by default) on, to compare with "mock".
    Scenario("mock-gc-on", "wrk -> proxy (mock provider, GC tuning on)", providers=_mock,
             needs_upstream=False, proxy_config=NO_CACHE,
             proxy_env={"GC_TUNING_ENABLED": "true"}),
    Scenario("prod-passthrough-gc-on", "wrk -> proxy -> nginx, production profile, GC tuning on",
             providers=_openai_upstream, proxy_env={**PRODUCTION_ENV, "GC_TUNING_ENABLED": "true"},
             proxy_config=PRODUCTION_CONFIG, headers=BENCH_AUTH, key="database"),
    *_front_end_scenarios(),
)}
# A run without --scenarios: the front ends' production variants, the database's comparisons
# (PostgreSQL needs its server) and the tracing ones only when named.
DATABASE_OFF = "prod-passthrough-db-off"
DATABASE_ON = (  # compared with DATABASE_OFF: (label, scenario, a target's key or None)
    ("SQLite", "prod-passthrough", "sqlite"),
    ("PostgreSQL", "prod-passthrough-postgres", "postgresql"),
    ("SQLite, the configuration's key", "prod-passthrough-config-key", None))
DEFAULT_SCENARIOS = [name for name in SCENARIOS
                     if not (name.startswith("prod-") and name.removeprefix("prod-")
                             in {f[0] for f in FRONT_ENDS})
                     and name not in ("prod-passthrough-postgres", "prod-passthrough-config-key")
                     and SCENARIOS[name].traces is None]
TRACING_OFF = "prod-passthrough"
TRACED = (("sampled 100%", "prod-passthrough-traced"),
          ("sampled 1%", "prod-passthrough-traced-1pct"))
# Rows the database must hold after a proxy's load: at least this share of the requests sent
# (wrk counts the answers it read; a request cut at the end of a run may be logged or not).
WRITTEN_SHARE = 0.99
WRITES_WAIT = 15.0  # seconds to wait for the writer (it flushes every 0.5 s)

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
    # Issue 17: Claude Code's calls to an Anthropic provider cost no more than chat ones.
    ("messages pass-through added p50 vs chat pass-through at c1", "messages_vs_chat_p50_ms_c1",
     "<=", 0, "ms"),
    # Issue 18: the request log and spend tracking (production, medians over the rounds).
    *(target for label, _, slug in DATABASE_ON if slug for target in (
        (f"database on ({label}): req/s at c16 / database off's", f"db_{slug}_rps_share_c16",
         ">=", 0.9, "x"),
        (f"database on ({label}): p50 at c1 - database off's", f"db_{slug}_added_p50_ms_c1",
         "<=", 0.1, "ms"))),
)


def add_arguments(p) -> None:
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured run (10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each (2)")
    p.add_argument("--scenarios", type=cli.names(SCENARIOS), default=None,
                   help=f"comma-separated, from: {', '.join(SCENARIOS)} (default: all but the "
                        "front ends' prod- variants)")
    p.add_argument("--connections", type=lambda v: [int(c) for c in v.split(",")],
                   default=[1, 16], help="wrk concurrency levels (1,16)")
    p.add_argument("--threads", type=int, default=64,
                   help="waitress threads of the proxy (64; the production rows use 256)")
    p.add_argument("--smoke", action="store_true",
                   help="one 1 s run at c1, no warm-up, of passthrough (or the --scenarios "
                        "named): does the bench work?")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each run, wait up to this long for an idle machine")
    p.add_argument("--retries", type=int, default=0,
                   help="run a *shared* row again, at most this often (0-5), keeping the cleanest")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the scenarios this often (1-10), in turn: medians and spread")
    p.add_argument("--one-proxy", action="store_true",
                   help="one proxy for every scenario chosen (each by a model and provider of "
                        "its own): they differ only by their path through it")


def configure(p, args) -> None:
    if args.smoke:  # the scenarios named, else pass-through
        args.duration, args.warmup, args.connections = 1.0, 0, [1]
        args.scenarios, args.rounds = args.scenarios or ["passthrough"], 1
    args.scenarios = args.scenarios or list(DEFAULT_SCENARIOS)
    proxied = [SCENARIOS[n] for n in args.scenarios if SCENARIOS[n].providers is not None]
    if args.one_proxy and (not proxied or len({s.profile() for s in proxied}) > 1):
        p.error("--one-proxy: the scenarios must share one proxy's profile and settings (e.g. "
                "passthrough with messages-passthrough, not with prod-passthrough or cachehit)")


def measure(args, procs, tmp) -> dict:
    """Every chosen scenario at every concurrency: the raw numbers and the targets."""
    rows, memory, writes, traces = [], {}, [], []
    upstream = collector = None
    with contextlib.ExitStack() as cleanup:  # the PostgreSQL databases made, dropped at the end
        if any(SCENARIOS[s].needs_upstream for s in args.scenarios):
            upstream = services.start_nginx(procs, tmp)
        if any(SCENARIOS[s].traces is not None for s in args.scenarios):
            collector, _ = services.start_upstream(procs, tmp, "otlp", lifetime=24 * 3600)
        shared = (_one_proxy(args, procs, tmp, upstream, cleanup, collector) if args.one_proxy
                  else None)
        if shared:
            memory["one proxy"] = {"idle_rss_mb": _rss_mb(shared[0].process.pid)}
        for round_ in range(1, args.rounds + 1):
            # Every other round in reverse order: a drift of the machine's speed within a round
            # then favours no scenario over the one measured next to it.
            for name in args.scenarios if round_ % 2 else reversed(args.scenarios):
                rows += _measure_scenario(args, procs, tmp, SCENARIOS[name], upstream, memory,
                                          writes, round_, shared, collector, traces)
        if shared:
            memory["one proxy"]["loaded_rss_mb"] = _rss_mb(shared[0].process.pid)
            chosen = [SCENARIOS[n] for n in args.scenarios if SCENARIOS[n].providers is not None]
            sent = len(chosen) * args.rounds + sum(  # one request before each load, then wrk's
                r["sent"] for r in rows if SCENARIOS[r["scenario"]].providers is not None)
            written = _check_writes(shared[0], chosen[0], sent)
            if written:
                writes.append({"scenario": "one proxy", "round": "all", **written})
    summary = _summary(rows, memory)
    return {"settings": {"duration_s": args.duration, "warmup_s": args.warmup,
                         "threads": args.threads, "rounds": args.rounds,
                         "one_proxy": args.one_proxy},
            "rows": rows, "memory": memory, "writes": writes, "traces": traces,
            "medians": _medians(rows), "summary": summary, "targets": _targets(summary),
            "pass": not any(row["errors"] for row in rows)
            and all(w["complete"] for w in writes) and all(t["exports"] for t in traces)}


def _own_model(scenario) -> str:
    return f"bench-{scenario.name}"


def _one_proxy(args, procs, tmp, upstream, cleanup, collector=None):
    """``--one-proxy``: one proxy serving every chosen scenario, each by a model of its own
    from a provider of its own, so the scenarios compared differ only by their path through
    the proxy, not by the process (each start of a proxy lands a few % faster or slower).
    (proxy, the key a scenario's ``BENCH_KEY`` stands for)."""
    chosen = [SCENARIOS[n] for n in args.scenarios if SCENARIOS[n].providers is not None]
    providers = [{**provider, "name": f"{s.name}-{i}", "models": [_own_model(s)]}
                 for s in chosen for i, provider in enumerate(s.providers(upstream))]
    return _start_proxy(args, procs, tmp, "one-proxy", chosen[0], providers, cleanup, collector)


def _start_proxy(args, procs, tmp, name, scenario, providers, cleanup, collector=None):
    """A proxy for ``scenario``'s profile and database (a PostgreSQL one made for it, dropped
    by ``cleanup``), tracing to ``collector`` when the scenario traces, and the key its load
    goes through: (proxy, key)."""
    env = {**scenario.proxy_env, "ADMIN_API_KEY": ADMIN_KEY}
    if scenario.traces is not None:  # the standard variables, as an operator would set them
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=collector,
                   OTEL_TRACES_SAMPLER_ARG=str(scenario.traces))
    if scenario.database == "off":
        env["DATABASE_ENABLED"] = "false"
    elif scenario.database == "postgresql":
        env["DATABASE_URL"] = cleanup.enter_context(services.postgres_database())
    proxy = services.start_proxy(procs, tmp, name, providers, threads=args.threads, env=env,
                                 config=scenario.proxy_config, source=args.source)
    if scenario.key != "database":
        return proxy, BENCH_KEY
    return proxy, services.create_key(proxy.url, ADMIN_KEY, DATABASE_KEY)


def _with_key(scenario, key):
    """``scenario`` with ``key`` in place of ``BENCH_KEY`` in its headers."""
    if key == BENCH_KEY:
        return scenario
    return dataclasses.replace(scenario, headers={
        name: value.replace(BENCH_KEY, key) for name, value in scenario.headers.items()})


def _check_writes(proxy, scenario, sent) -> dict | None:
    """After the load: the rows the proxy's database holds (its spend table's request count,
    one per request log row) against the requests sent, waiting for the writer to catch up
    (bounded). None with the database off."""
    if scenario.database == "off":
        return None
    deadline = time.monotonic() + WRITES_WAIT
    while True:
        counts = services.store_counts(proxy.url, ADMIN_KEY)
        settled = counts["queued"] == 0 and counts["spend_requests"] >= sent * WRITTEN_SHARE
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    complete = counts["spend_requests"] >= sent * WRITTEN_SHARE and not counts["dropped"]
    if not complete:
        report.progress(f"{scenario.name}: **{counts['spend_requests']} rows written for "
                        f"{sent} requests sent** ({counts['dropped']} dropped)")
    made_by = "POST /admin/keys" if scenario.key == "database" else "PROXY_API_KEYS"
    return {"database": counts["backend"] or scenario.database, "key": made_by,
            "sent": sent, **counts, "complete": complete}


def _measure_scenario(args, procs, tmp, scenario, upstream, memory, writes, round_,
                      shared=None, collector=None, traces=None) -> list[dict]:
    """One scenario at every concurrency, with a fresh proxy (or ``shared``, asked for the
    scenario's own model); the RSS of a fresh one (the highest over the rounds) noted in
    ``memory``, the rows its database wrote in ``writes``, what a traced one sent to the
    ``collector`` in ``traces``."""
    name, proxy, url = scenario.name, None, upstream
    received = (services.collector_counts(collector)
                if scenario.traces is not None and shared is None else None)
    with contextlib.ExitStack() as cleanup:  # its PostgreSQL database, dropped after
        if shared is not None and scenario.providers is not None:
            proxy, key = shared
            scenario = dataclasses.replace(_with_key(scenario, key), body={
                **scenario.body, "model": _own_model(scenario)})
            url = proxy.url
        elif scenario.providers is not None:
            proxy, key = _start_proxy(args, procs, tmp, name, scenario,
                                      scenario.providers(upstream), cleanup, collector)
            scenario, url = _with_key(scenario, key), proxy.url
        target = url + scenario.path
        services.check_answer(target, scenario.body, headers=scenario.headers,
                              expect=scenario.expect)  # and for RSS
        idle = _rss_mb(proxy.process.pid) if proxy else None
        script = services.write_wrk_script(tmp, name, scenario.body, headers=scenario.headers)
        rows = [{**_measure_row(args, procs, scenario, proxy, target, script, c),
                 "round": round_} for c in args.connections]
        if proxy and shared is None:
            seen = memory.setdefault(name, {"idle_rss_mb": 0, "loaded_rss_mb": 0})
            seen["idle_rss_mb"] = max(seen["idle_rss_mb"], idle)
            seen["loaded_rss_mb"] = max(seen["loaded_rss_mb"], _rss_mb(proxy.process.pid))
            written = _check_writes(proxy, scenario, 1 + sum(r["sent"] for r in rows))
            if written:
                writes.append({"scenario": name, "round": round_, **written})
            procs.stop(proxy.process)  # a graceful stop: its last spans are sent
            if received is not None:
                traces.append(_traces_sent(collector, received, name, round_, rows))
    return rows


def _traces_sent(collector, before, name, round_, rows) -> dict:
    """What a traced proxy sent the receiver from its start to its stop (graceful, so its
    last spans went too): a traced run that exported nothing measured nothing."""
    after = services.collector_counts(collector)
    sent = {key: after[key] - before[key] for key in ("exports", "bytes")}
    if not sent["exports"]:
        report.progress(f"{name}: **no traces reached the OTLP receiver**")
    return {"scenario": name, "round": round_, "requests": 1 + sum(r["sent"] for r in rows),
            **sent}


def _measure_row(args, procs, scenario, proxy, target, script, connections) -> dict:
    """Warm up, then one measured wrk run; again (bounded) while other work shared the CPU.
    ``sent``: every request these runs had answered (warm-ups, retries and the diagnostic run
    included), what the proxy's request log must hold for them."""
    best, sent = None, 0
    for attempt in range(args.retries + 1):
        machine.wait_quiet(args.wait_quiet)
        report.progress(f"{scenario.name} c={connections}: {args.warmup:g} s warm-up, "
                        f"{args.duration:g} s run" + (f" (retry {attempt})" if attempt else ""))
        if args.warmup:
            sent += services.run_wrk(target, script, connections=connections,
                                     seconds=args.warmup)["requests"]
        with machine.cpu_meter(proxy.process.pid if proxy else None, procs) as cpu:
            raw = services.run_wrk(target, script, connections=connections,
                                   seconds=args.duration)
        sent += raw["requests"]
        row = _row(scenario, connections, raw, cpu)
        if best is None or row["others_cpu_pct"] < best["others_cpu_pct"]:
            best = row
        if not machine.shared(best):
            break
    if proxy is not None and proxy.process.poll() is not None:
        raise RuntimeError(f"the proxy of {scenario.name} died (exit code "
                           f"{proxy.process.poll()}); its log ends:\n"
                           f"{services.tail(proxy.log, 30)}")
    if best["errors"]:
        script = services.write_wrk_script(os.path.dirname(script), scenario.name,
                                           scenario.body, headers=scenario.headers,
                                           count=True)
        diagnostic = services.run_wrk(target, script, connections=connections, seconds=2)
        best["failure_sample"] = diagnostic["statuses"]
        sent += diagnostic["requests"]
        report.progress(f"{scenario.name} c={connections} had {best['errors']} errors; statuses"
                        f" in a 2 s diagnostic run: {best['failure_sample']}")
    return {**best, "sent": sent}


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


def _medians(rows) -> list[dict]:
    """Per scenario and concurrency: the median of each figure over the rounds, and its range."""
    out = {}
    for r in rows:
        out.setdefault((r["scenario"], r["connections"]), []).append(r)
    return [{"scenario": name, "connections": c, "rounds": len(runs),
             **{k: round(statistics.median(r[k] for r in runs), 3)
                for k in ("rps", "p50_ms", "p99_ms")},
             **{f"{k}_range": [min(r[k] for r in runs), max(r[k] for r in runs)]
                for k in ("rps", "p50_ms", "p99_ms")}}
            for (name, c), runs in out.items()]


def paired_p50_difference(rows, name, reference, connections=1):
    """``name``'s p50 less ``reference``'s, round by round (each pair measured one after the
    other): (median, [lowest, highest]) in ms, or None when either was not run."""
    def p50s(scenario):
        return {r["round"]: r["p50_ms"] for r in rows
                if r["scenario"] == scenario and r["connections"] == connections}
    mine, theirs = p50s(name), p50s(reference)
    differences = [mine[k] - theirs[k] for k in mine if k in theirs]
    if not differences:
        return None
    return (round(statistics.median(differences), 3),
            [round(min(differences), 3), round(max(differences), 3)])


def _summary(rows, memory) -> dict:
    medians = _medians(rows)

    def find(name, c):  # the median over the rounds
        return next((m for m in medians if m["scenario"] == name and m["connections"] == c), {})
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
            "messages_vs_chat_p50_ms_c1": (paired_p50_difference(
                rows, "messages-passthrough", "passthrough") or (None,))[0],
            "idle_rss_mb": memory.get("passthrough", memory.get("mock", {})).get("idle_rss_mb"),
            **_database_summary(find)}


def _database_summary(find) -> dict:
    """Issue 18's two checks per database: its req/s at c16 as a share of the database off's,
    and its p50 at c1 less the database off's (medians over the rounds)."""
    off16, off1 = find(DATABASE_OFF, 16).get("rps"), find(DATABASE_OFF, 1).get("p50_ms")
    out = {}
    for _, name, slug in DATABASE_ON:
        if slug is None:
            continue
        on16, on1 = find(name, 16).get("rps"), find(name, 1).get("p50_ms")
        out[f"db_{slug}_rps_share_c16"] = (round(on16 / off16, 3) if on16 and off16
                                           else None)
        out[f"db_{slug}_added_p50_ms_c1"] = (round(on1 - off1, 3) if on1 is not None
                                             and off1 is not None else None)
    return out


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
    rounds = s.get("rounds", 1)
    lines = [f"- settings: {s['duration_s']:g} s runs after {s['warmup_s']:g} s warm-up; "
             f"waitress threads {s['threads']}; proxy on core {services.PROXY_CORE}, nginx and "
             f"wrk on core {services.LOAD_CORE}"
             + (f"; {rounds} rounds, the scenarios in turn (every other round reversed)"
                if rounds > 1 else "")
             + ("; one proxy for every scenario, each by its own model `bench-<scenario>`"
                if s.get("one_proxy") else ""),
             "", "| " + ("round | " if rounds > 1 else "") + "scenario | path | conc. | req/s | "
             "p50 ms | p99 ms | non-2xx | errors | proxy CPU | other processes CPU | steal |",
             "| " + ("---: | " if rounds > 1 else "") + "--- | --- | ---: | ---: | ---: | ---: | "
             "---: | ---: | ---: | ---: | ---: |"]
    for r in rep["rows"]:
        flag = " **FLAGGED: errors**" if r["errors"] else ""
        flag += " *(shared)*" if machine.shared(r) else ""
        cpu = "-" if r["proxy_cpu_pct"] is None else f"{r['proxy_cpu_pct']:.0f}%"
        lines.append("| " + (f"{r['round']} | " if rounds > 1 else "") +
                     f"{r['scenario']}{flag} | {r['title']} | {r['connections']} | "
                     f"{r['rps']:,.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['non_2xx']} |"
                     f" {r['errors']} | {cpu} | {r['others_cpu_pct']:.0f}% |"
                     f" {r['steal_pct']:.0f}% |")
    for r in rep["rows"]:
        for status, seen in r.get("failure_sample", {}).items():
            if seen["example"]:
                lines.append(f"\n**FLAGGED** {r['scenario']} c{r['connections']}: in a 2 s "
                             f"diagnostic run, {seen['count']} x {status}: `{seen['example']}`")
    lines += report.shared_note(rep["rows"])
    if rounds > 1:
        lines += ["", f"Medians over the {rounds} rounds (lowest - highest):", "",
                  "| scenario | conc. | req/s | p50 ms | p99 ms |", "| --- | ---: | ---: | ---: | ---: |"]
        for m in rep["medians"]:
            lines.append(f"| {m['scenario']} | {m['connections']} | {_spread(m, 'rps', ',.0f')} | "
                         f"{_spread(m, 'p50_ms', '.3f')} | {_spread(m, 'p99_ms', '.3f')} |")
    lines += _front_end_lines(rep)
    lines += _database_lines(rep)
    lines += _tracing_lines(rep)
    lines += _writes_lines(rep)
    lines += ["", "| proxy | idle RSS MB | RSS after load MB |", "| --- | ---: | ---: |"]
    for name, mem in rep["memory"].items():
        lines.append(f"| {name} | {mem['idle_rss_mb']} | {mem.get('loaded_rss_mb', '-')} |")
    return lines


def _against_lines(rep, pairs, baseline: str) -> list[str]:
    """A table row per (label, scenario) of ``pairs`` against ``baseline``, measured in the same
    run: req/s at c16 as a share of the baseline's, and p50 at c1 less its (medians; and round
    by round, the median of the differences and their range)."""
    def median(name, c):
        return next((m for m in rep["medians"]
                     if m["scenario"] == name and m["connections"] == c), None)
    lines = []
    for label, name in pairs:
        on16, off16 = median(name, 16), median(baseline, 16)
        on1, off1 = median(name, 1), median(baseline, 1)
        if not ((on16 and off16) or (on1 and off1)):
            continue
        share = (f"{on16['rps']:,.0f} / {off16['rps']:,.0f} = {on16['rps'] / off16['rps']:.1%}"
                 if on16 and off16 else "-")
        added = paired = "-"
        if on1 and off1:
            added = (f"{on1['p50_ms']:.3f} - {off1['p50_ms']:.3f} = "
                     f"{on1['p50_ms'] - off1['p50_ms']:+.3f}")
            difference, (low, high) = paired_p50_difference(rep["rows"], name, baseline)
            paired = f"{difference:+.3f} ({low:+.3f} - {high:+.3f})"
        lines.append(f"| {label} (`{name}`) | {share} | {added} | {paired} |")
    return lines


def _database_lines(rep) -> list[str]:
    """Each database-on scenario against the database off."""
    lines = _against_lines(rep, [(label, name) for label, name, _ in DATABASE_ON], DATABASE_OFF)
    if not lines:
        return []
    return ["", f"The database on against off (`{DATABASE_OFF}`, the configuration's key) in "
            "the same run, production profile: req/s at c16 and p50 at c1 (medians over the "
            "rounds), and p50 less the database off's round by round (median, lowest - "
            "highest). Targets: >= 90% and <= +0.1 ms.", "",
            "| database | req/s c16, on / off | p50 c1 ms, on - off | round by round |",
            "| --- | ---: | ---: | ---: |", *lines]


def _tracing_lines(rep) -> list[str]:
    """Tracing on (100% and 1% sampled) against off (``TRACING_OFF``), and what each traced
    proxy sent the OTLP receiver."""
    lines = _against_lines(rep, TRACED, TRACING_OFF)
    if not lines:
        return []
    lines = ["", f"Traces on against off (`{TRACING_OFF}`) in the same run, production profile: "
             "req/s at c16 and p50 at c1 (medians over the rounds), and p50 less tracing "
             "off's round by round (median, lowest - highest).", "",
             "| traces | req/s c16, on / off | p50 c1 ms, on - off | round by round |",
             "| --- | ---: | ---: | ---: |", *lines]
    sent = rep.get("traces") or []
    if sent:
        lines += ["", "What each traced proxy sent the discarding OTLP receiver, start to stop "
                  "(requests: wrk's answered requests, warm-ups included).", "",
                  "| scenario | round | requests | exports | KB |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {t['scenario']}{'' if t['exports'] else ' **FLAGGED: no traces**'} | "
                  f"{t['round']} | {t['requests']:,} | {t['exports']:,} | "
                  f"{t['bytes'] / 1024:,.0f} |" for t in sent]
    return lines


def _writes_lines(rep) -> list[str]:
    """What each proxy's database held after its load: a run whose request log wrote nothing
    measured nothing."""
    writes = rep.get("writes") or []
    if not writes:
        return []
    lines = ["", "Rows written: requests sent (wrk's answered requests, warm-ups included, and "
             "the one before the load) against the requests the database's spend table counts "
             "(one a request log row) and the writer's counts (`/health`).", "",
             "| scenario | round | database | key | sent | in the database | written | "
             "dropped | cost USD |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for w in writes:
        flag = "" if w["complete"] else " **FLAGGED: rows missing**"
        lines.append(f"| {w['scenario']}{flag} | {w['round']} | {w['database']} | {w['key']} | "
                     f"{w['sent']:,} | {w['spend_requests']:,} | {w['written']:,} | "
                     f"{w['dropped']:,} | {w['cost_usd']:.4f} |")
    return lines


def _spread(median, key, fmt) -> str:
    low, high = median[f"{key}_range"]
    if median["rounds"] == 1:
        return format(median[key], fmt)
    return f"{median[key]:{fmt}} ({low:{fmt}} - {high:{fmt}})"


def _front_end_lines(rep) -> list[str]:
    """Each front end against the chat pass-through of its profile, measured in the same run:
    p50 less chat's, round by round (its median and range), and req/s as a share of chat's."""
    lines = []
    for m in rep["medians"]:
        name, c = m["scenario"], m["connections"]
        base = name.removeprefix("prod-")
        if base not in {f[0] for f in FRONT_ENDS}:
            continue
        reference = "prod-passthrough" if name.startswith("prod-") else "passthrough"
        chat = next((x for x in rep["medians"]
                     if x["scenario"] == reference and x["connections"] == c), None)
        paired = paired_p50_difference(rep["rows"], name, reference, c)
        if chat is None or paired is None:
            continue
        difference, (low, high) = paired
        spread = f" ({low:+.3f} - {high:+.3f})" if low != high else ""
        lines.append(f"| {name} | {c} | {difference:+.3f}{spread} | "
                     f"{m['rps'] / chat['rps']:.1%} |")
    if not lines:
        return []
    return ["", "The front ends against the chat pass-through (`passthrough`, or "
            "`prod-passthrough` for a prod- row) of the same run: p50 less chat's, round by "
            "round (median, lowest - highest), and req/s as a share of chat's (medians).", "",
            "| front end | conc. | p50 - chat p50, ms | req/s / chat's |",
            "| --- | ---: | ---: | ---: |", *lines]
