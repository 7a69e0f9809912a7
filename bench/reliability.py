"""The reliability benchmark: does fallback hide a failing primary provider from clients?

``python -m bench.reliability`` runs the real proxy (``python wsgi.py``) in front of two
OpenAI-compatible upstreams serving the same model: A (priority 1) and B (priority 2, the
fallback). B is always a healthy nginx; A is healthy, fails every call (HTTP 500), fails a random
30% of calls (HTTP 500 or 503), or hangs (accepts, never answers). wrk, then a Python
closed-loop client (exact per-request latencies: wrk corrects its percentiles for coordinated
omission), load the proxy over several keep-alive connections, counting every status and which
provider answered; the nginx access logs (and the hang listener's own counter) count the calls
that reached A and B. After each run the proxy's ``GET /providers`` gives A's circuit breaker.
Results go to stdout and to ``bench/results/reliability.md`` and ``reliability.json``, with
PASS/MISS per target.

Every process is started in its own process group and stopped on exit, error or Ctrl-C; all
traffic stays on 127.0.0.1; every run is bounded by ``--duration``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from bench import machine, services

CHAT_BODY = {"model": "bench-model", "messages": [{"role": "user", "content": "hello"}]}
FAIL_SHARE = 30  # % of A's calls that fail in the "a-fails-30pct" scenario (half 500, half 503)
SHARED_PCT = 10
# Every load request bypasses the proxy's response cache (no read, no write, no coalescing, no
# stale-if-error): this measures fallback, and a cache would answer the same body by itself.
NO_CACHE = {"Cache-Control": "no-cache, no-store"}

ERROR_500 = '{"error":{"message":"A is failing on purpose","type":"server_error"}}'
ERROR_503 = '{"error":{"message":"A is overloaded on purpose","type":"server_error"}}'
HEALTHY = f"default_type application/json; return 200 '{services.CHAT_COMPLETION}';"
FAIL_ALL = f"default_type application/json; return 500 '{ERROR_500}';"
FAIL_SOME = f"""default_type application/json;
            if ($a_fail = "500") {{ return 500 '{ERROR_500}'; }}
            if ($a_fail = "503") {{ return 503 '{ERROR_503}'; }}
            return 200 '{services.CHAT_COMPLETION}';"""
# split_clients hashes each request's random $request_id: a random FAIL_SHARE % of calls fail.
FAIL_SOME_HTTP = (f'    split_clients "${{request_id}}" $a_fail {{ {FAIL_SHARE / 2:g}% "500"; '
                  f'{FAIL_SHARE / 2:g}% "503"; * ""; }}')


@dataclass
class Scenario:
    name: str
    title: str
    a: str | None  # "healthy", "fail_all", "fail_some", "hang"; None: B is the only provider
    direct: bool = False  # wrk talks to B's nginx itself, no proxy


SCENARIOS = {s.name: s for s in (
    Scenario("b-direct", "reference: client -> nginx B, no proxy", None, direct=True),
    Scenario("b-alone", "reference: proxy with B as its only provider", None),
    Scenario("baseline", "A and B healthy (A serves everything)", "healthy"),
    Scenario("a-fails-all", "A answers HTTP 500 to every call, B healthy", "fail_all"),
    Scenario("a-fails-30pct", f"A fails a random {FAIL_SHARE}% of calls (500 or 503), B healthy",
             "fail_some"),
    Scenario("a-hangs", "A accepts and never answers, B healthy", "hang"),
)}

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Cache-Control"] = "no-cache, no-store"
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {{}}; examples = {{}}; providers = {{}}; overloaded = 0 end
function response(status, headers, body)
  local k = tostring(status)
  statuses[k] = (statuses[k] or 0) + 1
  local p = headers["X-Proxy-Provider"] or headers["x-proxy-provider"] or "-"
  providers[p] = (providers[p] or 0) + 1
  if status >= 300 then
    if examples[k] == nil then examples[k] = string.sub(body, 1, 300) end
    if string.find(body, "proxy_overloaded", 1, true) then overloaded = overloaded + 1 end
  end
end
done = function(s, latency, requests)
  io.write(string.format(
    "REL_JSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"connect\\":%d,\\"read\\":%d," ..
    "\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d,\\"p50_us\\":%d,\\"p90_us\\":%d," ..
    "\\"p99_us\\":%d,\\"p999_us\\":%d,\\"mean_us\\":%.1f,\\"max_us\\":%d}}\\n",
    s.requests, s.duration, s.errors.connect, s.errors.read, s.errors.write, s.errors.status,
    s.errors.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.mean, latency.max))
  for _, t in ipairs(threads) do
    local ex = t:get("examples")
    for k, n in pairs(t:get("statuses")) do
      io.write("REL_STATUS " .. k .. " " .. n .. " " .. string.gsub(ex[k] or "", "\\n", " ") .. "\\n")
    end
    for p, n in pairs(t:get("providers")) do io.write("REL_PROVIDER " .. p .. " " .. n .. "\\n") end
    io.write("REL_OVERLOADED " .. t:get("overloaded") .. "\\n")
  end
end
"""


