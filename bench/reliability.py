"""Fallback under a failing primary: does the proxy hide it from clients?

Provider A (priority 1) is healthy, fails every call, fails 30% of calls, or hangs
(``bench.upstreams.hang``); B (priority 2) is a healthy nginx. wrk loads the proxy and counts
statuses and who answered; the upstreams count the calls that reached them (bench/README.md).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from bench import cli, machine, report, services

TOOLS = ("nginx", "wrk", "taskset")
TITLE = "reliability benchmark"
OUTPUT = "reliability"
QUICK = {"duration": 10.0}
LIMITS = {"duration": (5, 300), "connections": (1, 64), "retry_attempts": (0, 5),
          "connect_timeout": (0.01, 30), "read_timeout": (0.01, 30)}
FAIL_SHARE = 30  # % of A's calls that fail in the "a-fails-30pct" scenario (half 500, half 503)
# Every load request bypasses the proxy's response cache (no read, no write, no coalescing, no
# stale-if-error): this measures fallback, and a cache would answer the same body by itself.
NO_CACHE = {"Cache-Control": "no-cache, no-store"}

ERROR_500 = '{"error":{"message":"A is failing on purpose","type":"server_error"}}'
ERROR_503 = '{"error":{"message":"A is overloaded on purpose","type":"server_error"}}'
A_CHAT = {
    "healthy": services.HEALTHY_CHAT,
    "fail_all": f"return 500 '{ERROR_500}';",
    "fail_some": f"""if ($a_fail = "500") {{ return 500 '{ERROR_500}'; }}
            if ($a_fail = "503") {{ return 503 '{ERROR_503}'; }}
            {services.HEALTHY_CHAT}""",
}
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


def add_arguments(p) -> None:
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load per scenario")
    p.add_argument("--scenarios", type=cli.names(SCENARIOS), default=list(SCENARIOS),
                   help=f"comma-separated, from: {', '.join(SCENARIOS)}")
    p.add_argument("--connections", type=int, default=8, help="wrk connections (default 8)")
    p.add_argument("--threads", type=int, default=32, help="waitress threads of the proxy (32)")
    p.add_argument("--retry-attempts", type=int, default=0,
                   help="the proxy's http_client.retry_attempts (default 0: fallback only)")
    p.add_argument("--connect-timeout", type=float, default=1.0, help="proxy connect timeout, s")
    p.add_argument("--read-timeout", type=float, default=2.0, help="proxy read timeout, s")


def proxy_config(args) -> dict:
    """The proxy's YAML besides the providers: short timeouts, the default breaker settings."""
    return {
        "http_client": {"retry_attempts": args.retry_attempts,
                        "connect_timeout": args.connect_timeout, "timeout": args.read_timeout},
        "circuit_breaker": {"failure_threshold": 5, "recovery_timeout": 60.0,
                            "success_threshold": 3, "adaptive_thresholds": True},
    }


def measure(args, procs, tmp) -> dict:
    rows = []
    for name in args.scenarios:
        report.progress(f"reliability {name}: {args.duration:g} s with {args.connections} "
                        "connections")
        home = os.path.join(tmp, name)
        os.makedirs(home)
        with services.ProcessSet() as scenario_procs:  # every process of the scenario ends here
            rows.append(run_scenario(args, scenario_procs, home, SCENARIOS[name]))
        r = rows[-1]
        report.progress(f"reliability {name}: {r['requests']} requests, {r['errors']} errors, "
                        f"p99 {r['p99_ms']:.1f} ms, A calls {sum(r['a_calls'].values())}, "
                        f"B calls {sum(r['b_calls'].values())}")
    settings = {"duration_s": args.duration, "connections": args.connections,
                "threads": args.threads, "proxy_config": proxy_config(args),
                "fail_share_pct": FAIL_SHARE}
    found = targets(rows, settings)
    return {"settings": settings, "rows": rows, "targets": found, "pass": report.passed(found)}


