"""Issue 20's table: every target as a ratio against a baseline measured in the same run.

Rounds, in turn (every other round reversed): nginx direct; the production proxy passing
through, answering from its cache, and on ``/v1/messages`` (an Anthropic upstream) and a
translated ``/v1/responses``; the floors of bench/floors (naive, tuned, ping); LiteLLM
(.venv/litellm); the cache hit with WORKERS=2 and 1. Each server is fresh each round, pinned to
core 0 (WORKERS=2: cores 0-1), nginx and wrk on core 1. A row whose other processes and steal
took over ``--busy-limit`` % of a core is measured again (``--retries``); a round still over
it is refused, left out of the medians, and run again (bounded). Then 512 paced streams
(``bench streaming --paced``), and the latest 30-minute soak from bench/results/soak.json.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import psutil

from bench import machine, report, run, services

TOOLS = ("nginx", "wrk", "taskset")
TITLE = "issue 20 targets"
OUTPUT = "targets"
QUICK = {"rounds": 2, "duration": 2.0, "warmup": 1.0}
LIMITS = {"rounds": (1, 10), "duration": (1, 60), "warmup": (0, 30), "retries": (0, 5),
          "busy_limit": (1, 200), "round_retries": (0, 5), "wait_quiet": (0, 120)}
FLOORS = os.path.join(services.BENCH, "floors")
LITELLM = os.path.join(services.BENCH, "litellm")
LITELLM_PYTHON = os.path.join(services.REPO, ".venv", "litellm", "bin", "python")
LITELLM_CONFIG = os.path.join(LITELLM, "proxy.yaml")
# LiteLLM offline: its model prices from the package, not fetched; no admin UI or docs.
LITELLM_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True",
               "DISABLE_ADMIN_UI": "True", "NO_DOCS": "True", "LITELLM_LOG": "ERROR"}
WORKERS_CONNECTIONS = 32  # two processes need more connections than 16 to keep both busy
STREAMS = 512


@dataclass
class Subject:
    """One server the load goes to: ``kind`` nginx, proxy (``scenario`` of bench/run.py),
    floor (``floor``: a program of bench/floors), litellm or workers (``workers`` processes,
    the production cache hit); measured at each of ``connections``."""
    name: str
    title: str
    kind: str
    connections: tuple = (1, 16)
    scenario: str = ""
    floor: str = ""
    workers: int = 0


SUBJECTS = (
    Subject("direct", "wrk -> nginx", "nginx"),
    Subject("prod-passthrough", "proxy -> nginx, production profile (database on)", "proxy",
            scenario="prod-passthrough"),
    Subject("prod-cachehit", "proxy cache hit, production profile", "proxy",
            scenario="prod-cachehit"),
    Subject("naive", "bench/floors/naive.py -> nginx (Flask, requests)", "floor", floor="naive"),
    Subject("tuned", "bench/floors/tuned.py -> nginx (Flask, urllib3, orjson)", "floor",
            floor="tuned"),
    Subject("ping", "bench/floors/ping.py (parse, hash, fixed answer)", "floor", floor="ping"),
    Subject("litellm", "LiteLLM proxy -> nginx (one worker)", "litellm", connections=(16,)),
    Subject("prod-messages-passthrough", "proxy /v1/messages -> nginx (anthropic provider), "
            "production profile", "proxy", connections=(16,),
            scenario="prod-messages-passthrough"),
    Subject("prod-responses-translated", "proxy /v1/responses -> nginx chat, production "
            "profile", "proxy", connections=(16,), scenario="prod-responses-translated"),
    Subject("workers-1", "proxy cache hit, production profile, WORKERS=1 on core 0",
            "workers", connections=(WORKERS_CONNECTIONS,), workers=1),
    Subject("workers-2", "proxy cache hit, production profile, WORKERS=2 on cores 0-1",
            "workers", connections=(WORKERS_CONNECTIONS,), workers=2),
)
SMOKE = ("naive", "tuned", "ping")


def add_arguments(p) -> None:
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measured run (5)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up before each (1)")
    p.add_argument("--retries", type=int, default=2,
                   help="measure a row again while the machine was busy, at most this often (2)")
    p.add_argument("--busy-limit", type=float, default=15.0, metavar="PCT",
                   help="other processes + steal, in %% of a core, above which a row is busy "
                        "and a round still busy after its retries is refused (15)")
    p.add_argument("--wait-quiet", type=float, default=10.0, metavar="SECONDS",
                   help="before a row's retry, wait up to this long for an idle machine (10)")
    p.add_argument("--round-retries", type=int, default=2,
                   help="rounds run again in place of refused ones, at most (2)")
    p.add_argument("--no-litellm", dest="litellm", action="store_false",
                   help="leave LiteLLM out (its target is then not measured)")
    p.add_argument("--no-streams", dest="streams", action="store_false",
                   help=f"leave the {STREAMS} paced streams out (not measured)")
    p.add_argument("--smoke", action="store_true",
                   help="one 1 s run at c1 of each floor, one round: do the floors work?")


def configure(p, args) -> None:
    args.threads = production_threads()  # the proxies', the floors' and LiteLLM's core's
    args.subjects = [s for s in SUBJECTS if args.litellm or s.kind != "litellm"]
    if args.smoke:
        args.subjects = [dataclasses.replace(s, connections=(1,)) for s in SUBJECTS
                         if s.name in SMOKE]
        args.rounds, args.duration, args.warmup, args.round_retries = 1, 1.0, 0, 0
        args.streams = False
    args.left_out = {}  # target number: why it is not measured
    if not args.litellm:
        args.left_out["4"] = "--no-litellm"
    elif not os.path.exists(LITELLM_PYTHON):  # the rest of the table still measured
        args.left_out["4"] = "LiteLLM not installed in .venv/litellm: make bench-litellm"
        args.subjects = [s for s in args.subjects if s.kind != "litellm"]


def measure(args, procs, tmp) -> dict:
    """The rounds, the streams, the soak's latest result; the targets from their medians."""
    upstream = services.start_nginx(procs, tmp)
    rounds, refused, memory, writes, egress = [], [], {}, [], []
    attempts = 0
    while len(rounds) < args.rounds and attempts < args.rounds + args.round_retries:
        attempts += 1
        rows, busy = [], None
        for subject in args.subjects if attempts % 2 else args.subjects[::-1]:
            rows += _measure_subject(args, procs, tmp, subject, upstream, attempts, memory,
                                     writes, egress)
            # A smoke asks whether it works, not how fast: it refuses nothing.
            if not args.smoke and any(_busy(r, args.busy_limit) for r in rows):
                busy = subject.name
                break  # refused already: no use measuring the rest of the round
        if busy:
            report.progress(f"round {attempts} refused: {busy} over {args.busy_limit:g}% of a "
                            "core busy after its retries")
            refused.append({"attempt": attempts, "rows": rows})
        else:
            rounds.append(rows)
    rows = [r for rows_ in rounds for r in rows_]
    medians = run._medians(rows)
    streams = _streams(args, tmp) if args.streams else None
    soak = latest_soak()
    targets = table(medians, memory, streams, soak, args)
    return {"settings": {"rounds": args.rounds, "duration_s": args.duration,
                         "warmup_s": args.warmup, "busy_limit_pct": args.busy_limit,
                         "retries": args.retries, "subjects": [s.name for s in args.subjects],
                         "threads": args.threads},
            "rows": rows, "refused": refused, "medians": medians, "memory": memory,
            "writes": writes, "egress": egress, "streams": streams, "soak": soak,
            "targets": targets,
            "pass": bool(rounds) and not any(r["errors"] for r in rows)
            and all(w["complete"] for w in writes) and not any(e["remote"] for e in egress)}