def pyload_main(argv=None):
    """A bounded closed-loop load generator with exact per-request accounting: ``connections``
    threads, each with one keep-alive connection, POST for ``seconds``; prints one JSON line."""
    import http.client
    import threading
    from urllib.parse import urlsplit
    url, connections, seconds = (argv or sys.argv[1:])[:3]
    connections, seconds = int(connections), float(seconds)
    parts = urlsplit(url)
    body = json.dumps(CHAT_BODY, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", **NO_CACHE}
    start = time.monotonic()
    deadline = start + seconds
    lock = threading.Lock()
    latencies, statuses, providers, examples = [], {}, {}, {}
    counters = {"socket_errors": 0, "overloaded": 0}

    def worker():
        conn, mine, n = None, [], 0
        while n < 5_000_000:  # bounded in count as well as in time
            now = time.monotonic()
            if now >= deadline:
                break
            n += 1
            if conn is None:
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
            try:
                conn.request("POST", parts.path, body, headers)
                response = conn.getresponse()
                data = response.read()
                took = time.monotonic() - now
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = None
                with lock:
                    counters["socket_errors"] += 1
                continue
            mine.append(took)
            key, provider = str(response.status), response.getheader("X-Proxy-Provider", "-")
            with lock:
                statuses[key] = statuses.get(key, 0) + 1
                providers[provider] = providers.get(provider, 0) + 1
                if not key.startswith("2"):
                    examples.setdefault(key, data[:300].decode(errors="replace"))
                    if b"proxy_overloaded" in data:
                        counters["overloaded"] += 1
        if conn is not None:
            conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    elapsed = time.monotonic() - start
    latencies.sort()

    def pct(q):
        return int(latencies[min(len(latencies) - 1, int(q / 100 * len(latencies)))] * 1e6) \
            if latencies else 0

    print("REL_PYLOAD " + json.dumps({
        "requests": len(latencies), "duration_us": int(elapsed * 1e6),
        "socket_errors": counters["socket_errors"], "overloaded": counters["overloaded"],
        "p50_us": pct(50), "p90_us": pct(90), "p99_us": pct(99), "p999_us": pct(99.9),
        "max_us": int(latencies[-1] * 1e6) if latencies else 0,
        "mean_us": round(sum(latencies) / len(latencies) * 1e6, 1) if latencies else 0,
        "over_1s": sum(1 for x in latencies if x > 1.0),
        "statuses": {k: {"count": v, "example": examples.get(k, "")}
                     for k, v in statuses.items()},
        "answered_by": providers}), flush=True)


def run_pyload(url, *, connections, seconds) -> dict:
    """``pyload_main`` in its own process on the load core; its numbers in wrk's shape."""
    argv = ["taskset", "-c", services.LOAD_CORE, sys.executable, "-c",
            "import sys; from bench.reliability import pyload_main; pyload_main()",
            url, str(connections), str(seconds)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                          cwd=services.REPO)
    for line in done.stdout.splitlines():
        if line.startswith("REL_PYLOAD "):
            raw = json.loads(line[len("REL_PYLOAD "):])
            raw.update(connect=raw["socket_errors"], read=0, write=0, timeout=0)
            return raw
    raise RuntimeError(f"the python load gave no result (exit {done.returncode}): "
                       f"{(done.stderr or done.stdout).strip()[-500:]}")


def main(argv=None) -> int:
    args = _parse(argv)
    missing = services.missing_tools()
    if missing:
        print(f"bench.reliability: missing {', '.join(missing)}: run bench/setup.sh (as root) "
              "first", file=sys.stderr)
        return 2
    services.interrupt_on_signals()
    try:
        report = measure(args)
    except KeyboardInterrupt:
        print("bench.reliability: interrupted; every started process was stopped",
              file=sys.stderr)
        return 130
    report["command"] = " ".join([".venv/bin/python -m bench.reliability",
                                  *map(shlex.quote, args.argv)])
    report["targets"] = targets(report)
    text = render(report)
    print(text)
    services.write_results(args.output, text, report)
    return 0 if all(t["result"] == "PASS" for t in report["targets"] if not t["info"]) else 1


def _parse(argv):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load per scenario")
    p.add_argument("--quick", action="store_true", help="10 s per scenario")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated, from: {', '.join(SCENARIOS)}")
    p.add_argument("--connections", type=int, default=8, help="wrk connections (default 8)")
    p.add_argument("--threads", type=int, default=32, help="waitress threads of the proxy")
    p.add_argument("--retry-attempts", type=int, default=0,
                   help="the proxy's http_client.retry_attempts (default 0: fallback only)")
    p.add_argument("--connect-timeout", type=float, default=1.0, help="proxy connect timeout, s")
    p.add_argument("--read-timeout", type=float, default=2.0, help="proxy read timeout, s")
    p.add_argument("--load", default="wrk,python",
                   help="load generators, comma-separated: wrk (its latency percentiles are "
                        "corrected for coordinated omission), python (exact per-request "
                        "latencies); each runs every scenario against fresh processes")
    p.add_argument("--source", default=services.REPO, help="the proxy checkout to run")
    p.add_argument("--output", default="reliability",
                   help="results file name in bench/results (default: reliability -> .md, .json)")
    args = p.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.duration = 10.0
    if not 5 <= args.duration <= 300 or not 1 <= args.connections <= 64:
        p.error("--duration must be 5-300 s, --connections 1-64")
    if not 0 <= args.retry_attempts <= 5 or not 0 < args.read_timeout <= 30 \
            or not 0 < args.connect_timeout <= 30:
        p.error("--retry-attempts 0-5, timeouts in (0, 30] s")
    services.check_paths(p, args)
    args.load = [x.strip() for x in args.load.split(",") if x.strip()]
    if not args.load or any(x not in ("wrk", "python") for x in args.load):
        p.error("--load takes wrk, python or both")
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario {unknown[0]!r}; known: {', '.join(SCENARIOS)}")
    return args


def proxy_config(args) -> dict:
    """The proxy's YAML besides the providers: short timeouts, the default breaker settings."""
    return {
        "http_client": {"retry_attempts": args.retry_attempts,
                        "connect_timeout": args.connect_timeout, "timeout": args.read_timeout},
        "circuit_breaker": {"failure_threshold": 5, "recovery_timeout": 60.0,
                            "success_threshold": 3, "adaptive_thresholds": True},
    }


def measure(args) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="llm-proxy-reliability-") as tmp:
        for load in args.load:
            for name in args.scenarios:
                print(f"bench.reliability: {name} ({load}): {args.duration:g} s with "
                      f"{args.connections} connections", file=sys.stderr, flush=True)
                home = os.path.join(tmp, f"{load}-{name}")
                os.makedirs(home)
                with services.ProcessSet() as procs:  # every process of the run ends here
                    rows.append(run_scenario(args, procs, home, SCENARIOS[name], load))
                print(f"bench.reliability: {name} ({load}): {_brief(rows[-1])}",
                      file=sys.stderr, flush=True)
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine.describe(),
            "settings": {"duration_s": args.duration, "connections": args.connections,
                         "load": args.load,
                         "threads": args.threads, "proxy_config": proxy_config(args),
                         "fail_share_pct": FAIL_SHARE,
                         "source": machine.describe_source(args.source)},
            "rows": rows}


