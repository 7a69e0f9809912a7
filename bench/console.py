"""The operator console's pages on loopback, as a newcomer meets them: how long each takes.

The proxy is built in this process (development defaults, the database on in SQLite, one
client key from the config, the mock provider) and served by its own waitress server
(``build_server``) on a free loopback port: in-process because the timeline is filled with a
busy hour (``--rps`` requests a second for 3600 s, recorded while its wall clock is moved
back through the hour), which a proxy started as a process cannot be given. The request log
gets ``--rows`` rows from real requests sent through the mock provider with the client key.

Then each page and JSON view is loaded once in the order a newcomer meets them (the sign-in
page and its CSS and JavaScript, then, signed in, every page): the first load after start,
cold (each template compiled on first use). Then ``--repeats`` rounds load every page in turn
(so a slower spell of the machine hits them all alike): the median and p95 per page, and its
bytes. Targets: every page's p95 < 200 ms (the issue's "loads in under 200 ms on loopback");
each cold first load < 200 ms, for information.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import threading
import time
from types import SimpleNamespace

import requests

from bench import machine, report

TOOLS = ()
TITLE = "console page timings, loopback"
OUTPUT = "console"
QUICK = {"rows": 1000, "repeats": 10}
LIMITS = {"rows": (1, 200_000), "repeats": (3, 1000), "rps": (0, 1000)}
TARGET_MS = 200
ADMIN_KEY = "bench-console-admin-0123456789abcdef"
CLIENT_KEY = "sk-bench-console-0123456789abcdef"
SENDERS = 8  # threads sending the request log's rows
HOUR = 3600
# (label, path, signed in): in the order a newcomer meets them; "{request}" is one row's page,
# its link taken from the requests page's first load.
PAGES = (
    ("sign-in", "/console/sign-in", False),
    ("console.css", "/console/static/console.css", False),
    ("console.js", "/console/static/console.js", False),
    ("overview", "/console/", True),
    ("overview.json", "/console/overview.json", True),
    ("providers", "/console/providers", True),
    ("providers.json", "/console/providers.json", True),
    ("keys", "/console/keys", True),
    ("keys.json", "/console/keys.json", True),
    ("requests", "/console/requests", True),
    ("requests?status=5xx", "/console/requests?status=5xx", True),
    ("one request", "{request}", True),
    ("cache", "/console/cache", True),
    ("cache.json", "/console/cache.json", True),
)
_REQUEST_LINK = re.compile(r'href="(/console/requests/[^"?]+)"')


def add_arguments(p) -> None:
    p.add_argument("--rows", type=int, default=10_000,
                   help="request log rows, sent as real requests through the mock (10000)")
    p.add_argument("--repeats", type=int, default=30,
                   help="loads of each page after its first, in rounds of every page (30)")
    p.add_argument("--rps", type=int, default=20,
                   help="requests a second in the timeline's busy hour (20)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before the page loads, wait up to this long for an idle machine")


def build_app(tmp):
    """The proxy as a newcomer runs it, but for what the run needs: an admin key to sign in
    with, one client key, its SQLite file in ``tmp``, no access log on the report's stdout."""
    from app import create_app
    from settings import build_settings
    return create_app(build_settings({
        "providers": [{"name": "mock", "type": "mock", "models": ["mock-model"]}],
        "admin_api_key": ADMIN_KEY, "auth": {"env_keys": f"bench:{CLIENT_KEY}"},
        "database": {"enabled": True, "path": os.path.join(tmp, "proxy.db")},
        "observability": {"access_log": False}}))


def serving(app):
    """The app served by its production server on a free loopback port, in a thread of this
    process (as the tests serve it); yields the base URL."""
    from app.runtime.server import served_in_thread
    return served_in_thread(app)


def client() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxy variables or .netrc between us and loopback
    return session