def _busy(row, limit) -> bool:
    return row["others_cpu_pct"] + row.get("steal_pct", 0) > limit


def _measure_subject(args, procs, tmp, subject, upstream, round_, memory, writes,
                     egress) -> list[dict]:
    """A fresh server for ``subject``, one row per concurrency, then the server stopped."""
    scenario, server = _scenario(subject), None
    if subject.kind == "proxy":
        server, key = run._start_proxy(args, procs, tmp, f"{subject.name}-{round_}",
                                       scenario, scenario.providers(upstream), None)
        scenario = run._with_key(scenario, key)
    elif subject.kind == "floor":
        server = _start_floor(procs, tmp, subject, upstream)
    elif subject.kind == "litellm":
        server = _start_litellm(procs, tmp, upstream, round_)
    elif subject.kind == "workers":
        server = _start_workers(args, procs, tmp, subject, upstream, round_)
    base = server.url if server else upstream
    services.check_answer(base + scenario.path, scenario.body, headers=scenario.headers,
                          expect=scenario.expect, timeout=30)
    if server and subject.kind == "proxy":
        seen = memory.setdefault(subject.name, {"idle_rss_mb": 0})
        seen["idle_rss_mb"] = max(seen["idle_rss_mb"], _rss_mb(server.process.pid))
    script = services.write_wrk_script(tmp, subject.name, scenario.body,
                                       headers=scenario.headers)
    rows = [{**_measure_row(args, procs, subject, server, base + scenario.path, script, c),
             "round": round_} for c in subject.connections]
    if subject.kind == "litellm":
        egress.append({"round": round_, "remote": _remote_connections(server.process.pid)})
    if subject.kind == "proxy":
        written = run._check_writes(server, scenario, 1 + sum(r["sent"] for r in rows))
        if written:
            writes.append({"scenario": subject.name, "round": round_, **written})
    if server:
        procs.stop(server.process)
    return rows


