"""Soak: the proxy's memory, threads and fds under long mixed traffic, and back to idle after.

The production profile in front of nginx and the mock provider; this process is the load (the
mix, paced at half the measured maximum unless ``--rate``), on core 1 with nginx. Every
``--sample`` s a row of ``<output>.csv``; ``<output>.png`` plots them (bench/README.md).
"""

from __future__ import annotations

import array
import csv
import http.client
import json
import os
import random
import secrets
import statistics
import threading
import time
from urllib.parse import urlsplit

import psutil

from bench import machine, report, services

TOOLS = ("nginx", "taskset")
TITLE = "soak"
OUTPUT = "soak"
QUICK = {"minutes": 0.5, "max_seconds": 5.0}
LIMITS = {"minutes": (0.5, 24 * 60), "rate": (0, 20000), "workers": (1, 128),
          "max_workers": (1, 128), "max_seconds": (3, 120), "sample": (1, 60)}
RSS_LIMIT_MB, GROWTH_LIMIT = 60.0, 0.05
WINDOW_S = 60.0  # each end of the RSS growth comparison: the median of this many seconds
# fds after the load may exceed idle by the upstream keep-alive pool: the idle figure is taken
# after one request (one pooled connection to nginx); the load leaves as many pooled connections
# as misses were in flight at once, and the pool drops them only on the first request after
# ``http_client.keepalive_expiry`` (30 s) of idleness. +2 allows a couple; the CSV's
# upstream_conns column and the "after expiry" point show what they are.
FD_TOLERANCE = 2
MIX = (("miss", 40), ("hit", 30), ("stream", 15), ("not_found", 5), ("bad_body", 5),
       ("disconnect", 5))
EXPECTED = {"miss": 200, "hit": 200, "stream": 200, "not_found": 404, "bad_body": 400,
            "disconnect": 200}
HIT_PROMPTS = 20
MOCK_PROVIDER = {"name": "mock", "type": "mock", "models": ["m"], "chunks": 8,
                 "chunk_delay_ms": 5}


