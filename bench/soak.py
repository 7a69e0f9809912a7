"""The soak test: does the proxy's memory, thread count and fd count stay flat under hours of mixed
traffic, and come back to idle afterwards?

``python -m bench.soak --minutes 30`` runs the real proxy (``python wsgi.py``) with the production
profile (``ENVIRONMENT=production``: 256 threads, access log, API keys when the app has them) on
core 0, in front of an nginx upstream (a fixed completion; ``services.start_nginx``) for the
model ``bench-model`` and the mock provider (model ``m``, 8 chunks 5 ms apart) for streams.
This process is the load, on core 1 (with nginx).

1. The maximum rate (unless ``--rate``): a throwaway proxy, the same mix closed-loop with
   ``--max-workers`` threads for ``--max-seconds``.
2. A fresh proxy; one warm-up request (a 401 there means API keys are required: every request
   then sends ``Authorization: Bearer``); idle RSS, threads and fds recorded 2 s later.
3. The soak: half the maximum rate for ``--minutes``, paced by a shared schedule (a token bucket
   of one slot every 1/rate s; ``--workers`` threads, one keep-alive connection each), the mix:
   40% misses (unique prompts), 30% hits (20 repeated prompts), 15% streams (mock, unique
   prompts), 5% unknown model (404), 5% bad body (400), 5% client disconnects (a stream opened,
   one chunk read, the socket closed). Every ``--sample`` s a CSV row: elapsed s, RSS MB,
   threads, open fds, the proxy's connections to nginx (any state), requests sent, unexpected
   errors (a status other than the kind's expected one, 5xx, socket errors), the interval's
   rate and CPU.
4. 10 s after the load: RSS, threads and fds again; then (information) once more after the
   upstream keep-alive expiry has passed and one request has let the pool drop idle
   connections.

Pass: idle RSS <= 60 MB; (RSS at the end of the load - RSS at 5 min) / RSS at 5 min < 5%, each
end the median of a minute of samples (``WINDOW_S``; for runs under 10 minutes the reference is
half-time, and the result is only a smoke check); threads back to idle exactly; fds back to
idle + 2 (see ``FD_TOLERANCE``) 10 s after the load, not counting the pooled keep-alive
connections to nginx, and counting them once the pool's expiry has passed. Results:
``bench/results/soak.csv``, ``soak.png``, ``soak.json`` and ``soak.md`` (``--output``).
"""

from __future__ import annotations

import argparse
import array
import csv
import datetime
import http.client
import json
import os
import random
import secrets
import shlex
import statistics
import sys
import tempfile
import threading
import time
from urllib.parse import urlsplit

import psutil

from bench import machine, services


PATH = "/v1/chat/completions"
RSS_LIMIT_MB, GROWTH_LIMIT = 60.0, 0.05
WINDOW_S = 60.0  # each end of the RSS growth comparison: the median of this many seconds
# fds after the load may exceed idle by the upstream keep-alive pool: the idle figure is taken
# after one request (one pooled connection to nginx); the load leaves as many pooled connections
# as misses were in flight at once, and the pool drops them only on the first request after
# ``http_client.keepalive_expiry`` (30 s) of idleness. +2 allows a couple; the CSV's
# upstream_conns column and the "after expiry" point show what they are.
FD_TOLERANCE = 2
SHARED_PCT = 10
MIX = (("miss", 40), ("hit", 30), ("stream", 15), ("not_found", 5), ("bad_body", 5),
       ("disconnect", 5))
EXPECTED = {"miss": 200, "hit": 200, "stream": 200, "not_found": 404, "bad_body": 400,
            "disconnect": 200}
HIT_PROMPTS = 20
MOCK_PROVIDER = {"name": "mock", "type": "mock", "models": ["m"], "chunks": 8,
                 "chunk_delay_ms": 5}


def main(argv=None) -> int:
    args = _parse(argv)
    missing = [t for t in ("nginx", "taskset") if not services.which(t)]
    if missing:
        print(f"bench.soak: missing {', '.join(missing)}: run bench/setup.sh first",
              file=sys.stderr)
        return 2
    services.interrupt_on_signals()
    os.sched_setaffinity(0, {int(services.LOAD_CORE)})
    try:
        report = run(args)
    except KeyboardInterrupt:
        print("bench.soak: interrupted; every started process was stopped", file=sys.stderr)
        return 130
    return 0 if report["pass"] else 1