def run_scenario(args, procs, home, scenario, load) -> dict:
    b_url, b_log = services.start_nginx_custom(procs, home, "nginx-b", chat=HEALTHY)
    a_url = a_count = None
    if scenario.a == "hang":
        a_url, hang_log = services.start_hang_listener(procs, home, "hang-a",
                                                       lifetime=args.duration + 120)
        a_count = lambda: {"no answer": services.hang_calls(hang_log)}  # noqa: E731
    elif scenario.a:
        chat = {"healthy": HEALTHY, "fail_all": FAIL_ALL, "fail_some": FAIL_SOME}[scenario.a]
        extra = FAIL_SOME_HTTP if scenario.a == "fail_some" else ""
        a_url, a_log = services.start_nginx_custom(procs, home, "nginx-a", chat=chat,
                                                   http_extra=extra)
        a_count = lambda: services.status_counts(a_log)  # noqa: E731
    proxy = None
    target = b_url + "/v1/chat/completions"
    if not scenario.direct:
        providers = [{"name": "B", "type": "openai", "base_url": b_url + "/v1",
                      "models": ["bench-model"], "priority": 2}]
        if a_url:
            providers.insert(0, {"name": "A", "type": "openai", "base_url": a_url + "/v1",
                                 "models": ["bench-model"], "priority": 1})
        proxy = services.start_proxy(procs, home, scenario.name, providers, threads=args.threads,
                                     config=proxy_config(args), source=args.source)
        target = proxy.url + "/v1/chat/completions"
    # One request before the load: it must be answered (through fallback if need be).
    status, data = services.request(target, CHAT_BODY, timeout=args.read_timeout * 3 + 5)
    if json.loads(data).get("object") != "chat.completion":
        raise RuntimeError(f"{target} answered {status} without a chat.completion")
    a_before = a_count() if a_count else {}
    b_before = services.status_counts(b_log)
    ours = {os.getpid()} | {p.pid for p in procs.processes}
    cpu_before = machine.cpu_sample(proxy.process.pid if proxy else None, ours)
    run = run_wrk if load == "wrk" else run_pyload
    kwargs = {"home": home} if load == "wrk" else {}
    raw = run(target, connections=args.connections, seconds=args.duration, **kwargs)
    cpu = machine.cpu_use(cpu_before, machine.cpu_sample(proxy.process.pid if proxy else None,
                                                         ours))
    breakers = {}
    if proxy:
        _, body = services.request(proxy.url + "/providers", timeout=5)
        breakers = {p["name"]: {**p["circuit_breaker"], "in_flight": p["in_flight"]}
                    for p in json.loads(body)["providers"]}
    time.sleep(0.2)  # let the last access-log lines land
    a_calls = _diff(a_count(), a_before) if a_count else {}
    b_calls = _diff(services.status_counts(b_log), b_before)
    proxy_log = _proxy_log_facts(os.path.join(home, f"proxy-{scenario.name}.log"))
    if scenario.direct:
        cpu["proxy_cpu_pct"] = None
    return _row(scenario, load, raw, a_calls, b_calls, breakers, proxy_log, cpu)