def fill_timeline(timeline, rps: int, end: float) -> int:
    """A busy hour ending at ``end``: ``rps`` requests in each of its 3600 seconds, recorded
    with the timeline's wall clock set to that second (then given back). A mix: 2% failed
    (502), 1% refused (429), a quarter cache hits, latencies from 10 ms to about 2 s."""
    real = timeline.wall
    second = [end]
    timeline.wall = lambda: second[0]
    n = 0
    try:
        for offset in range(HOUR - 1, -1, -1):
            second[0] = end - offset
            for _ in range(rps):
                status = 502 if n % 50 == 0 else 429 if n % 100 == 1 else 200
                trace = SimpleNamespace(cache="HIT" if n % 4 == 0 else "MISS",
                                        tokens=lambda: 120)
                timeline.record(status, 0.01 * (1 + n % 20) ** 1.75, 0.3 + (n % 7) / 10, trace,
                                0.0002)
                n += 1
    finally:
        timeline.wall = real
    return n


def send_rows(url, rows: int) -> dict:
    """``rows`` chat requests through the mock with the client key, from ``SENDERS`` threads
    (a quarter of them one repeated prompt: cache hits); their statuses counted."""
    statuses: dict = {}
    lock = threading.Lock()

    def send(first):
        session = client()
        seen: dict = {}
        for n in range(first, rows, SENDERS):
            prompt = "the same question" if n % 4 == 0 else f"question {n}"
            r = session.post(url + "/v1/chat/completions", headers={
                "Authorization": f"Bearer {CLIENT_KEY}"}, json={
                "model": "mock-model", "messages": [{"role": "user", "content": prompt}]})
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
        with lock:
            for status, count in seen.items():
                statuses[status] = statuses.get(status, 0) + count

    threads = [threading.Thread(target=send, args=(i,)) for i in range(SENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {str(k): v for k, v in sorted(statuses.items())}


def wait_written(store, rows: int, timeout: float = 60.0) -> dict:
    """Until the request log's writer has written ``rows`` rows and holds none queued (or
    ``timeout`` passed): the pages then read a settled table and no writer competes."""
    deadline = time.monotonic() + timeout
    while True:
        health = store.health()
        if (health["written"] >= rows and not health["queued"]) or time.monotonic() > deadline:
            return {k: health[k] for k in ("written", "dropped", "queued")}
        time.sleep(0.05)


def load(session, url) -> tuple[float, int, bytes]:
    """One GET, read to its end: (ms, status, body). Redirects are not followed: a page that
    redirects (the session lost) is an error, not a timing of another page."""
    started = time.perf_counter()
    r = session.get(url, allow_redirects=False)
    body = r.content
    return (time.perf_counter() - started) * 1000, r.status_code, body


def measure(args, procs, tmp) -> dict:
    sys.path.insert(0, args.source)  # the app measured is the one in --source
    app = build_app(tmp)
    proxy = app.extensions["llm_proxy"]
    try:
        with serving(app) as url:
            report.progress(f"console: sending {args.rows:,} requests for the request log")
            started = time.monotonic()
            statuses = send_rows(url, args.rows)
            written = wait_written(proxy.store, args.rows)
            send_s = time.monotonic() - started
            report.progress(f"console: {statuses} in {send_s:.1f} s; request log {written}")
            started = time.monotonic()
            recorded = fill_timeline(proxy.timeline, args.rps, time.time())
            report.progress(f"console: timeline: {recorded:,} requests over the last hour "
                            f"({time.monotonic() - started:.1f} s)")
            machine.wait_quiet(args.wait_quiet)
            # who else used the CPU meanwhile (this process, server and client, left out)
            with machine.cpu_meter(os.getpid(), procs) as cpu:
                pages, errors = load_pages(url, args.repeats)
    finally:
        proxy.close()
    targets = page_targets(pages)
    return {"settings": {"rows": args.rows, "repeats": args.repeats, "rps": args.rps,
                         "threads": proxy.settings.server.threads},
            "rows_sent": statuses, "request_log": written, "send_seconds": round(send_s, 1),
            "timeline_requests": recorded, "pages": pages, "errors": errors, "cpu": cpu,
            "targets": targets,
            "pass": report.passed(targets) and not errors and written["written"] >= args.rows}


def load_pages(url, repeats: int):
    """Every page's first load, in ``PAGES`` order, then ``repeats`` rounds of every page in
    turn: per page its cold ms, the rounds' median and p95 ms, its bytes; and the loads that
    did not answer 200."""
    anonymous, operator = client(), client()
    paths, rows, errors, requests_page = {}, [], [], ""

    def once(label, path, signed_in):
        ms, status, body = load(operator if signed_in else anonymous, url + path)
        if status != 200:
            errors.append({"page": label, "status": status})
        return ms, body

    for label, path, signed_in in PAGES:
        if label == "overview":  # the first signed-in page: sign in first, as a newcomer does
            r = operator.post(url + "/console/sign-in", data={"admin_key": ADMIN_KEY},
                              allow_redirects=False)
            if r.status_code != 303:
                raise RuntimeError(f"console: signing in answered {r.status_code}")
        if path == "{request}":
            found = _REQUEST_LINK.search(requests_page)
            if found is None:
                raise RuntimeError("console: the requests page links no request")
            path = found.group(1)
        paths[label] = path
        ms, body = once(label, path, signed_in)
        if label == "requests":
            requests_page = body.decode(errors="replace")
        rows.append({"page": label, "path": path, "cold_ms": round(ms, 2), "bytes": len(body)})
        report.progress(f"console: {label}: first load {ms:.1f} ms, {len(body):,} bytes")
    times: dict = {label: [] for label, _, _ in PAGES}
    for _ in range(repeats):
        for label, _, signed_in in PAGES:
            ms, _ = once(label, paths[label], signed_in)
            times[label].append(ms / 1000)
    for row in rows:
        seconds = times[row["page"]]
        row["median_ms"] = round(statistics.median(seconds) * 1000, 2)
        row["p95_ms"] = report.percentile_ms(seconds, 95, 2)
        row["max_ms"] = round(max(seconds) * 1000, 2)
    return rows, errors


def page_targets(pages) -> list[dict]:
    out = [report.target(f"{p['page']}: p95 of the loads after the first", f"{p['p95_ms']} ms",
                         f"< {TARGET_MS} ms", p["p95_ms"] < TARGET_MS) for p in pages]
    out += [report.target(f"{p['page']}: first load after start (cold)", f"{p['cold_ms']} ms",
                          f"< {TARGET_MS} ms", p["cold_ms"] < TARGET_MS, info=True)
            for p in pages]
    return out


def render(rep) -> list[str]:
    s, log, c = rep["settings"], rep["request_log"], rep["cpu"]
    lines = [f"- in-process proxy (development defaults, {s['threads']} threads, SQLite) on its "
             "own waitress server on loopback; the client is this process (requests, one "
             "keep-alive connection per session)",
             f"- request log: {log['written']:,} rows written ({log['dropped']} dropped) from "
             f"{sum(rep['rows_sent'].values()):,} requests through the mock (statuses "
             f"{rep['rows_sent']}, {rep['send_seconds']} s); timeline: "
             f"{rep['timeline_requests']:,} requests over the last hour ({s['rps']} a second)",
             f"- each page's first load after start (cold), then {s['repeats']} rounds of every "
             f"page in turn: median and p95 of those; meanwhile this process used "
             f"{c['proxy_cpu_pct']}% of a core, other processes {c['others_cpu_pct']}%, steal "
             f"{c['steal_pct']}%{' *(shared)*' if machine.shared(c) else ''}", "",
             "| page | path | cold ms | median ms | p95 ms | bytes |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {p['page']} | `{p['path']}` | {p['cold_ms']:.1f} | {p['median_ms']:.1f} | "
              f"{p['p95_ms']:.1f} | {p['bytes']:,} |" for p in rep["pages"]]
    if rep["errors"]:
        lines += ["", f"**FLAGGED**: {len(rep['errors'])} loads did not answer 200: "
                  f"{rep['errors'][:5]}"]
    if machine.shared(c):
        lines += ["", f"*shared*: other processes (or the VM host, as steal) took over "
                  f"{machine.SHARED_PCT}% of a core during the loads: the times are high; rerun "
                  "on a quiet machine."]
    return lines