def _parse(argv):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="soak duration (default 30)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="soak rate in req/s; default: half the measured maximum")
    p.add_argument("--workers", type=int, default=16, help="load threads during the soak (16)")
    p.add_argument("--max-workers", type=int, default=32, help="threads for the maximum (32)")
    p.add_argument("--max-seconds", type=float, default=15.0, help="maximum-rate run, s (15)")
    p.add_argument("--sample", type=float, default=5.0, help="seconds between CSV rows (5)")
    p.add_argument("--source", default=services.REPO, help="the proxy checkout to run")
    p.add_argument("--output", default="soak", help="results name in bench/results (soak)")
    p.add_argument("--proxy-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the proxy, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    args = p.parse_args(argv)
    args.argv = argv
    if not (0.5 <= args.minutes <= 24 * 60 and 0 <= args.rate <= 20000
            and 1 <= args.workers <= 128 and 1 <= args.max_workers <= 128
            and 3 <= args.max_seconds <= 120 and 1 <= args.sample <= 60):
        p.error("out of range: --minutes 0.5-1440, --rate 0-20000, --workers 1-128, "
                "--max-seconds 3-120, --sample 1-60")
    if any("=" not in e or not e.split("=", 1)[0] for e in args.proxy_env):
        p.error("--proxy-env takes NAME=VALUE")
    services.check_paths(p, args)
    return args


def _log(text):
    print(f"bench.soak {time.strftime('%H:%M:%S')}: {text}", file=sys.stderr, flush=True)


# -- the proxy -------------------------------------------------------------------------------

def proxy_env(key: str) -> tuple[dict, list[str]]:
    """The production profile, plus a client key and no per-key rate limit when the app has
    API keys (by the env names settings.py knows); the notes say what was set and why."""
    from settings import ENV_VARS
    env, notes = {"ENVIRONMENT": "production"}, ["ENVIRONMENT=production"]
    if "PROXY_API_KEYS" in ENV_VARS:
        env["PROXY_API_KEYS"] = f"soak:{key}"
        notes.append("PROXY_API_KEYS=soak:<32-character key>")
    for var in ("RATE_LIMIT_REQUESTS", "RATE_LIMIT_TOKENS"):
        if var in ENV_VARS:  # the profile's per-key limit would refuse a one-key soak with 429
            env[var] = "0"
            notes.append(f"{var}=0 (one key sends the whole load)")
    return env, notes


def start(procs, tmp, name, upstream, env, source):
    config = {"providers": [
        {"name": "upstream", "type": "openai", "base_url": upstream + "/v1",
         "models": ["bench-model"]}, dict(MOCK_PROVIDER)]}
    return services.start_proxy_env(procs, tmp, name, config, env=env, source=source)


# -- the load --------------------------------------------------------------------------------

class Pacer:
    """Slots 1/rate apart shared by every worker: a token bucket without burst. A worker more
    than a second behind the schedule moves it (the missed slots are counted, not sent later)."""

    def __init__(self, rate, deadline):
        self.interval = 1.0 / rate if rate else 0.0
        self.deadline = deadline
        self.base = time.monotonic()
        self.i = 0
        self.skipped = 0
        self.lock = threading.Lock()

    def next(self):
        """The monotonic time of the caller's slot, or None when the run is over."""
        with self.lock:
            now = time.monotonic()
            if now >= self.deadline:
                return None
            if not self.interval:
                return now
            t = self.base + self.i * self.interval
            if now - t > 1.0:
                behind = int((now - t) / self.interval)
                self.skipped += behind
                self.i += behind
                t = self.base + self.i * self.interval
            self.i += 1
            return t


class Load:
    """Worker threads sending the mix; counts, unexpected outcomes and latencies by kind."""

    def __init__(self, url, *, auth, rate, seconds, workers, seed=1):
        self.parts = urlsplit(url)
        self.headers = {"Content-Type": "application/json"}
        if auth:
            self.headers["Authorization"] = f"Bearer {auth}"
        self.pacer = Pacer(rate, time.monotonic() + seconds)
        self.workers = workers
        self.seconds = seconds
        self.lock = threading.Lock()
        self.sent = 0
        self.by_kind = {k: 0 for k, _ in MIX}
        self.unexpected = 0
        self.server_errors = 0
        self.socket_errors = 0
        self.outcomes: dict[str, int] = {}  # "kind status" -> count (unexpected ones)
        self.examples: dict[str, str] = {}
        self.cache: dict[str, int] = {}
        self.latency = {k: array.array("d") for k, _ in MIX}
        self.counter = 0
        self.seed = seed
        self.stop = threading.Event()
        self.threads = []

    def start(self):
        for w in range(self.workers):
            t = threading.Thread(target=self._worker, args=(w,), daemon=True)
            t.start()
            self.threads.append(t)

    def join(self):
        for t in self.threads:
            t.join(self.seconds + 60)

    def _conn(self):
        return http.client.HTTPConnection(self.parts.hostname, self.parts.port, timeout=30)

    def _unique(self):
        with self.lock:
            self.counter += 1
            return f"soak {self.seed} {self.counter} {secrets.token_hex(4)}"

    def _worker(self, w):
        rng = random.Random(self.seed * 1000 + w)
        kinds = [k for k, n in MIX for _ in range(n)]
        conn = None
        for _ in range(50_000_000):  # bounded in count as well as by the pacer's deadline
            if self.stop.is_set():
                break
            slot = self.pacer.next()
            if slot is None:
                break
            wait = slot - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            kind = rng.choice(kinds)
            if conn is None:
                conn = self._conn()
            t0 = time.monotonic()
            status, note = -1, ""
            try:
                status, note, keep = self._send(conn, kind, rng)
            except (OSError, http.client.HTTPException) as e:
                keep, note = False, repr(e)[:200]
            took = time.monotonic() - t0
            if not keep:
                conn.close()
                conn = None
            self._count(kind, status, note, took)
        if conn is not None:
            conn.close()

    def _send(self, conn, kind, rng):
        """(status, note, keep the connection) for one request of ``kind``."""
        if kind == "miss":
            body = _chat("bench-model", self._unique())
        elif kind == "hit":
            body = _chat("bench-model", f"soak repeated prompt {rng.randrange(HIT_PROMPTS)}")
        elif kind in ("stream", "disconnect"):
            body = _chat("m", self._unique(), stream=True)
        elif kind == "not_found":
            body = _chat("no-such-model", "hello")
        else:  # bad_body: messages must be a list
            body = b'{"model":"bench-model","messages":"not a list"}'
        conn.request("POST", PATH, body, self.headers)
        response = conn.getresponse()
        status = response.status
        if status != 200 or kind not in ("stream", "disconnect"):
            data = response.read()
            if kind in ("miss", "hit") and status == 200:
                result = response.getheader("X-Cache", "-")
                with self.lock:
                    self.cache[f"{kind} {result}"] = self.cache.get(f"{kind} {result}", 0) + 1
            return status, data[:200].decode(errors="replace"), not response.will_close
        if kind == "disconnect":
            for _ in range(1000):
                line = response.readline()
                if not line or line.startswith(b"data:"):
                    break
            return status, "", False  # the caller closes the socket mid-stream
        done = False
        for _, line in services.sse_data(response, 10_000):  # read to the end: keep-alive
            done = done or line.startswith(b"data: [DONE]")
        if not done:
            return -2, "stream ended without [DONE]", False
        return status, "", not response.will_close

    def _count(self, kind, status, note, took):
        with self.lock:
            self.sent += 1
            self.by_kind[kind] += 1
            self.latency[kind].append(took)
            if status != EXPECTED[kind]:
                self.unexpected += 1
                if status < 0:
                    self.socket_errors += 1
                elif status >= 500:
                    self.server_errors += 1
                key = f"{kind} {status if status >= 0 else 'socket/incomplete'}"
                self.outcomes[key] = self.outcomes.get(key, 0) + 1
                self.examples.setdefault(key, note)

    def summary(self, seconds):
        lat = {}
        for kind, values in self.latency.items():
            v = sorted(values)
            lat[kind] = {"count": len(v), "p50_ms": _q(v, 50), "p99_ms": _q(v, 99),
                         "max_ms": _q(v, 100)}
        return {"sent": self.sent, "rps": round(self.sent / seconds, 1) if seconds else 0,
                "by_kind": self.by_kind, "unexpected": self.unexpected,
                "server_errors": self.server_errors, "socket_errors": self.socket_errors,
                "unexpected_by_kind": self.outcomes, "examples": self.examples,
                "x_cache": self.cache, "skipped_slots": self.pacer.skipped, "latency": lat}


def _chat(model, prompt, stream=False) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def _q(sorted_values, q):
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, int(q / 100 * len(sorted_values)))
    return round(sorted_values[i] * 1000, 2)