def production_threads() -> int:
    """The production profile's waitress threads, as settings.py ships them."""
    from settings import PRODUCTION_PROFILE
    return PRODUCTION_PROFILE["server"]["threads"]


def _scenario(subject) -> run.Scenario:
    """What wrk sends ``subject`` and what its first answer must be: a proxy's scenario of
    bench/run.py (the profile's own thread count, not run.py's fixed one), else the chat body
    with the bench's key."""
    if subject.kind == "proxy":
        scenario = run.SCENARIOS[subject.scenario]
        return dataclasses.replace(scenario, proxy_env={
            k: v for k, v in scenario.proxy_env.items() if k != "THREADS"})
    if subject.kind == "workers":
        return run.SCENARIOS["prod-cachehit"]
    return run.Scenario(subject.name, subject.title, headers=run.BENCH_AUTH)


def _measure_row(args, procs, subject, server, target, script, connections) -> dict:
    """Warm up, then a measured wrk run; again (``--retries``) while the machine was busy,
    keeping the least busy. ``sent``: every answered request, what a request log must hold."""
    best, sent = None, 0
    pid = server.process.pid if server else None
    for attempt in range(args.retries + 1):
        if attempt:  # another session's burst passes in seconds: let it, rather than retry into it
            machine.wait_quiet(args.wait_quiet)
        report.progress(f"{subject.name} c={connections}: {args.warmup:g} s warm-up, "
                        f"{args.duration:g} s run" + (f" (retry {attempt}: {_load(best):.0f}% "
                                                      "of a core busy)" if attempt else ""))
        if args.warmup:
            sent += services.run_wrk(target, script, connections=connections,
                                     seconds=args.warmup)["requests"]
        with machine.cpu_meter(pid, procs) as cpu:
            raw = services.run_wrk(target, script, connections=connections,
                                   seconds=args.duration)
        sent += raw["requests"]
        seconds = raw["duration_us"] / 1e6
        row = {"subject": subject.name, "scenario": subject.name, "connections": connections,
               "rps": round(raw["requests"] / seconds, 1), "p50_ms": raw["p50_us"] / 1000,
               "p99_ms": raw["p99_us"] / 1000, "requests": raw["requests"],
               "errors": services.wrk_errors(raw), **cpu}
        if pid is None:
            row["proxy_cpu_pct"] = None
        if best is None or _load(row) < _load(best):
            best = row
        if not _busy(best, args.busy_limit):
            break
    if server and server.process.poll() is not None:
        raise RuntimeError(f"{subject.name} died (exit code {server.process.poll()}); its log "
                           f"ends:\n{services.tail(server.log, 30)}")
    return {**best, "sent": sent}