def add_arguments(p) -> None:
    p.add_argument("--minutes", type=float, default=30.0, help="soak duration (default 30)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="soak rate in req/s; default: half the measured maximum")
    p.add_argument("--workers", type=int, default=16, help="load threads during the soak (16)")
    p.add_argument("--max-workers", type=int, default=32, help="threads for the maximum (32)")
    p.add_argument("--max-seconds", type=float, default=15.0, help="maximum-rate run, s (15)")
    p.add_argument("--sample", type=float, default=5.0, help="seconds between CSV rows (5)")
    p.add_argument("--proxy-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the proxy, e.g. MALLOC_ARENA_MAX=2 (repeatable)")


def configure(p, args) -> None:
    if any("=" not in e or not e.split("=", 1)[0] for e in args.proxy_env):
        p.error("--proxy-env takes NAME=VALUE")


_log = report.progress

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
            body = services.chat_body("bench-model", self._unique())
        elif kind == "hit":
            prompt = f"soak repeated prompt {rng.randrange(HIT_PROMPTS)}"
            body = services.chat_body("bench-model", prompt)
        elif kind in ("stream", "disconnect"):
            body = services.chat_body("m", self._unique(), stream=True)
        elif kind == "not_found":
            body = services.chat_body("no-such-model", "hello")
        else:  # bad_body: messages must be a list
            body = b'{"model":"bench-model","messages":"not a list"}'
        conn.request("POST", services.PATH, body, self.headers)
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
            lat[kind] = {"count": len(values), **{
                name: report.percentile_ms(values, q, 2)
                for name, q in (("p50_ms", 50), ("p99_ms", 99), ("max_ms", 100))}}
        return {"sent": self.sent, "rps": round(self.sent / seconds, 1) if seconds else 0,
                "by_kind": self.by_kind, "unexpected": self.unexpected,
                "server_errors": self.server_errors, "socket_errors": self.socket_errors,
                "unexpected_by_kind": self.outcomes, "examples": self.examples,
                "x_cache": self.cache, "skipped_slots": self.pacer.skipped, "latency": lat}


def probe(url, auth) -> tuple[int, str]:
    """One chat request (a miss to nginx); (status, body start)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = f"Bearer {auth}"
    try:
        body = services.chat_body("bench-model", f"warm-up {secrets.token_hex(4)}")
        conn.request("POST", services.PATH, body, headers)
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
    """Every ``interval`` s: one row of the proxy's figures and the load's counters, appended to
    ``csv_path`` as it comes (a killed run keeps its rows)."""

    FIELDS = ("elapsed_s", "rss_mb", "threads", "fds", "upstream_conns", "requests",
              "unexpected_errors", "rate_rps", "proxy_cpu_pct", "others_cpu_pct")

    def __init__(self, pid, upstream_port, load, interval, procs, csv_path):
        super().__init__(daemon=True)
        self.pid, self.port, self.load, self.interval = pid, upstream_port, load, interval
        self.procs, self.csv_path = procs, csv_path
        self.rows = []
        self.stop = threading.Event()
        self.start_t = time.monotonic()

    def run(self):
        cpu_before, last_sent = machine.cpu_sample(self.pid, self.procs.pids()), 0
        os.makedirs(os.path.dirname(self.csv_path), exist_ok=True)
        with open(self.csv_path, "w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=self.FIELDS)
            writer.writeheader()
            while not self.stop.wait(self.interval):
                try:
                    cpu_after = machine.cpu_sample(self.pid, self.procs.pids())
                    cpu = machine.cpu_use(cpu_before, cpu_after)
                    cpu_before, s, sent = cpu_after, snapshot(self.pid, self.port), self.load.sent
                    r = {"elapsed_s": round(time.monotonic() - self.start_t, 1),
                         "rss_mb": s["rss_mb"], "threads": s["threads"], "fds": s["fds"],
                         "upstream_conns": s["upstream_conns"], "requests": sent,
                         "unexpected_errors": self.load.unexpected,
                         "rate_rps": round((sent - last_sent) / self.interval, 1),
                         "proxy_cpu_pct": cpu["proxy_cpu_pct"],
                         "others_cpu_pct": round(cpu["others_cpu_pct"] + cpu["steal_pct"], 1)}
                    self.rows.append(r)
                    last_sent = sent
                    writer.writerow(r)
                    out.flush()
                    if len(self.rows) % 12 == 1:
                        _log(f"{r['elapsed_s']:.0f} s: RSS {r['rss_mb']} MB, threads "
                             f"{r['threads']}, fds {r['fds']}, {r['requests']} requests, "
                             f"{r['rate_rps']} req/s, {r['unexpected_errors']} unexpected, other"
                             f" CPU {r['others_cpu_pct']}%")
                except Exception as e:  # one bad tick must not end the sampling
                    _log(f"sampler: {e!r}")


# -- the run -------------------------------------------------------------------------------------

def measure(args, procs, tmp) -> dict:
    os.sched_setaffinity(0, {int(services.LOAD_CORE)})
    key = secrets.token_hex(16)  # 32 characters
    env, env_notes = proxy_env(key)
    for item in args.proxy_env:
        name, value = item.split("=", 1)
        env[name] = value
        env_notes.append(item)
    seconds = args.minutes * 60
    upstream = services.start_nginx(procs, tmp)
    upstream_port = urlsplit(upstream).port
    maximum = None
    rate = args.rate
    if not rate:
        proxy = start(procs, tmp, "max", upstream, env, args.source)
        auth = warm_up(proxy.url, key)
        _log(f"maximum rate: {args.max_workers} threads closed-loop for {args.max_seconds:g} s")
        load = Load(proxy.url, auth=auth, rate=0, seconds=args.max_seconds,
                    workers=args.max_workers, seed=7)
        t0 = time.monotonic()
        with machine.cpu_meter(proxy.process.pid, procs) as cpu:
            load.start()
            load.join()
        maximum = {**load.summary(time.monotonic() - t0), **cpu, "workers": args.max_workers,
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
    sampler = Sampler(pid, upstream_port, load, args.sample, procs, args.output + ".csv")
    with machine.cpu_meter(pid, procs) as cpu:
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
    end_of_load = snapshot(pid, upstream_port)
    _log(f"load done: {load.sent} requests in {load_seconds:.0f} s; waiting 10 s")
    time.sleep(10)
    after = snapshot(pid, upstream_port)
    expiry = 30.0  # http_client.keepalive_expiry (default; the config does not change it)
    time.sleep(max(0.0, load_start + load_seconds + expiry + 2 - time.monotonic()))
    status, _ = probe(proxy.url, auth)  # the pool drops connections idle past the expiry
    time.sleep(2)
    after_expiry = {**snapshot(pid, upstream_port), "probe_status": status}
    log_facts = services.proxy_log_facts(proxy.log)
    if proxy.process.poll() is not None:
        log_facts["exit_code"] = proxy.process.poll()
    rep = {
        "settings": {"minutes": args.minutes, "rate": rate, "rate_given": bool(args.rate),
                     "workers": args.workers, "sample_s": args.sample,
                     "proxy_env": env_notes, "mix": dict(MIX), "mock": MOCK_PROVIDER,
                     "auth_required": bool(auth)},
        "maximum": maximum, "idle": idle, "end_of_load": end_of_load, "after_10s": after,
        "after_expiry": after_expiry, "load": load.summary(load_seconds),
        "load_seconds": round(load_seconds, 1), "cpu": cpu, "proxy_log": log_facts,
        "samples": sampler.rows}
    verdict(rep)
    write(rep, args.output)
    return rep


def verdict(rep):
    """The checks (``targets``), ``pass`` and ``smoke`` (a run under 10 minutes)."""
    rows = rep["samples"]
    total = rep["load_seconds"]
    ref_t = 300.0 if total >= 600 else total / 2
    rep["reference_s"] = ref_t
    # One sample swings by a megabyte (requests in flight, what the last trim gave back): each
    # end of the comparison is the median of a window of samples, the first after the reference
    # time and the last of the load.
    window = min(WINDOW_S, ref_t / 2)
    ref_rows = [r["rss_mb"] for r in rows if ref_t <= r["elapsed_s"] < ref_t + window]
    end_rows = [r["rss_mb"] for r in rows if r["elapsed_s"] > total - window]
    idle, after = rep["idle"], rep["after_10s"]
    checks = [report.target("idle RSS", f"{idle['rss_mb']:.1f} MB", f"<= {RSS_LIMIT_MB:g} MB",
                            idle["rss_mb"] <= RSS_LIMIT_MB)]
    if ref_rows and end_rows:
        ref_mb, end_mb = statistics.median(ref_rows), statistics.median(end_rows)
        growth = (end_mb - ref_mb) / ref_mb
        later = [r["rss_mb"] for r in rows if r["elapsed_s"] >= ref_t]
        rep.update(rss_ref_mb=ref_mb, rss_end_mb=end_mb, rss_growth=growth,
                   rss_window_s=window, rss_max_after_ref_mb=max(later))
        checks.append(report.target(
            f"RSS growth from {ref_t:.0f} s to the end of the load (medians of {window:.0f} s "
            f"of samples; highest sample {max(later):.1f} MB)",
            f"{ref_mb:.1f} -> {end_mb:.1f} MB ({growth * 100:+.2f}%)",
            f"< {GROWTH_LIMIT * 100:g}%", growth < GROWTH_LIMIT))
    checks.append(report.target("threads 10 s after the load",
                                f"{after['threads']} (idle {idle['threads']})", "= idle",
                                after["threads"] == idle["threads"]))
    # The pooled keep-alive connections to nginx are not a leak: the pool keeps what the load
    # needed until keepalive_expiry, then drops them on the next request. So: fds other than
    # those 10 s after the load, and every fd once the expiry has passed.
    pooled = max(0, after["upstream_conns"] - idle["upstream_conns"])
    checks.append(report.target(
        "open fds 10 s after the load, pooled upstream connections left out",
        f"{after['fds']} - {pooled} pooled = {after['fds'] - pooled} (idle {idle['fds']}; "
        f"upstream conns {after['upstream_conns']}, idle {idle['upstream_conns']})",
        f"<= idle + {FD_TOLERANCE}", after["fds"] - pooled <= idle["fds"] + FD_TOLERANCE))
    exp = rep["after_expiry"]
    checks.append(report.target(
        "open fds after the keep-alive expiry + 1 request",
        f"{exp['fds']} (idle {idle['fds']}; upstream conns {exp['upstream_conns']})",
        f"<= idle + {FD_TOLERANCE}", exp["fds"] <= idle["fds"] + FD_TOLERANCE))
    load = rep["load"]
    checks.append(report.target("unexpected errors (5xx, socket, wrong status)",
                                f"{load['unexpected']} of {load['sent']:,}", "0 (information)",
                                None))
    rep["targets"] = checks
    rep["pass"] = report.passed(checks)
    rep["smoke"] = total < 600


def write(rep, base):
    """``<base>.png``: the samples plotted (with matplotlib; the CSV is written as they come)."""
    try:
        plot(rep, base + ".png")
        rep["plot"] = base + ".png"
    except ImportError:
        rep["plot"] = None
        _log("matplotlib is missing (.venv/bin/pip install -r requirements-bench.txt): no plot")


def plot(rep, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = rep["samples"]
    minutes = [r["elapsed_s"] / 60 for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 2]})
    ax1.plot(minutes, [r["rss_mb"] for r in rows], color="tab:blue", label="RSS")
    ax1.axhline(rep["idle"]["rss_mb"], color="gray", ls=":", label="idle RSS")
    if "rss_ref_mb" in rep:
        ref_m = rep["reference_s"] / 60
        ax1.axvline(ref_m, color="tab:orange", ls="--", label=f"reference ({ref_m:g} min)")
        ax1.axhspan(rep["rss_ref_mb"], rep["rss_ref_mb"] * (1 + GROWTH_LIMIT),
                    color="tab:green", alpha=0.15, label="+5% band")
    ax1.set_ylabel("RSS (MB)")
    ax1.legend(loc="lower right", fontsize=8)
    verdict_text = "PASS" if rep["pass"] else "FAIL"
    s = rep["settings"]
    ax1.set_title(f"llm-proxy soak, {s['minutes']:g} min at {s['rate']:g} req/s "
                  f"({rep['load']['sent']:,} requests): {verdict_text}")
    ax2.plot(minutes, [r["threads"] for r in rows], color="tab:purple", label="threads")
    ax2.plot(minutes, [r["fds"] for r in rows], color="tab:red", label="open fds")
    ax2.axhline(rep["idle"]["threads"], color="tab:purple", ls=":", lw=0.8)
    ax2.axhline(rep["idle"]["fds"], color="tab:red", ls=":", lw=0.8)
    ax2.set_ylabel("count (dotted: idle)")
    ax2.set_xlabel("minutes since the load started")
    ax2.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(rep) -> list[str]:
    s, load = rep["settings"], rep["load"]
    rows = rep["samples"]
    others = [r["others_cpu_pct"] for r in rows]
    shared = sum(1 for r in rows if machine.shared(r))
    # The per-sample figures count short-lived processes (other sessions' test runs) that the
    # whole-run figure misses when they ended before the load did: their mean is the better one.
    others_mean = sum(others) / len(others) if others else rep["cpu"]["others_cpu_pct"]
    lines = [
        f"- proxy: `python wsgi.py` on core {services.PROXY_CORE}, {', '.join(s['proxy_env'])}; "
        f"providers: openai type -> nginx (`bench-model`), mock (`m`, {MOCK_PROVIDER['chunks']} "
        f"chunks {MOCK_PROVIDER['chunk_delay_ms']} ms apart); API keys required: "
        f"{'yes' if s['auth_required'] else 'no'}",
        f"- load (core {services.LOAD_CORE}, with nginx): {s['workers']} threads, {s['rate']:g} "
        "req/s paced " + ("(given)" if s["rate_given"] else "(half the measured maximum)")
        + f", mix {json.dumps(s['mix'])} (%)"]
    mx = rep["maximum"]
    if mx:
        lines.append(f"- maximum: {mx['rps']:,} req/s closed-loop ({mx['workers']} threads, "
                     f"{mx['seconds']:g} s; proxy CPU {mx['proxy_cpu_pct']:.0f}%, other processes"
                     f" {mx['others_cpu_pct']:.0f}%; {mx['unexpected']} unexpected)")
    lines += [
        f"- soak: {load['sent']:,} requests in {rep['load_seconds']:g} s = {load['rps']:,} "
        f"req/s ({load['skipped_slots']} slots skipped behind schedule); proxy CPU "
        f"{rep['cpu']['proxy_cpu_pct']:.0f}%, other processes {others_mean:.0f}% of a core "
        f"(mean of the samples, steal included)"
        + (f" (**shared**: {shared} of {len(rows)} samples had other processes over "
           f"{machine.SHARED_PCT}% of a core)" if shared else ""),
        "", "| point | RSS MB | threads | fds | upstream conns |", "| --- | ---: | ---: | ---: | ---: |"]
    points = [("idle (after one request)", rep["idle"])]
    ref = next((r for r in rows if r["elapsed_s"] >= rep["reference_s"]), None)
    if ref:
        points.append((f"load, {ref['elapsed_s']:.0f} s (reference)", ref))
    if rows:
        points.append((f"load, {rows[-1]['elapsed_s']:.0f} s (end)", rows[-1]))
    points += [("10 s after the load", rep["after_10s"]),
               ("after keep-alive expiry + 1 request (info)", rep["after_expiry"])]
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
    pl = rep["proxy_log"]
    lines.append(f"\nProxy log lines other than access-log JSON: {pl['other_lines']} "
                 f"(waitress queue-depth warnings: {pl['queue_depth_warnings']})")
    for line in pl["first_other_lines"][:10]:
        lines.append(f"    {line}")
    if rep["smoke"]:
        lines.append(f"\nA run under 10 minutes is a smoke check: the RSS reference is half-time "
                     f"({rep['reference_s']:.0f} s), not 5 minutes.")
    return lines