def run_wrk(url, *, home, connections, seconds) -> dict:
    """One bounded wrk run (one thread, on the load core) with per-status accounting."""
    script = os.path.join(home, "wrk.lua")
    with open(script, "w") as f:
        f.write(WRK_SCRIPT.format(body=json.dumps(CHAT_BODY, separators=(",", ":"))))
    argv = ["taskset", "-c", services.LOAD_CORE, services.which("wrk"), "-t1",
            f"-c{connections}", f"-d{round(seconds)}s", "--timeout", "10s", "--latency",
            "-s", script, url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    raw, statuses, providers, overloaded = None, {}, {}, 0
    for line in done.stdout.splitlines():
        if line.startswith("REL_JSON "):
            raw = json.loads(line[len("REL_JSON "):])
        elif line.startswith("REL_STATUS "):
            _, status, count, *example = line.split(" ", 3)
            statuses[status] = {"count": int(count), "example": " ".join(example)}
        elif line.startswith("REL_PROVIDER "):
            _, name, count = line.split(" ", 2)
            providers[name] = providers.get(name, 0) + int(count)
        elif line.startswith("REL_OVERLOADED "):
            overloaded += int(line.split()[1])
    if raw is None:
        raise RuntimeError(f"wrk gave no result (exit {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-500:]}")
    return {**raw, "statuses": statuses, "answered_by": providers, "overloaded": overloaded}


def _diff(after: dict, before: dict) -> dict:
    out = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in sorted(out.items()) if v}


def _proxy_log_facts(path) -> dict:
    """Breaker transitions and waitress queueing warnings in the proxy's log."""
    transitions, queue_warnings = [], 0
    if os.path.exists(path):
        with open(path, errors="replace") as f:
            for line in f:
                if "circuit breaker" in line and "->" in line:
                    transitions.append(line.split("circuit breaker", 1)[1].strip())
                if "Task queue depth" in line:
                    queue_warnings += 1
    return {"breaker_transitions": transitions, "queue_depth_warnings": queue_warnings}