def _load(row) -> float:
    return row["others_cpu_pct"] + row.get("steal_pct", 0)


def _rss_mb(pid) -> float:
    return round(psutil.Process(pid).memory_info().rss / 1024 / 1024, 1)


def _start_floor(procs, tmp, subject, upstream) -> services.Proxy:
    """``python bench/floors/<floor>.py PORT THREADS [UPSTREAM]`` on the proxy's core, with the
    production profile's thread count."""
    port = services.free_port()
    argv = ["taskset", "-c", services.PROXY_CORE, sys.executable,
            os.path.join(FLOORS, f"{subject.floor}.py"), str(port), str(production_threads())]
    if subject.floor != "ping":
        argv.append(upstream)
    log = os.path.join(tmp, f"floor-{subject.floor}.log")
    process = procs.start(argv, log_path=log, cwd=services.REPO)
    url = f"http://127.0.0.1:{port}"
    services.wait_ready(process, url + "/ready", log)
    return services.Proxy(process, url, log)


def _start_litellm(procs, tmp, upstream, round_) -> services.Proxy:
    """LiteLLM's proxy (one uvicorn worker) on the proxy's core, bench/litellm/proxy.yaml's
    model at nginx, offline (``LITELLM_ENV``), the bench's key as its master key, no database."""
    port = services.free_port()
    log = os.path.join(tmp, f"litellm-{round_}.log")
    env = {**os.environ, **LITELLM_ENV, "BENCH_UPSTREAM": upstream + "/v1",
           "LITELLM_MASTER_KEY": run.BENCH_KEY,  # the key the load sends, checked as ours is
           "HOME": tmp}  # anything it caches goes to the run's temporary directory
    argv = ["taskset", "-c", services.PROXY_CORE, LITELLM_PYTHON, "-m", "litellm.proxy.proxy_cli",
            "--config", LITELLM_CONFIG, "--host", "127.0.0.1",
            "--port", str(port), "--num_workers", "1"]
    process = procs.start(argv, log_path=log, env=env, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    services.wait_ready(process, url + "/health/liveliness", log, timeout=90)
    return services.Proxy(process, url, log)


def _remote_connections(pid) -> list[str]:
    """The sockets of ``pid`` and its children to anything but loopback (should be none)."""
    found = []
    try:
        parent = psutil.Process(pid)
        for p in [parent, *parent.children(recursive=True)]:
            for c in p.net_connections(kind="inet"):
                if c.raddr and not c.raddr.ip.startswith(("127.", "::1", "::ffff:127.")):
                    found.append(f"{c.raddr.ip}:{c.raddr.port}")
    except psutil.Error:
        pass
    return found


def _start_workers(args, procs, tmp, subject, upstream, round_) -> services.Proxy:
    """The production proxy with ``WORKERS`` processes, the cache on, the key from
    PROXY_API_KEYS (bench/scaleout.py's set-up with the production profile). Two workers get
    both cores, each pinned to one by the supervisor (``server.pin_workers``), the second
    sharing its core with nginx and wrk; one gets the proxy's core alone: one process free on
    two cores served 2.7x less here (408-450 against 1,167-1,206 req/s, c32, interleaved), its
    threads handing the GIL across cores, so that would not be the baseline to beat."""
    scenario = run.SCENARIOS["prod-cachehit"]
    env = {**run.PRODUCTION_ENV, "WORKERS": str(subject.workers), "LOG_LEVEL": "WARNING",
           "ADMIN_API_KEY": run.ADMIN_KEY, "THREADS": str(args.threads)}
    config = {**scenario.proxy_config, "providers": scenario.providers(upstream)}
    proxy = services.start_proxy_env(procs, tmp, f"{subject.name}-{round_}", config, env=env,
                                     source=args.source, cores=services.PROXY_CORE
                                     if subject.workers == 1
                                     else f"{services.PROXY_CORE},{services.LOAD_CORE}")
    target = proxy.url + scenario.path
    time.sleep(1.0 if subject.workers > 1 else 0.2)  # every worker listening (as scaleout)
    # Each worker answers from its own cache: warm every one (the kernel spreads connections).
    services.run_wrk(target, services.write_wrk_script(tmp, subject.name, scenario.body,
                                                       headers=run.BENCH_AUTH),
                     connections=WORKERS_CONNECTIONS, seconds=1)
    return proxy


def _streams(args, tmp) -> dict:
    """Target 6 from ``python -m bench streaming --paced`` at 512 streams (its own process: it
    starts its own upstream and proxy): its targets, or why it measured nothing."""
    import json
    import subprocess
    output = os.path.join(tmp, "streams")
    argv = [sys.executable, "-m", "bench", "streaming", "--paced", "--paced-ramp", str(STREAMS),
            "--no-setup", "--wait-quiet", "0", "--source", args.source, "--output", output]
    report.progress(f"{STREAMS} paced streams: {' '.join(argv[1:])}")
    try:
        done = subprocess.run(argv, cwd=services.REPO, capture_output=True, text=True,
                              timeout=600)
        with open(output + ".json") as f:
            found = json.load(f)
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:
        return {"command": " ".join(argv[1:]), "error": f"not measured: {e}"[:500]}
    return {"command": "python " + " ".join(argv[1:-2]), "exit": done.returncode,
            "targets": found.get("targets", []), "rows": found.get("paced", {}).get("rows", [])}


def latest_soak(path=None) -> dict | None:
    """The last 30-minute soak (``python -m bench soak``, bench/results/soak.json): its date,
    the code it ran, RSS growth and checks; None when there is none."""
    import json
    path = path or os.path.join(services.RESULTS, "soak.json")
    try:
        with open(path) as f:
            soak = json.load(f)
    except (OSError, ValueError):
        return None
    source = soak.get("source")
    if not source:  # older reports: the commit only in the .md's header
        try:
            with open(path[:-len(".json")] + ".md") as f:
                source = next((line.split(": ", 1)[1].strip() for line in f
                               if line.startswith("- proxy code:")), "")
        except OSError:
            source = ""
    idle = [t["result"] == "PASS" for t in soak.get("targets") or ()
            if t["target"].startswith(("threads", "open fds"))]  # the soak's other checks
    return {"date": soak.get("date"), "source": source, "minutes": soak.get("load_seconds", 0)
            / 60, "rss_growth": soak.get("rss_growth"), "back_to_idle": all(idle) if idle
            else None, "idle_rss_mb": (soak.get("idle") or {}).get("rss_mb")}


def _find(medians, name, connections) -> dict:
    return next((m for m in medians if m["scenario"] == name
                 and m["connections"] == connections), {})


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


# (target, label, measured as, comparison, limit)
RATIOS = (
    ("1", "pass-through req/s c16 / naive floor's", "x", ">=", 1.3),
    ("1", "pass-through req/s c16 / tuned floor's", "x", ">=", 0.9),
    ("2", "added p50 c1 over nginx / naive floor's added p50", "x", "<=", 0.8),
    ("3", "cache hit req/s c16 / ping floor's", "x", ">=", 0.75),
    ("3", "cache hit p50 c1 / ping floor's", "x", "<=", 1.3),
    ("4", "pass-through req/s c16 / LiteLLM's", "x", ">=", 20),
    ("5", "/v1/messages pass-through req/s c16 / chat pass-through's", "x", ">=", 0.9),
    ("5", "translated /v1/responses req/s c16 / chat pass-through's", "x", ">=", 0.9),
    ("7", f"cache hit req/s c{WORKERS_CONNECTIONS}, WORKERS=2 / WORKERS=1", "x", ">=", 1.6),
    ("8", "idle RSS, production profile (highest over the rounds)", "MB", "<=", 60),
    ("9", "pass-through p99 / p50 at c16", "x", "<=", 3),
)


def ratios(medians, memory) -> list:
    """The measured value of each of ``RATIOS`` (None: a side not measured), from the medians
    over the rounds, with what it was computed from."""
    def f(name, c, key):
        return _find(medians, name, c).get(key)
    prod16, naive16 = f("prod-passthrough", 16, "rps"), f("naive", 16, "rps")
    direct1 = f("direct", 1, "p50_ms")
    prod_added = _minus(f("prod-passthrough", 1, "p50_ms"), direct1)
    naive_added = _minus(f("naive", 1, "p50_ms"), direct1)
    hit16, ping16 = f("prod-cachehit", 16, "rps"), f("ping", 16, "rps")
    hit1, ping1 = f("prod-cachehit", 1, "p50_ms"), f("ping", 1, "p50_ms")
    w = WORKERS_CONNECTIONS
    pairs = [
        (prod16, naive16), (prod16, f("tuned", 16, "rps")), (prod_added, naive_added),
        (hit16, ping16), (hit1, ping1), (prod16, f("litellm", 16, "rps")),
        (f("prod-messages-passthrough", 16, "rps"), prod16),
        (f("prod-responses-translated", 16, "rps"), prod16),
        (f("workers-2", w, "rps"), f("workers-1", w, "rps"))]
    out = [(_ratio(a, b), f"{_fmt(a)} / {_fmt(b)}") for a, b in pairs]
    rss = memory.get("prod-passthrough", {}).get("idle_rss_mb")
    out.append((rss, f"{rss} MB" if rss is not None else "-"))
    p99, p50 = f("prod-passthrough", 16, "p99_ms"), f("prod-passthrough", 16, "p50_ms")
    out.append((_ratio(p99, p50), f"{_fmt(p99)} / {_fmt(p50)} ms"))
    return out


def _minus(a, b):
    return round(a - b, 3) if a is not None and b is not None else None


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3f}"