def run_scenario(args, procs, home, scenario) -> dict:
    b_log = os.path.join(home, "b-calls.log")
    b_url = services.start_nginx(procs, home, "nginx-b", calls_log=b_log)
    a_url = a_count = None
    if scenario.a == "hang":
        a_url, hang_log = services.start_upstream(procs, home, "hang",
                                                  lifetime=args.duration + 120)
        a_count = lambda: {"no answer": _lines(hang_log, "R")}  # noqa: E731
    elif scenario.a:
        a_log = os.path.join(home, "a-calls.log")
        a_url = services.start_nginx(
            procs, home, "nginx-a", chat=A_CHAT[scenario.a], calls_log=a_log,
            http_extra=FAIL_SOME_HTTP if scenario.a == "fail_some" else "")
        a_count = lambda: _status_counts(a_log)  # noqa: E731
    proxy = None
    target = b_url + services.PATH
    if not scenario.direct:
        providers = [{"name": "B", "type": "openai", "base_url": b_url + "/v1",
                      "models": ["bench-model"], "priority": 2}]
        if a_url:
            providers.insert(0, {"name": "A", "type": "openai", "base_url": a_url + "/v1",
                                 "models": ["bench-model"], "priority": 1})
        proxy = services.start_proxy(procs, home, scenario.name, providers, threads=args.threads,
                                     config=proxy_config(args), source=args.source)
        target = proxy.url + services.PATH
    # One request before the load: it must be answered (through fallback if need be).
    services.check_answer(target, timeout=args.read_timeout * 3 + 5)
    a_before = a_count() if a_count else {}
    b_before = _status_counts(b_log)
    script = services.write_wrk_script(home, "reliability", services.CHAT_BODY,
                                       headers=NO_CACHE, count=True)
    with machine.cpu_meter(proxy.process.pid if proxy else None, procs) as cpu:
        raw = services.run_wrk(target, script, connections=args.connections,
                               seconds=args.duration, timeout="10s")
    breakers = {}
    if proxy:
        _, body = services.request(proxy.url + "/providers", timeout=5)
        breakers = {p["name"]: {**p["circuit_breaker"], "in_flight": p["in_flight"]}
                    for p in json.loads(body)["providers"]}
    time.sleep(0.2)  # let the last access-log lines land
    a_calls = _diff(a_count(), a_before) if a_count else {}
    b_calls = _diff(_status_counts(b_log), b_before)
    if scenario.direct:
        cpu["proxy_cpu_pct"] = None
    statuses = raw.get("statuses", {})
    non_2xx = sum(s["count"] for k, s in statuses.items() if not k.startswith("2"))
    socket_errors = sum(raw[k] for k in ("connect", "read", "write", "timeout"))
    requests = raw["requests"]
    return {"scenario": scenario.name, "title": scenario.title, "requests": requests,
            "rps": round(requests / (raw["duration_us"] / 1e6), 1),
            "non_2xx": non_2xx, "socket_errors": socket_errors, "errors": non_2xx + socket_errors,
            "error_rate": (non_2xx + socket_errors) / requests if requests else 1.0,
            "overloaded": raw.get("overloaded", 0),
            "p50_ms": raw["p50_us"] / 1000, "p90_ms": raw["p90_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000, "p999_ms": raw["p999_us"] / 1000,
            "max_ms": raw["max_us"] / 1000, "a_calls": a_calls, "b_calls": b_calls,
            "answered_by": raw.get("answered_by", {}),
            "breaker_a": breakers.get("A"), "breaker_b": breakers.get("B"),
            **services.proxy_log_facts(proxy.log if proxy else ""), **cpu, "raw": raw}


def _lines(path: str, text: str) -> int:
    """Lines of ``path`` that are ``text``: the hang listener writes one R per request."""
    with open(path) as f:
        return sum(1 for line in f if line.strip() == text)


def _status_counts(access_log: str) -> dict[str, int]:
    """{status: calls} from an nginx ``status_only`` log (empty when nothing was logged)."""
    counts: dict[str, int] = {}
    if os.path.exists(access_log):
        with open(access_log) as f:
            for line in f:
                if line.strip():
                    counts[line.strip()] = counts.get(line.strip(), 0) + 1
    return counts


def _diff(after: dict, before: dict) -> dict:
    out = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in sorted(out.items()) if v}