def _row(scenario, load, raw, a_calls, b_calls, breakers, proxy_log, cpu) -> dict:
    statuses = raw["statuses"]
    non_2xx = sum(s["count"] for k, s in statuses.items() if not k.startswith("2"))
    socket_errors = sum(raw[k] for k in ("connect", "read", "write", "timeout"))
    errors = non_2xx + socket_errors
    requests = raw["requests"]
    return {"scenario": scenario.name, "load": load, "title": scenario.title,
            "requests": requests, "over_1s": raw.get("over_1s"),
            "rps": round(requests / (raw["duration_us"] / 1e6), 1),
            "non_2xx": non_2xx, "socket_errors": socket_errors, "errors": errors,
            "error_rate": errors / requests if requests else 1.0,
            "overloaded": raw["overloaded"],
            "p50_ms": raw["p50_us"] / 1000, "p90_ms": raw["p90_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000, "p999_ms": raw["p999_us"] / 1000,
            "max_ms": raw["max_us"] / 1000,
            "a_calls": a_calls, "b_calls": b_calls,
            "answered_by": raw["answered_by"],
            "breaker_a": breakers.get("A"), "breaker_b": breakers.get("B"),
            **proxy_log, **cpu, "raw": raw}


def _brief(row) -> str:
    return (f"{row['requests']} requests, {row['errors']} errors, p99 {row['p99_ms']:.1f} ms, "
            f"A calls {sum(row['a_calls'].values())}, B calls {sum(row['b_calls'].values())}")


def targets(report) -> list[dict]:
    """PASS/MISS for each scenario that ran, per load generator."""
    read_timeout = report["settings"]["proxy_config"]["http_client"]["timeout"]
    connect_timeout = report["settings"]["proxy_config"]["http_client"]["connect_timeout"]
    out = []

    def add(label, measured, limit, ok, info=False):
        result = ("within" if ok else "beyond") + " (info)" if info else ("PASS" if ok else "MISS")
        out.append({"target": label, "measured": measured, "limit": limit, "result": result,
                    "info": info})

    for load in report["settings"]["load"]:
        rows = {r["scenario"]: r for r in report["rows"] if r["load"] == load}
        tag = f" ({load})"
        if "baseline" in rows:
            r = rows["baseline"]
            add("baseline: no errors, A serves everything" + tag,
                f"{r['errors']} errors, {sum(r['b_calls'].values())} calls to B",
                "0 errors, 0 calls to B", r["errors"] == 0 and not r["b_calls"])
        if "a-fails-all" in rows:
            r = rows["a-fails-all"]
            add("A fails 100%: client error rate" + tag, _pct(r["error_rate"]), "= 0",
                r["errors"] == 0)
        if "a-fails-30pct" in rows:
            r = rows["a-fails-30pct"]
            add(f"A fails {FAIL_SHARE}%: client error rate" + tag, _pct(r["error_rate"]),
                "< 0.1%", r["error_rate"] < 0.001)
        if "a-hangs" in rows:
            r = rows["a-hangs"]
            add("A hangs: client error rate" + tag, _pct(r["error_rate"]), "= 0",
                r["errors"] == 0)
            add("A hangs: no thread exhaustion" + tag,
                f"{r['overloaded']} x 503 proxy_overloaded, {r['queue_depth_warnings']} "
                "waitress queue-depth warnings", "0", r["overloaded"] == 0
                and r["queue_depth_warnings"] == 0)
            ref = rows.get("b-alone")
            if ref:
                for what, extra in (("read", read_timeout), ("connect", connect_timeout)):
                    limit = ref["p99_ms"] + extra * 1000
                    add(f"A hangs: p99 <= B-alone p99 + {what} timeout" + tag,
                        f"{r['p99_ms']:,.1f} ms",
                        f"<= {ref['p99_ms']:,.1f} + {extra * 1000:,.0f} = {limit:,.1f} ms",
                        r["p99_ms"] <= limit, info=what == "connect")
    return out


def _pct(rate) -> str:
    return f"{rate * 100:.4f}%"


def _calls(counts: dict) -> str:
    if not counts:
        return "0"
    total = sum(counts.values())
    if list(counts) == ["200"]:
        return f"{total:,}"
    return f"{total:,} (" + ", ".join(f"{k}: {v:,}" for k, v in counts.items()) + ")"


def _breaker(b) -> str:
    if not b:
        return "-"
    text = b["state"]
    if b["state"] == "open":
        text += f", retry in {b['retry_in']:.0f} s"
    return text + f", {b['failures']} consec. failures"


def render(report) -> str:
    m, s = report["machine"], report["settings"]
    hc, cb = s["proxy_config"]["http_client"], s["proxy_config"]["circuit_breaker"]
    lines = [
        f"# llm-proxy reliability benchmark, {report['date']}", "",
        f"- machine: {machine.summary(m)}",
        f"- tools: {m['wrk']}; {m['nginx']}",
        f"- proxy code: {s['source']}",
        f"- command: `{report['command']}`",
        f"- load: {' and '.join(s['load'])} (`load` column), {s['connections']} keep-alive "
        f"connections, {s['duration_s']:g} s per scenario, every request with `Cache-Control: "
        "no-cache, no-store` (the response cache is bypassed); a fresh proxy and fresh upstreams "
        "per scenario and load; proxy on core 0, upstreams and load on core 1",
        f"- proxy: `python wsgi.py`, threads {s['threads']}, LOG_LEVEL=WARNING; A priority 1, B "
        f"priority 2, both `type: openai`; http_client retry_attempts {hc['retry_attempts']}, "
        f"connect_timeout {hc['connect_timeout']:g} s, timeout (read) {hc['timeout']:g} s; "
        f"circuit_breaker failure_threshold {cb['failure_threshold']}, recovery_timeout "
        f"{cb['recovery_timeout']:g} s, success_threshold {cb['success_threshold']}, adaptive "
        f"{str(cb['adaptive_thresholds']).lower()}",
        "",
        "| scenario | load | requests | req/s | errors (non-2xx + socket) | error rate | p50 ms | "
        "p99 ms | p99.9 ms | max ms | > 1 s | calls to A | calls to B | A's breaker at the end | "
        "other CPU |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- "
        "| --- | ---: |"]
    for r in report["rows"]:
        flag = " *(shared)*" if r["others_cpu_pct"] + r["steal_pct"] > SHARED_PCT else ""
        a = "-" if r["scenario"].startswith("b-") else _calls(r["a_calls"])
        lines.append(
            f"| {r['scenario']}{flag} | {r['load']} | {r['requests']:,} | {r['rps']:,.0f} | "
            f"{r['errors']} ({r['non_2xx']} + {r['socket_errors']}) | {_pct(r['error_rate'])} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {r['max_ms']:,.1f} | "
            f"{'-' if r['over_1s'] is None else r['over_1s']} | "
            f"{a} | {_calls(r['b_calls'])} | {_breaker(r['breaker_a'])} | "
            f"{r['others_cpu_pct']:.0f}% |")
    lines += ["", "Scenarios:"]
    for r in report["rows"]:
        extra = ""
        if r["breaker_transitions"]:
            shown = r["breaker_transitions"][:6]
            more = len(r["breaker_transitions"]) - len(shown)
            extra = "; breaker transitions: " + ", ".join(shown) + (f" (+{more} more)" if more else "")
        by = ", ".join(f"{k}: {v:,}" for k, v in sorted(r["answered_by"].items()))
        lines.append(f"- `{r['scenario']}` ({r['load']}): {r['title']}. Answered by (X-Proxy-Provider): "
                     f"{by or '-'}; 503 proxy_overloaded: {r['overloaded']}{extra}.")
        for status, seen in r["raw"]["statuses"].items():
            if not status.startswith("2"):
                lines.append(f"  - {seen['count']} x {status}, e.g. `{seen['example'][:200]}`")
    lines += ["", "Calls to A and B are counted by the upstreams themselves (nginx access logs; "
              "the hang listener's own counter) during the load, by status; they can exceed the "
              "client's count by the requests still in flight when the load stopped. Errors and "
              "latency are the client's. **wrk** corrects its latency percentiles for "
              "coordinated omission (each response slower than the mean interval between "
              "requests on a connection adds synthetic samples), so a few 2 s stalls weigh as if "
              "requests had kept arriving at the usual rate meanwhile; **python** (`load` "
              "column) is a closed-loop client whose percentiles are the exact per-request "
              "latencies, and `> 1 s` counts requests slower than 1 s. *(shared)*: other "
              f"processes took over {SHARED_PCT}% of a core during that run.",
              "", "| target | measured | limit | result |", "| --- | --- | --- | --- |"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {t['limit']} | {t['result']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