def probe(url, auth) -> tuple[int, str]:
    """One chat request (a miss to nginx); (status, body start)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = f"Bearer {auth}"
    try:
        conn.request("POST", PATH, _chat("bench-model", f"warm-up {secrets.token_hex(4)}"),
                     headers)
        response = conn.getresponse()
        return response.status, response.read()[:300].decode(errors="replace")
    finally:
        conn.close()


def warm_up(url, key) -> str | None:
    """The first request; a 401 means keys are required: returns the key to send, or None."""
    status, body = probe(url, None)
    if status == 401:
        status, body = probe(url, key)
        if status != 200:
            raise RuntimeError(f"the warm-up request with the soak key got {status}: {body}")
        return key
    if status != 200:
        raise RuntimeError(f"the warm-up request got {status}: {body}")
    return None


# -- measuring the proxy process ---------------------------------------------------------------

def snapshot(pid, upstream_port) -> dict:
    out = services.proc_counts(pid)
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
        # Any state: a pooled connection that nginx has closed sits in CLOSE_WAIT until the
        # pool next looks at it; it is still one of the pool's, not a leak.
        out["upstream_conns"] = sum(1 for c in conns if c.raddr and c.raddr.port == upstream_port)
        out["client_conns"] = sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED
                                  and c.laddr and c.raddr and c.raddr.port != upstream_port)
    except (psutil.Error, OSError):
        out["upstream_conns"] = out["client_conns"] = -1
    return out


class Sampler(threading.Thread):
    """Every ``interval`` s: one CSV row of the proxy's figures and the load's counters."""

    FIELDS = ("elapsed_s", "rss_mb", "threads", "fds", "upstream_conns", "requests",
              "unexpected_errors", "rate_rps", "proxy_cpu_pct", "others_cpu_pct")

    def __init__(self, pid, upstream_port, load, interval, ours, csv_path=None):
        super().__init__(daemon=True)
        self.csv_path = csv_path  # rows are appended as they come: a killed run keeps them
        self.pid, self.port, self.load, self.interval = pid, upstream_port, load, interval
        self.ours = ours
        self.rows = []
        self.stop = threading.Event()
        self.start_t = time.monotonic()

    def run(self):
        cpu_before = machine.cpu_sample(self.pid, self.ours())
        last_sent = 0
        out = None
        if self.csv_path:
            os.makedirs(os.path.dirname(self.csv_path), exist_ok=True)
            out = open(self.csv_path, "w", newline="")
            writer = csv.DictWriter(out, fieldnames=self.FIELDS)
            writer.writeheader()
        try:
            self._loop(cpu_before, last_sent, out, writer if out else None)
        finally:
            if out:
                out.close()

    def _loop(self, cpu_before, last_sent, out, writer):
        while not self.stop.wait(self.interval):
            try:
                cpu_after = machine.cpu_sample(self.pid, self.ours())
                cpu = machine.cpu_use(cpu_before, cpu_after)
                cpu_before = cpu_after
                s = snapshot(self.pid, self.port)
                sent = self.load.sent
                self.rows.append({
                    "elapsed_s": round(time.monotonic() - self.start_t, 1),
                    "rss_mb": s["rss_mb"], "threads": s["threads"], "fds": s["fds"],
                    "upstream_conns": s["upstream_conns"], "requests": sent,
                    "unexpected_errors": self.load.unexpected,
                    "rate_rps": round((sent - last_sent) / self.interval, 1),
                    "proxy_cpu_pct": cpu["proxy_cpu_pct"],
                    "others_cpu_pct": round(cpu["others_cpu_pct"] + cpu["steal_pct"], 1)})
                last_sent = sent
                r = self.rows[-1]
                if writer:
                    writer.writerow(r)
                    out.flush()
                if len(self.rows) % 12 == 1:
                    _log(f"{r['elapsed_s']:.0f} s: RSS {r['rss_mb']} MB, threads {r['threads']}"
                         f", fds {r['fds']}, {r['requests']} requests, {r['rate_rps']} req/s, "
                         f"{r['unexpected_errors']} unexpected, other CPU {r['others_cpu_pct']}%")
            except Exception as e:  # one bad tick must not end the sampling
                _log(f"sampler: {e!r}")


# -- the run -------------------------------------------------------------------------------------

def run(args) -> dict:
    key = secrets.token_hex(16)  # 32 characters
    env, env_notes = proxy_env(key)
    for item in args.proxy_env:
        name, value = item.split("=", 1)
        env[name] = value
        env_notes.append(item)
    seconds = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="llm-proxy-soak-") as tmp, \
            services.ProcessSet() as procs:
        ours = lambda: {os.getpid()} | {p.pid for p in procs.processes}  # noqa: E731
        upstream = services.start_nginx(procs, tmp)
        upstream_port = urlsplit(upstream).port
        maximum = None
        rate = args.rate
        if not rate:
            proxy = start(procs, tmp, "max", upstream, env, args.source)
            auth = warm_up(proxy.url, key)
            _log(f"maximum rate: {args.max_workers} threads closed-loop for "
                 f"{args.max_seconds:g} s")
            before = machine.cpu_sample(proxy.process.pid, ours())
            load = Load(proxy.url, auth=auth, rate=0, seconds=args.max_seconds,
                        workers=args.max_workers, seed=7)
            t0 = time.monotonic()
            load.start()
            load.join()
            took = time.monotonic() - t0
            cpu = machine.cpu_use(before, machine.cpu_sample(proxy.process.pid, ours()))
            maximum = {**load.summary(took), **cpu, "workers": args.max_workers,
                       "seconds": args.max_seconds}
            maximum.pop("latency")
            procs.stop(proxy.process)
            rate = round(maximum["rps"] / 2, 1)
            _log(f"maximum {maximum['rps']} req/s (proxy CPU {cpu['proxy_cpu_pct']}%, other "
                 f"{cpu['others_cpu_pct']}%, {maximum['unexpected']} unexpected): soak at "
                 f"{rate} req/s")
        proxy = start(procs, tmp, "soak", upstream, env, args.source)
        pid = proxy.process.pid
        auth = warm_up(proxy.url, key)
        time.sleep(2)
        idle = snapshot(pid, upstream_port)
        _log(f"idle after one request: {idle}; auth {'on' if auth else 'off'}; "
             f"{rate} req/s for {args.minutes:g} min")
        load = Load(proxy.url, auth=auth, rate=rate, seconds=seconds, workers=args.workers)
        sampler = Sampler(pid, upstream_port, load, args.sample, ours,
                          csv_path=os.path.join(services.RESULTS, args.output + ".csv"))
        cpu_before = machine.cpu_sample(pid, ours())
        load_start = time.monotonic()
        sampler.start_t = load_start
        sampler.start()
        load.start()
        try:
            load.join()
        finally:
            load.stop.set()
        load_seconds = time.monotonic() - load_start
        sampler.stop.set()
        sampler.join(30)
        cpu = machine.cpu_use(cpu_before, machine.cpu_sample(pid, ours()))
        end_of_load = snapshot(pid, upstream_port)
        _log(f"load done: {load.sent} requests in {load_seconds:.0f} s; waiting 10 s")
        time.sleep(10)
        after = snapshot(pid, upstream_port)
        expiry = 30.0  # http_client.keepalive_expiry (default; the config does not change it)
        time.sleep(max(0.0, load_start + load_seconds + expiry + 2 - time.monotonic()))
        status, _ = probe(proxy.url, auth)  # the pool drops connections idle past the expiry
        time.sleep(2)
        after_expiry = {**snapshot(pid, upstream_port), "probe_status": status}
        log_facts = _proxy_log_facts(os.path.join(tmp, "proxy-soak.log"))
        if proxy.process.poll() is not None:
            log_facts["exit_code"] = proxy.process.poll()
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine.describe(),
        "command": " ".join([".venv/bin/python -m bench.soak", *map(shlex.quote, args.argv)]),
        "settings": {"minutes": args.minutes, "rate": rate, "rate_given": bool(args.rate),
                     "workers": args.workers, "sample_s": args.sample,
                     "proxy_env": env_notes, "mix": dict(MIX), "mock": MOCK_PROVIDER,
                     "auth_required": bool(auth), "source": machine.describe_source(args.source)},
        "maximum": maximum, "idle": idle, "end_of_load": end_of_load, "after_10s": after,
        "after_expiry": after_expiry, "load": load.summary(load_seconds),
        "load_seconds": round(load_seconds, 1), "cpu": cpu, "proxy_log": log_facts,
        "samples": sampler.rows}
    verdict(report)
    write(report, args.output)
    return report


def _proxy_log_facts(path) -> dict:
    """Lines of the proxy's log that are not access-log JSON: warnings, errors, tracebacks."""
    count, first, queue = 0, [], 0
    if os.path.exists(path):
        with open(path, errors="replace") as f:
            for line in f:
                if line.startswith("{"):
                    continue
                count += 1
                if "Task queue depth" in line:
                    queue += 1
                if len(first) < 20:
                    first.append(line.rstrip()[:300])
    return {"other_lines": count, "first_other_lines": first, "queue_depth_warnings": queue}