def targets(rows, settings) -> list[dict]:
    """PASS/MISS for each scenario that ran."""
    hc = settings["proxy_config"]["http_client"]
    rows = {r["scenario"]: r for r in rows}
    out = []
    if "baseline" in rows:
        r = rows["baseline"]
        out.append(report.target(
            "baseline: no errors, A serves everything",
            f"{r['errors']} errors, {sum(r['b_calls'].values())} calls to B",
            "0 errors, 0 calls to B", r["errors"] == 0 and not r["b_calls"]))
    if "a-fails-all" in rows:
        r = rows["a-fails-all"]
        out.append(report.target("A fails 100%: client error rate", _pct(r["error_rate"]), "= 0",
                                 r["errors"] == 0))
    if "a-fails-30pct" in rows:
        r = rows["a-fails-30pct"]
        out.append(report.target(f"A fails {FAIL_SHARE}%: client error rate",
                                 _pct(r["error_rate"]), "< 0.1%", r["error_rate"] < 0.001))
    if "a-hangs" in rows:
        r = rows["a-hangs"]
        out.append(report.target("A hangs: client error rate", _pct(r["error_rate"]), "= 0",
                                 r["errors"] == 0))
        out.append(report.target(
            "A hangs: no thread exhaustion", f"{r['overloaded']} x 503 proxy_overloaded, "
            f"{r['queue_depth_warnings']} waitress queue-depth warnings", "0",
            r["overloaded"] == 0 and r["queue_depth_warnings"] == 0))
        ref = rows.get("b-alone")
        if ref:
            for what in ("read", "connect"):
                extra = hc["timeout" if what == "read" else "connect_timeout"] * 1000
                limit = ref["p99_ms"] + extra
                out.append(report.target(
                    f"A hangs: p99 <= B-alone p99 + {what} timeout", f"{r['p99_ms']:,.1f} ms",
                    f"<= {ref['p99_ms']:,.1f} + {extra:,.0f} = {limit:,.1f} ms",
                    r["p99_ms"] <= limit, info=what == "connect"))
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


def render(rep) -> list[str]:
    s = rep["settings"]
    hc, cb = s["proxy_config"]["http_client"], s["proxy_config"]["circuit_breaker"]
    lines = [
        f"- load: wrk, {s['connections']} keep-alive connections, {s['duration_s']:g} s per "
        "scenario, every request with `Cache-Control: no-cache, no-store` (the response cache "
        "is bypassed); a fresh proxy and fresh upstreams per scenario; proxy on core "
        f"{services.PROXY_CORE}, upstreams and load on core {services.LOAD_CORE}",
        f"- proxy: `python wsgi.py`, threads {s['threads']}, LOG_LEVEL=WARNING; A priority 1, B "
        f"priority 2, both `type: openai`; http_client retry_attempts {hc['retry_attempts']}, "
        f"connect_timeout {hc['connect_timeout']:g} s, timeout (read) {hc['timeout']:g} s; "
        f"circuit_breaker failure_threshold {cb['failure_threshold']}, recovery_timeout "
        f"{cb['recovery_timeout']:g} s, success_threshold {cb['success_threshold']}, adaptive "
        f"{str(cb['adaptive_thresholds']).lower()}",
        "", "| scenario | requests | req/s | errors (non-2xx + socket) | error rate | p50 ms | "
        "p99 ms | p99.9 ms | max ms | calls to A | calls to B | A's breaker at the end | "
        "other CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: |"]
    for r in rep["rows"]:
        flag = " *(shared)*" if machine.shared(r) else ""
        a = "-" if r["scenario"].startswith("b-") else _calls(r["a_calls"])
        lines.append(
            f"| {r['scenario']}{flag} | {r['requests']:,} | {r['rps']:,.0f} | "
            f"{r['errors']} ({r['non_2xx']} + {r['socket_errors']}) | {_pct(r['error_rate'])} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {r['max_ms']:,.1f} | "
            f"{a} | {_calls(r['b_calls'])} | {_breaker(r['breaker_a'])} | "
            f"{r['others_cpu_pct']:.0f}% |")
    lines += ["", "Scenarios:"]
    for r in rep["rows"]:
        extra = ""
        if r["breaker_transitions"]:
            shown = r["breaker_transitions"][:6]
            more = len(r["breaker_transitions"]) - len(shown)
            extra = "; breaker transitions: " + ", ".join(shown) + (f" (+{more} more)" if more else "")
        by = ", ".join(f"{k}: {v:,}" for k, v in sorted(r["answered_by"].items()))
        lines.append(f"- `{r['scenario']}`: {r['title']}. Answered by (X-Proxy-Provider): "
                     f"{by or '-'}; 503 proxy_overloaded: {r['overloaded']}{extra}.")
        for status, seen in r["raw"].get("statuses", {}).items():
            if not status.startswith("2"):
                lines.append(f"  - {seen['count']} x {status}, e.g. `{seen['example'][:200]}`")
    lines += ["", "Calls to A and B are counted by the upstreams themselves (nginx access logs; "
              "the hang listener's own counter) during the load, by status; they can exceed the "
              "client's count by the requests still in flight when the load stopped. Errors and "
              "latency are the client's. wrk corrects its latency percentiles for coordinated "
              "omission (each response slower than the mean interval between requests on a "
              "connection adds synthetic samples), so a few 2 s stalls weigh as if requests had "
              "kept arriving at the usual rate meanwhile. When A hangs, each call that reached "
              "it is a request that waited the read timeout before B answered it."]
    return lines + report.shared_note(rep["rows"])