def table(medians, memory, streams, soak, args) -> list[dict]:
    """Every target of the issue: its measured ratio and PASS/MISS, or why it is not
    measured, in the issue's order."""
    out = []
    for (number, label, unit, op, limit), (value, basis) in zip(RATIOS, ratios(medians,
                                                                                 memory)):
        name = f"{number}. {label}"
        if value is None:
            why = args.left_out.get(number) or (basis if medians else
                                                "no round accepted: the machine stayed busy")
            out.append(report.target(name, f"not measured ({why})", f"{op} {limit:g} {unit}",
                                     None))
            continue
        ok = value >= limit if op == ">=" else value <= limit
        out.append(report.target(name, f"{value:g} {unit} ({basis})", f"{op} {limit:g} {unit}",
                                 ok))
    out += _stream_targets(streams) + _soak_targets(soak)
    return sorted(out, key=lambda t: int(t["target"].split(".")[0]))


def _stream_targets(streams) -> list[dict]:
    if not streams or streams.get("error") or not streams.get("targets"):
        why = "not measured" + (f": {streams['error']}" if streams and streams.get("error")
                                else " (--no-streams)" if not streams else "")
        return [report.target(f"6. {STREAMS} paced streams (bench streaming --paced)", why,
                              "all complete; gap p99 <= pace + 25 ms; first p99 <= +50 ms",
                              None)]
    return [{**t, "target": f"6. {t['target']}"} for t in streams["targets"]]