def verdict(report):
    rows = report["samples"]
    total = report["load_seconds"]
    ref_t = 300.0 if total >= 600 else total / 2
    report["reference_s"] = ref_t
    # One sample swings by a megabyte (requests in flight, what the last trim gave back): each
    # end of the comparison is the median of a window of samples, the first after the reference
    # time and the last of the load.
    window = min(WINDOW_S, ref_t / 2)
    ref_rows = [r["rss_mb"] for r in rows if ref_t <= r["elapsed_s"] < ref_t + window]
    end_rows = [r["rss_mb"] for r in rows if r["elapsed_s"] > total - window]
    idle, after = report["idle"], report["after_10s"]
    checks = []
    checks.append(("idle RSS", f"{idle['rss_mb']:.1f} MB", f"<= {RSS_LIMIT_MB:g} MB",
                   idle["rss_mb"] <= RSS_LIMIT_MB))
    if ref_rows and end_rows:
        ref_mb, end_mb = statistics.median(ref_rows), statistics.median(end_rows)
        growth = (end_mb - ref_mb) / ref_mb
        later = [r["rss_mb"] for r in rows if r["elapsed_s"] >= ref_t]
        report.update(rss_ref_mb=ref_mb, rss_end_mb=end_mb, rss_growth=growth,
                      rss_window_s=window, rss_max_after_ref_mb=max(later))
        checks.append((f"RSS growth from {ref_t:.0f} s to the end of the load (medians of "
                       f"{window:.0f} s of samples; highest sample {max(later):.1f} MB)",
                       f"{ref_mb:.1f} -> {end_mb:.1f} MB ({growth * 100:+.2f}%)",
                       f"< {GROWTH_LIMIT * 100:g}%", growth < GROWTH_LIMIT))
    checks.append(("threads 10 s after the load", f"{after['threads']} (idle {idle['threads']})",
                   "= idle", after["threads"] == idle["threads"]))
    # The pooled keep-alive connections to nginx are not a leak: the pool keeps what the load
    # needed until keepalive_expiry, then drops them on the next request. So: fds other than
    # those 10 s after the load, and every fd once the expiry has passed.
    pooled = max(0, after["upstream_conns"] - idle["upstream_conns"])
    checks.append(("open fds 10 s after the load, pooled upstream connections left out",
                   f"{after['fds']} - {pooled} pooled = {after['fds'] - pooled} (idle "
                   f"{idle['fds']}; upstream conns {after['upstream_conns']}, idle "
                   f"{idle['upstream_conns']})", f"<= idle + {FD_TOLERANCE}",
                   after["fds"] - pooled <= idle["fds"] + FD_TOLERANCE))
    exp = report["after_expiry"]
    checks.append(("open fds after the keep-alive expiry + 1 request",
                   f"{exp['fds']} (idle {idle['fds']}; upstream conns {exp['upstream_conns']})",
                   f"<= idle + {FD_TOLERANCE}", exp["fds"] <= idle["fds"] + FD_TOLERANCE))
    load = report["load"]
    checks.append(("unexpected errors (5xx, socket, wrong status)",
                   f"{load['unexpected']} of {load['sent']:,}", "0 (information)", None))
    report["checks"] = [{"check": c, "measured": m, "limit": lim,
                         "result": "info" if ok is None else ("PASS" if ok else "MISS")}
                        for c, m, lim, ok in checks]
    report["pass"] = all(c["result"] != "MISS" for c in report["checks"])
    report["smoke"] = total < 600


