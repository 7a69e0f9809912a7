"""Streaming: what the proxy adds to an SSE stream, and 100 slow streams at once.

``bench.upstreams.sse`` (core 1) streams for the model ``sse-<chunks>-<delay ms>``; the proxy
(core 0, THREADS=256, cache off) relays it. This process is the client, on core 1: time to first
byte and the span to ``[DONE]``, direct and through the proxy, then ``--streams`` slow streams
held at once while ordinary requests keep coming (bench/README.md).
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from urllib.parse import urlsplit

from bench import machine, report, services

TOOLS = ("taskset",)
TITLE = "streaming benchmark"
OUTPUT = "streaming"
QUICK = {"reps": 50, "rounds": 1}
LIMITS = {"reps": (10, 5000), "chunks": (1, 5000), "streams": (1, 500), "rounds": (1, 20),
          "slow_chunks": (1, 1000), "slow_delay_ms": (0, 1000), "side_interval_ms": (1, 1000)}
TTFB_TARGET_MS, CHUNK_TARGET_MS = 1.0, 0.2
JSON_HEADERS = {"Content-Type": "application/json"}
SSE_HEADERS = {**JSON_HEADERS, "Accept": "text/event-stream"}
percentile_ms = report.percentile_ms


def add_arguments(p) -> None:
    p.add_argument("--reps", type=int, default=300, help="streams per (N, path) (default 300)")
    p.add_argument("--chunks", type=int, default=200, help="the long stream's chunks (200)")
    p.add_argument("--streams", type=int, default=100, help="concurrent slow streams (100)")
    p.add_argument("--rounds", type=int, default=3,
                   help="slow streams each of those threads opens one after another (3)")
    p.add_argument("--slow-chunks", type=int, default=40, help="chunks per slow stream (40)")
    p.add_argument("--slow-delay-ms", type=int, default=50, help="ms between them (50)")
    p.add_argument("--side-interval-ms", type=float, default=20.0,
                   help="ms between the non-streaming requests sent meanwhile (20)")
    p.add_argument("--threads", type=int, default=256,
                   help="the proxy's THREADS (256, as in the production profile)")
    p.add_argument("--provider-max-in-flight", type=int, default=0,
                   help="routing.provider_max_in_flight for the proxy (0: its derived default)")
    p.add_argument("--wait-quiet", type=float, default=60.0, metavar="SECONDS",
                   help="before each measurement, wait up to this long for an idle machine (60)")


def proxy_config(args) -> dict:
    routing = {"provider_max_in_flight": args.provider_max_in_flight} \
        if args.provider_max_in_flight else {}
    return {"cache": {"enabled": False}, **({"routing": routing} if routing else {})}


def measure(args, procs, tmp) -> dict:
    os.sched_setaffinity(0, {int(services.LOAD_CORE)})  # the client shares core 1 with the upstream
    upstream, _ = services.start_upstream(procs, tmp, "sse", lifetime=1800)
    providers = [{"name": "sse", "type": "openai", "base_url": upstream + "/v1",
                  "models": ["sse-*"]},
                 {"name": "mock", "type": "mock", "models": ["m"]}]
    proxy = services.start_proxy(procs, tmp, "streaming", providers, threads=args.threads,
                                 config=proxy_config(args), source=args.source)
    pid = proxy.process.pid
    rows = []
    for n in (1, args.chunks):
        for name, base in (("direct", upstream), ("proxy", proxy.url)):
            machine.wait_quiet(args.wait_quiet)
            report.progress(f"streaming N={n} {name}: {args.reps} streams")
            with machine.cpu_meter(pid, procs) as cpu:
                row = ttfb_run(base, n, args.reps)
            row.update(cpu, path=name, chunks=n)
            rows.append(row)
            report.progress(f"streaming N={n} {name}: TTFB p50 {row['ttfb_p50_ms']:.3f} ms, "
                            f"span p50 {row['span_p50_ms']:.3f} ms")
    report.progress(f"{args.streams} slow streams x {args.rounds} rounds ({args.slow_chunks} "
                    f"chunks {args.slow_delay_ms} ms apart)")
    machine.wait_quiet(args.wait_quiet)
    with machine.cpu_meter(pid, procs) as cpu:
        slow = slow_streams(proxy.url, args)
    slow.update(cpu, proxy_log=services.proxy_log_facts(proxy.log))
    report.progress(f"slow streams: {slow['streams_refused']} refused streams, "
                    f"{slow['side_refused']} refused other requests")
    rep = {"settings": {"reps": args.reps, "chunks": args.chunks, "streams": args.streams,
                        "rounds": args.rounds, "slow_chunks": args.slow_chunks,
                        "slow_delay_ms": args.slow_delay_ms,
                        "side_interval_ms": args.side_interval_ms, "threads": args.threads,
                        "proxy_config": proxy_config(args)},
           "rows": rows, "slow": slow, "proxy_after": services.proc_counts(pid)}
    rep["targets"] = targets(rep)
    rep["pass"] = report.passed(rep["targets"])
    return rep


class Client:
    """One keep-alive connection to ``base``, opened again after a socket error; the first
    body of each kind of failure is kept in ``examples`` (shared, under ``lock``)."""

    def __init__(self, base, examples, lock, timeout=30):
        parts = urlsplit(base)
        self.host, self.port, self.timeout = parts.hostname, parts.port, timeout
        self.examples, self.lock = examples, lock
        self.conn = self._open()

    def _open(self):
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def post(self, body, headers=SSE_HEADERS, tag=""):
        """The response, or None after a socket error (noted as ``<tag>socket``)."""
        try:
            self.conn.request("POST", services.PATH, body, headers)
            return self.conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            self.failed(f"{tag}socket", repr(e))
            return None

    def failed(self, kind, text):
        self.conn.close()
        self.conn = self._open()
        self.note(kind, text)

    def note(self, kind, text):
        with self.lock:
            self.examples.setdefault(kind, text[:300])

    def close(self):
        self.conn.close()


def read_stream(response):
    """(t first data line, t [DONE], data events) from an SSE response, read to its end."""
    first = last = None
    events = 0
    for now, line in services.sse_data(response):
        if first is None:
            first = now
        if line.startswith(b"data: [DONE]"):
            last = now
        else:
            events += 1
    return first, last, events


def ttfb_run(base, n, reps) -> dict:
    """``reps`` streams of ``n`` zero-delay chunks over one keep-alive connection (+10 warm-up)."""
    client = Client(base, {}, threading.Lock(), timeout=10)
    body = services.chat_body(f"sse-{n}-0", stream=True)
    ttfb, span, done, bad = [], [], [], 0
    for i in range(reps + 10):
        t0 = time.perf_counter()
        response = client.post(body)
        try:
            first, last, events = read_stream(response) if response else (None, None, 0)
        except (OSError, http.client.HTTPException) as e:
            client.failed("socket", repr(e))
            first = last = None
        if response is None or response.status != 200 or first is None or last is None \
                or events != n:
            bad += 1
            continue
        if i >= 10:
            ttfb.append(first - t0)
            span.append(last - first)
            done.append(last - t0)
    client.close()
    return {"reps": len(ttfb), "bad": bad,
            "ttfb_p50_ms": percentile_ms(ttfb, 50), "ttfb_p99_ms": percentile_ms(ttfb, 99),
            "span_p50_ms": percentile_ms(span, 50), "span_p99_ms": percentile_ms(span, 99),
            "done_p50_ms": percentile_ms(done, 50), "done_p99_ms": percentile_ms(done, 99)}


def slow_streams(base, args) -> dict:
    """``args.streams`` threads hold slow streams while one thread sends ordinary requests."""
    model = f"sse-{args.slow_chunks}-{args.slow_delay_ms}"
    lock = threading.Lock()
    streams, side = [], []  # (status, events, complete, seconds, max gap s) / (status, seconds)
    examples = {}
    active = [0, 0]  # streams open now, the most open at once
    start = threading.Barrier(args.streams + 1)
    stop_side = threading.Event()
    expected_s = args.slow_chunks * args.slow_delay_ms / 1000

    def stream(client, body):
        """(status, events, complete, max gap) of one slow stream."""
        response = client.post(body, JSON_HEADERS)
        if response is None:
            return -1, 0, False, 0.0
        if response.status != 200:
            client.note(str(response.status), response.read().decode(errors="replace"))
            return response.status, 0, False, 0.0
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
        events, complete, gap, prev = 0, False, 0.0, None
        try:
            for now, line in services.sse_data(response, 10_000):
                gap = max(gap, now - prev) if prev is not None else gap
                prev = now
                complete = complete or line.startswith(b"data: [DONE]")
                events += not line.startswith(b"data: [DONE]")
        except (OSError, http.client.HTTPException) as e:
            client.failed("socket", repr(e))
        with lock:
            active[0] -= 1
        return 200, events, complete, gap

    def streamer(k):
        client = Client(base, examples, lock)
        try:
            start.wait(30)
        except threading.BrokenBarrierError:
            return
        for r in range(args.rounds):
            t0 = time.perf_counter()
            status, events, complete, gap = stream(
                client, services.chat_body(model, f"hello {k}-{r}", stream=True))
            with lock:
                streams.append((status, events, complete, time.perf_counter() - t0, gap))
        client.close()

    def sider():
        client = Client(base, examples, lock)
        body = services.chat_body("m")
        interval = args.side_interval_ms / 1000
        deadline = time.monotonic() + args.rounds * (expected_s + 30)
        next_at = time.monotonic()
        for _ in range(100_000):
            if stop_side.is_set() or time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            response, status = client.post(body, JSON_HEADERS, tag="side "), -1
            if response is not None:
                try:
                    data, status = response.read(), response.status
                    if status != 200:
                        client.note(f"side {status}", data.decode(errors="replace"))
                except (OSError, http.client.HTTPException) as e:
                    client.failed("side socket", repr(e))
            with lock:
                side.append((status, time.perf_counter() - t0))
            next_at += interval
            stop_side.wait(max(0.0, next_at - time.monotonic()))
        client.close()

    workers = [threading.Thread(target=streamer, args=(k,), daemon=True)
               for k in range(args.streams)]
    for t in workers:
        t.start()
    side_thread = threading.Thread(target=sider, daemon=True)
    time.sleep(0.5)  # every stream thread is waiting at the barrier
    side_thread.start()
    time.sleep(0.2)  # a few ordinary requests before the streams start
    t_start = time.monotonic()
    try:
        start.wait(30)
    except threading.BrokenBarrierError:
        pass
    for t in workers:
        t.join(args.rounds * (expected_s + 60))
    wall = time.monotonic() - t_start
    time.sleep(0.2)
    stop_side.set()
    side_thread.join(30)
    ok_streams = [s for s in streams if s[0] == 200 and s[2] and s[1] == args.slow_chunks]
    side_ok = [s[1] for s in side if s[0] == 200]
    side_lat = [s[1] for s in side]
    return {
        "streams_total": len(streams), "streams_ok": len(ok_streams),
        "streams_refused": sum(1 for s in streams if s[0] != 200),
        "streams_incomplete": sum(1 for s in streams if s[0] == 200 and
                                  (not s[2] or s[1] != args.slow_chunks)),
        "max_concurrent_streams": active[1],
        "stream_duration_p50_ms": percentile_ms([s[3] for s in ok_streams], 50),
        "stream_duration_max_ms": percentile_ms([s[3] for s in ok_streams], 100),
        "stream_expected_ms": expected_s * 1000,
        "stream_max_gap_p99_ms": percentile_ms([s[4] for s in ok_streams], 99),
        "side_total": len(side), "side_ok": len(side_ok),
        "side_refused": len(side) - len(side_ok),
        "side_p50_ms": percentile_ms(side_lat, 50), "side_p99_ms": percentile_ms(side_lat, 99),
        "side_max_ms": percentile_ms(side_lat, 100),
        "wall_s": round(wall, 2), "examples": examples,
    }


def _row(rep, path, n):
    return next(r for r in rep["rows"] if r["path"] == path and r["chunks"] == n)


def targets(rep) -> list[dict]:
    n = rep["settings"]["chunks"]
    d1, p1 = _row(rep, "direct", 1), _row(rep, "proxy", 1)
    dn, pn = _row(rep, "direct", n), _row(rep, "proxy", n)
    added = p1["ttfb_p50_ms"] - d1["ttfb_p50_ms"]
    per_chunk = (pn["span_p50_ms"] - dn["span_p50_ms"]) / n
    # The span misses chunks the proxy had already processed before its first byte left (a
    # burst of zero-delay events is read in one go): the whole time to [DONE], less the N=1
    # difference, shows the full cost. Shown as information.
    whole = ((pn["done_p50_ms"] - dn["done_p50_ms"]) - (p1["done_p50_ms"] - d1["done_p50_ms"])) \
        / max(1, n - 1)
    rep["per_chunk_added_ms"], rep["per_chunk_added_whole_ms"] = round(per_chunk, 4), round(whole, 4)
    s = rep["slow"]
    return [
        report.target("TTFB p50 through the proxy - direct (N=1)",
                      f"{added:.3f} ms ({p1['ttfb_p50_ms']:.3f} - {d1['ttfb_p50_ms']:.3f})",
                      f"<= {TTFB_TARGET_MS} ms", added <= TTFB_TARGET_MS),
        report.target(f"added cost per relayed chunk (N={n}, p50 spans)",
                      f"{per_chunk:.4f} ms (({pn['span_p50_ms']:.3f} - {dn['span_p50_ms']:.3f})"
                      f" / {n})", f"<= {CHUNK_TARGET_MS} ms", per_chunk <= CHUNK_TARGET_MS),
        report.target(f"added cost per chunk from the time to [DONE] (N={n} vs N=1)",
                      f"{whole:.4f} ms", f"<= {CHUNK_TARGET_MS} ms", whole <= CHUNK_TARGET_MS,
                      info=True),
        report.target(f"{rep['settings']['streams']} concurrent slow streams, nothing refused",
                      f"{s['streams_refused']} streams + {s['side_refused']} other requests "
                      f"refused; {s['streams_incomplete']} streams incomplete; most streams open"
                      f" at once {s['max_concurrent_streams']}", "0 refused, 0 incomplete",
                      s["streams_refused"] + s["side_refused"] + s["streams_incomplete"] == 0),
    ]


def render(rep) -> list[str]:
    st = rep["settings"]
    lines = [
        f"- proxy: `python wsgi.py` on core {services.PROXY_CORE}, THREADS={st['threads']}, "
        f"LOG_LEVEL=WARNING, config {json.dumps(st['proxy_config'])}; providers: `sse` (openai "
        "type -> the SSE upstream, models `sse-*`) and `mock` (model `m`)",
        f"- upstream: `bench.upstreams.sse` (asyncio, chunked, keep-alive) on core "
        f"{services.LOAD_CORE}; client: this process on that core, `http.client`, one keep-alive"
        " connection",
        f"- TTFB: request sent -> first `data:` line; span: first `data:` line -> `data: [DONE]`"
        f"; {st['reps']} streams per row after 10 warm-up ones, zero-delay chunks",
        "", "| path | chunks | streams | TTFB p50 ms | TTFB p99 ms | span p50 ms | span p99 ms "
        "| to [DONE] p50 ms | bad | proxy CPU | other CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rep["rows"]:
        flag = " *(shared)*" if machine.shared(r) else ""
        cpu = "-" if r["path"] == "direct" else f"{r['proxy_cpu_pct']:.0f}%"
        lines.append(f"| {r['path']}{flag} | {r['chunks']} | {r['reps']} | {r['ttfb_p50_ms']:.3f} "
                     f"| {r['ttfb_p99_ms']:.3f} | {r['span_p50_ms']:.3f} | {r['span_p99_ms']:.3f}"
                     f" | {r['done_p50_ms']:.3f} | {r['bad']} | {cpu} | {r['others_cpu_pct']:.0f}% |")
    s = rep["slow"]
    flag = " *(shared)*" if machine.shared(s) else ""
    lines += [
        "", f"Slow streams{flag}: {st['streams']} threads x {st['rounds']} rounds, each stream "
        f"{st['slow_chunks']} chunks {st['slow_delay_ms']} ms apart "
        f"({s['stream_expected_ms']:.0f} ms), through the proxy; meanwhile one thread POSTs a "
        f"non-streaming request to the mock model `m` every {st['side_interval_ms']:g} ms.", "",
        "| what | total | ok | refused | incomplete | p50 ms | p99 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| slow streams (whole stream) | {s['streams_total']} | {s['streams_ok']} | "
        f"{s['streams_refused']} | {s['streams_incomplete']} | {_f(s['stream_duration_p50_ms'])} "
        f"| - | {_f(s['stream_duration_max_ms'])} |",
        f"| other requests (mock `m`) | {s['side_total']} | {s['side_ok']} | {s['side_refused']} "
        f"| - | {_f(s['side_p50_ms'])} | {_f(s['side_p99_ms'])} | {_f(s['side_max_ms'])} |",
        "", f"Most streams open at once: {s['max_concurrent_streams']}; p99 of each stream's "
        f"longest gap between chunks: {_f(s['stream_max_gap_p99_ms'])} ms; proxy CPU "
        f"{s['proxy_cpu_pct']:.0f}%, other processes {s['others_cpu_pct']:.0f}%; waitress "
        f"'Task queue depth' warnings: {s['proxy_log']['queue_depth_warnings']}; wall "
        f"{s['wall_s']} s."]
    for k, v in s["examples"].items():
        lines.append(f"- {k}: `{v[:200]}`")
    return lines + report.shared_note([*rep["rows"], s])


def _f(v):
    return "-" if v is None else f"{v:,.1f}"