def _soak_targets(soak) -> list[dict]:
    if soak is None:
        return [report.target("8. RSS growth over a 30-minute soak", "not measured (no "
                              "bench/results/soak.json)", "< 5%", None)]
    growth = soak["rss_growth"]
    where = f"soak of {soak['date']}, {soak['source']}, {soak['minutes']:.0f} min"
    return [report.target("8. RSS growth, minute 5 to the end of the soak "
                          "(latest `python -m bench soak`, not rerun)",
                          f"{growth:.1%} ({where})" if growth is not None else where, "< 5%",
                          None if growth is None else growth < 0.05),
            report.target("8. the soak's threads and fds back to idle",
                          {True: "all back", False: "not all back (see soak.md)",
                           None: "not measured"}[soak["back_to_idle"]], "all",
                          soak["back_to_idle"])]


def render(rep) -> list[str]:
    """The rows of each round, the medians, what was refused, then (by cli) the targets."""
    s = rep["settings"]
    lines = [f"- settings: {s['rounds']} rounds of {s['duration_s']:g} s runs after "
             f"{s['warmup_s']:g} s warm-up, the subjects in turn (every other round reversed); "
             f"each server fresh each round; proxy and floors pinned to core "
             f"{services.PROXY_CORE} with {s['threads']} waitress threads (the production "
             f"profile's), WORKERS=2 on cores {services.PROXY_CORE}-{services.LOAD_CORE}; "
             f"nginx and wrk on core {services.LOAD_CORE}; a round with a row whose other "
             f"processes + steal stayed over {s['busy_limit_pct']:g}% of a core is refused",
             "", "| round | subject | conc. | req/s | p50 ms | p99 ms | errors | server CPU | "
             "others CPU | steal |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | "
             "---: | ---: |"]
    refused = [{**r, "round": f"{r['round']} refused"} for x in rep["refused"] for r in x["rows"]]
    for r in rep["rows"] + refused:
        cpu = "-" if r["proxy_cpu_pct"] is None else f"{r['proxy_cpu_pct']:.0f}%"
        lines.append(f"| {r['round']} | {r['subject']} | {r['connections']} | {r['rps']:,.0f} | "
                     f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['errors']} | {cpu} | "
                     f"{r['others_cpu_pct']:.0f}% | {r['steal_pct']:.0f}% |")
    for refused in rep["refused"]:
        busy = max(_load(r) for r in refused["rows"])
        lines.append(f"\nRefused: round attempt {refused['attempt']} (a row at {busy:.0f}% of a "
                     "core busy after its retries); its rows are left out.")
    lines += ["", "Medians over the rounds (lowest - highest):", "",
              "| subject | conc. | req/s | p50 ms | p99 ms |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for m in rep["medians"]:
        lines.append(f"| {m['scenario']} | {m['connections']} | {run._spread(m, 'rps', ',.0f')}"
                     f" | {run._spread(m, 'p50_ms', '.3f')} | {run._spread(m, 'p99_ms', '.3f')} |")
    lines += ["", "| proxy | idle RSS MB (highest) |", "| --- | ---: |",
              *(f"| {name} | {m['idle_rss_mb']} |" for name, m in rep["memory"].items())]
    for w in rep["writes"]:
        if not w["complete"]:
            lines.append(f"\n**FLAGGED** {w['scenario']} round {w['round']}: "
                         f"{w['spend_requests']} rows written for {w['sent']} requests")
    for e in rep["egress"]:
        if e["remote"]:
            lines.append(f"\n**FLAGGED** LiteLLM round {e['round']} held connections beyond "
                         f"loopback: {', '.join(e['remote'])}")
    if rep["streams"]:
        lines.append(f"\n{STREAMS} paced streams: `{rep['streams'].get('command')}`")
    return lines