def write(report, name):
    os.makedirs(services.RESULTS, exist_ok=True)
    base = os.path.join(services.RESULTS, name)
    with open(base + ".csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=Sampler.FIELDS)
        w.writeheader()
        w.writerows(report["samples"])
    os.replace(base + ".csv.tmp", base + ".csv")
    try:
        plot(report, base + ".png")
        report["plot"] = base + ".png"
    except ImportError:
        report["plot"] = None
        _log("matplotlib is missing (.venv/bin/pip install matplotlib): no plot")
    text = render(report)
    services.write_results(name, text, report)
    print(text)
    line = "PASS" if report["pass"] else "FAIL"
    print(f"bench.soak: {line}{' (smoke run)' if report['smoke'] else ''}: " + "; ".join(
        f"{c['check']} {c['measured']} [{c['result']}]" for c in report["checks"]))


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["samples"]
    minutes = [r["elapsed_s"] / 60 for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 2]})
    ax1.plot(minutes, [r["rss_mb"] for r in rows], color="tab:blue", label="RSS")
    ax1.axhline(report["idle"]["rss_mb"], color="gray", ls=":", label="idle RSS")
    if "rss_ref_mb" in report:
        ref_m = report["reference_s"] / 60
        ax1.axvline(ref_m, color="tab:orange", ls="--", label=f"reference ({ref_m:g} min)")
        ax1.axhspan(report["rss_ref_mb"], report["rss_ref_mb"] * (1 + GROWTH_LIMIT),
                    color="tab:green", alpha=0.15, label="+5% band")
    ax1.set_ylabel("RSS (MB)")
    ax1.legend(loc="lower right", fontsize=8)
    verdict_text = "PASS" if report["pass"] else "FAIL"
    s = report["settings"]
    ax1.set_title(f"llm-proxy soak, {s['minutes']:g} min at {s['rate']:g} req/s "
                  f"({report['load']['sent']:,} requests): {verdict_text}")
    ax2.plot(minutes, [r["threads"] for r in rows], color="tab:purple", label="threads")
    ax2.plot(minutes, [r["fds"] for r in rows], color="tab:red", label="open fds")
    ax2.axhline(report["idle"]["threads"], color="tab:purple", ls=":", lw=0.8)
    ax2.axhline(report["idle"]["fds"], color="tab:red", ls=":", lw=0.8)
    ax2.set_ylabel("count (dotted: idle)")
    ax2.set_xlabel("minutes since the load started")
    ax2.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(report) -> str:
    m, s, load = report["machine"], report["settings"], report["load"]
    rows = report["samples"]
    others = [r["others_cpu_pct"] for r in rows]
    shared = sum(1 for o in others if o > SHARED_PCT)
    # The per-sample figures count short-lived processes (other sessions' test runs) that the
    # whole-run figure misses when they ended before the load did: their mean is the better one.
    others_mean = sum(others) / len(others) if others else report["cpu"]["others_cpu_pct"]
    lines = [
        f"# llm-proxy soak, {report['date']}", "",
        f"- machine: {machine.summary(m)}",
        f"- proxy code: {s['source']}", f"- command: `{report['command']}`",
        f"- proxy: `python wsgi.py` on core 0, {', '.join(s['proxy_env'])}; providers: openai "
        f"type -> nginx (`bench-model`), mock (`m`, {MOCK_PROVIDER['chunks']} chunks "
        f"{MOCK_PROVIDER['chunk_delay_ms']} ms apart); API keys required: "
        f"{'yes' if s['auth_required'] else 'no'}",
        f"- load (core 1, with nginx): {s['workers']} threads, {s['rate']:g} req/s paced "
        + ("(given)" if s["rate_given"] else "(half the measured maximum)")
        + f", mix {json.dumps(s['mix'])} (%)",
    ]
    mx = report["maximum"]
    if mx:
        lines.append(f"- maximum: {mx['rps']:,} req/s closed-loop ({mx['workers']} threads, "
                     f"{mx['seconds']:g} s; proxy CPU {mx['proxy_cpu_pct']:.0f}%, other processes"
                     f" {mx['others_cpu_pct']:.0f}%; {mx['unexpected']} unexpected)")
    lines += [
        f"- soak: {load['sent']:,} requests in {report['load_seconds']:g} s = {load['rps']:,} "
        f"req/s ({load['skipped_slots']} slots skipped behind schedule); proxy CPU "
        f"{report['cpu']['proxy_cpu_pct']:.0f}%, other processes {others_mean:.0f}% of a core "
        f"(mean of the samples, steal included)"
        + (f" (**shared**: {shared} of {len(rows)} samples had other processes over "
           f"{SHARED_PCT}% of a core)" if shared else ""),
        "", "| point | RSS MB | threads | fds | upstream conns |", "| --- | ---: | ---: | ---: | ---: |"]
    points = [("idle (after one request)", report["idle"])]
    ref = next((r for r in rows if r["elapsed_s"] >= report["reference_s"]), None)
    if ref:
        points.append((f"load, {ref['elapsed_s']:.0f} s (reference)", ref))
    if rows:
        points.append((f"load, {rows[-1]['elapsed_s']:.0f} s (end)", rows[-1]))
    points += [("10 s after the load", report["after_10s"]),
               ("after keep-alive expiry + 1 request (info)", report["after_expiry"])]
    for name, p in points:
        lines.append(f"| {name} | {p['rss_mb']:.1f} | {p['threads']} | {p['fds']} | "
                     f"{p.get('upstream_conns', '-')} |")
    lines += ["", "| kind | requests | p50 ms | p99 ms | max ms |", "| --- | ---: | ---: | ---: | ---: |"]
    for kind, v in load["latency"].items():
        lines.append(f"| {kind} | {v['count']:,} | {v['p50_ms']} | {v['p99_ms']} | {v['max_ms']} |")
    lines += ["", f"X-Cache on misses/hits: {json.dumps(load['x_cache'])}; unexpected: "
              f"{load['unexpected']} ({load['server_errors']} 5xx, {load['socket_errors']} "
              f"socket/incomplete)"]
    for k, n in load["unexpected_by_kind"].items():
        lines.append(f"- {n} x {k}: `{load['examples'].get(k, '')[:200]}`")
    pl = report["proxy_log"]
    lines.append(f"\nProxy log lines other than access-log JSON: {pl['other_lines']} "
                 f"(waitress queue-depth warnings: {pl['queue_depth_warnings']})")
    for line in pl["first_other_lines"][:10]:
        lines.append(f"    {line}")
    lines += ["", "| check | measured | limit | result |", "| --- | --- | --- | --- |"]
    for c in report["checks"]:
        lines.append(f"| {c['check']} | {c['measured']} | {c['limit']} | {c['result']} |")
    if report["smoke"]:
        lines.append(f"\nA run under 10 minutes is a smoke check: the RSS reference is half-time "
                     f"({report['reference_s']:.0f} s), not 5 minutes.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
