"""Streaming: what the proxy adds to an SSE stream, 100 slow streams at once, 512 paced ones.

``bench.upstreams.sse`` (core 1) streams for the model ``sse-<chunks>-<delay ms>``; the proxy
(core 0, THREADS=256, cache off) relays it. This process is the client, on core 1: time to first
byte and the span to ``[DONE]``, direct and through the proxy, then ``--streams`` slow streams
held at once while ordinary requests keep coming. ``--paced``: instead, issue 20's target 6, a
ramp of paced streams opened at once (64/128/256/512, 50 chunks 20 ms apart) through a
production-profile proxy and against the upstream directly (bench/README.md).
"""

from __future__ import annotations

import asyncio
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
LIMITS = {"paced_chunks": (1, 1000), "paced_ms": (1, 1000), "paced_rounds": (1, 20),
          "reps": (10, 5000), "chunks": (1, 5000), "streams": (1, 500), "rounds": (1, 20),
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
    p.add_argument("--paced", action="store_true",
                   help="only the paced ramp (issue 20's target 6): a production proxy, streams "
                        "opened at once, each --paced-chunks events --paced-ms apart")
    p.add_argument("--paced-ramp", type=_counts, default=[64, 128, 256, 512],
                   help="the stream counts of the ramp (64,128,256,512)")
    p.add_argument("--paced-chunks", type=int, default=50, help="chunks per paced stream (50)")
    p.add_argument("--paced-ms", type=int, default=20, help="ms between them (20)")
    p.add_argument("--paced-spread-ms", type=float, default=0.0,
                   help="send the ramp's requests evenly over this many ms (0: all at once)")
    p.add_argument("--paced-rounds", type=int, default=1, help="rounds of the ramp (1)")
    p.add_argument("--paced-threads", type=int, default=0,
                   help="the proxy's THREADS for the ramp (0: the production profile's)")
    p.add_argument("--paced-variant", type=_variant, action="append", default=None,
                   metavar="NAME[:VAR=VALUE,...]",
                   help="a proxy variant (its environment added; SOURCE=DIR: another checkout),"
                        " measured in turn with the others in each round; repeatable (default: "
                        "one, `current`)")


def proxy_config(args) -> dict:
    routing = {"provider_max_in_flight": args.provider_max_in_flight} \
        if args.provider_max_in_flight else {}
    return {"cache": {"enabled": False}, **({"routing": routing} if routing else {})}


def measure(args, procs, tmp) -> dict:
    if args.paced:
        os.sched_setaffinity(0, {int(services.LOAD_CORE)})
        args.paced_variant = args.paced_variant or [("current", {})]
        paced = paced_ramp(args, procs, tmp)
        targets_ = paced_targets(paced)
        return {"paced": paced, "targets": targets_, "pass": report.passed(targets_)}
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
    if "paced" in rep:
        return render_paced(rep["paced"]) + report.shared_note(rep["paced"]["rows"])
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


# --- Paced streams (issue 20, target 6): N streams opened at once, each CHUNKS events PACE ms
# apart, through one production-profile proxy, against the upstream directly in the same run.

PACED_GAP_SLACK_MS, PACED_FIRST_SLACK_MS = 25.0, 50.0
PACED_KEY = "sk-bench-0123456789abcdef0123"
# The production profile as bench/run.py runs it (its own thread count unless --paced-threads;
# the database on, SQLite: every stream writes its request log row).
PACED_ENV = {"ENVIRONMENT": "production", "HOST": "127.0.0.1", "LOG_LEVEL": "WARNING",
             "PROXY_API_KEYS": f"bench:{PACED_KEY}", "RATE_LIMIT_REQUESTS": "100000000",
             # One key carries the whole load here: its in-flight share (half the proxy's
             # slots) would refuse it with 429 past 112 streams, which is tenancy, not capacity.
             "TENANT_IN_FLIGHT_SHARE": "0"}
PACED_AUTH = {"Authorization": f"Bearer {PACED_KEY}"}


class _PacedStream(asyncio.Protocol):
    """One paced stream read as it arrives: when its request left, when its first event came,
    the gaps between reads that completed events, and whether ``[DONE]`` and the last chunk
    arrived. Events are counted by their blank-line ends, so no parsing is done: this client
    shares its core with the upstream, and 512 streams at 20 ms are 25,600 events a second."""

    def __init__(self, done: asyncio.Future):
        self.done, self.transport = done, None
        self.sent = self.first = self.last = None
        self.status, self.events, self.gaps, self.complete = 0, 0, [], False
        self._head, self._tail = b"", b""

    def connection_made(self, transport):
        self.transport = transport

    def send(self, request: bytes) -> None:
        self.sent = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data):
        now = time.perf_counter()
        if not self.status:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(self._head[9:12])
            data, self._head = self._head[end + 4:], b""
        seen = self._tail + data
        ends = data.count(b"\n\n") + (self._tail.endswith(b"\n") and data.startswith(b"\n"))
        if ends:
            if self.first is None:
                self.first = now
            else:
                self.gaps.append(now - self.last)
            self.last = now
            self.events += ends
        if b"data: [DONE]" in seen:
            self.complete = True
        self._tail = seen[-16:]
        if seen.endswith(b"0\r\n\r\n") and self.complete:
            self.transport.close()

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_result(self)


def paced_burst(base: str, count: int, chunks: int, pace_ms: int, headers: dict,
                timeout: float, spread_ms: float = 0.0) -> dict:
    """``count`` streams of ``chunks`` events ``pace_ms`` apart, their requests sent at once on
    connections opened before (or evenly over ``spread_ms``), each read to its end; what the
    target asks of them: complete (every event and ``[DONE]``), the p99 of all the gaps between
    events, and the p99 of the time to the first event."""
    parts = urlsplit(base)
    body = services.chat_body(f"sse-{chunks}-{pace_ms}", stream=True)
    head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, **JSON_HEADERS}.items())
    request = (f"POST {services.PATH} HTTP/1.1\r\nHost: {parts.hostname}\r\n{head}"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body

    async def run():
        loop = asyncio.get_running_loop()
        streams, failed = [], 0
        for _ in range(count):
            done = loop.create_future()
            try:
                _, protocol = await loop.create_connection(lambda d=done: _PacedStream(d),
                                                           parts.hostname, parts.port)
            except OSError:
                failed += 1
                continue
            streams.append(protocol)
        await asyncio.sleep(0.2)  # the accepts settle before the burst
        start = loop.time()
        for i, protocol in enumerate(streams):
            if spread_ms:
                await asyncio.sleep(max(0.0, start + i * spread_ms / 1000 / count - loop.time()))
            protocol.send(request)
        waits = [p.done for p in streams]
        if waits:
            await asyncio.wait(waits, timeout=timeout)
        for protocol in streams:
            if not protocol.done.done():
                protocol.transport.abort()
        return streams, failed

    streams, failed = asyncio.run(run())
    ok = [s for s in streams if s.status == 200]
    complete = [s for s in ok if s.complete and s.events == chunks + 1]
    gaps = [g for s in ok for g in s.gaps]
    firsts = [s.first - s.sent for s in ok if s.first is not None]
    statuses: dict = {}
    for s in streams:
        if s.status != 200:
            statuses[str(s.status or "none")] = statuses.get(str(s.status or "none"), 0) + 1
    return {"streams": count, "connect_failed": failed, "ok": len(ok),
            "complete": len(complete), "refused": statuses,
            "gap_p50_ms": percentile_ms(gaps, 50), "gap_p99_ms": percentile_ms(gaps, 99),
            "gap_max_ms": percentile_ms(gaps, 100),
            "first_p50_ms": percentile_ms(firsts, 50), "first_p99_ms": percentile_ms(firsts, 99)}


def paced_ramp(args, procs, tmp) -> dict:
    """The ramp (``--paced-ramp``) for each variant (``--paced-variant``; a fresh production
    proxy per variant and round, the variants in turn, every other round reversed), each count
    against the upstream directly right before it."""
    upstream, _ = services.start_upstream(procs, tmp, "sse", lifetime=3600)
    timeout = args.paced_chunks * args.paced_ms / 1000 + 30
    rows = []
    for rnd in range(args.paced_rounds):
        variants = args.paced_variant if rnd % 2 == 0 else args.paced_variant[::-1]
        for name, env in variants:
            providers = [{"name": "sse", "type": "openai", "base_url": upstream + "/v1",
                          "models": ["sse-*"]}]
            env = dict(env)
            source = env.pop("SOURCE", args.source)  # a variant may run another checkout
            proxy_env = {**PACED_ENV, **({"THREADS": str(args.paced_threads)}
                                         if args.paced_threads else {}), **env}
            proxy = services.start_proxy_env(procs, tmp, f"paced-{name}-{rnd}",
                                             {**proxy_config(args), "providers": providers},
                                             env=proxy_env, source=source)
            pid = proxy.process.pid
            for count in args.paced_ramp:
                for path, base, headers in (("direct", upstream, {}),
                                            ("proxy", proxy.url, PACED_AUTH)):
                    machine.wait_quiet(args.wait_quiet)
                    used = _cpu_seconds(pid)
                    with machine.cpu_meter(pid, procs) as cpu:
                        row = paced_burst(base, count, args.paced_chunks, args.paced_ms,
                                          headers, timeout, args.paced_spread_ms)
                    # The proxy's CPU per stream, all of it: opening, relaying, closing.
                    row["cpu_ms_per_stream"] = round((_cpu_seconds(pid) - used) * 1000
                                                     / count, 3) if path == "proxy" else None
                    row.update(cpu, path=path, variant=name, round=rnd,
                               **(services.proc_counts(pid) if path == "proxy" else {}))
                    rows.append(row)
                    report.progress(
                        f"paced {name} r{rnd} {path} x{count}: {row['complete']}/{count} "
                        f"complete, refused {row['refused'] or 0}, gap p99 "
                        f"{_f(row['gap_p99_ms'])} ms, first p99 {_f(row['first_p99_ms'])} ms, "
                        f"proxy CPU {row['proxy_cpu_pct']:.0f}%, others "
                        f"{row['others_cpu_pct']:.0f}%")
                    time.sleep(0.5)
            procs.stop(proxy.process)
    return {"settings": {"ramp": args.paced_ramp, "chunks": args.paced_chunks,
                         "pace_ms": args.paced_ms, "rounds": args.paced_rounds,
                         "spread_ms": args.paced_spread_ms,
                         "variants": [[n, e] for n, e in args.paced_variant],
                         "proxy_env": {k: v for k, v in PACED_ENV.items()
                                       if k != "PROXY_API_KEYS"}},
            "rows": rows}


def paced_targets(paced) -> list[dict]:
    """Target 6 at the ramp's largest count, per variant: the medians over its rounds."""
    st = paced["settings"]
    count, pace = max(st["ramp"]), st["pace_ms"]
    out = []
    for name, _ in st["variants"]:
        held = [n for n in sorted(st["ramp"]) if _paced_holds(paced["rows"], name, n, pace)]
        out.append(report.target(f"{name}: where the ramp stops", "every target held up to "
                                 f"{max(held)} streams" if held else "no count held",
                                 f"{count}", None))
        got = _paced_medians(paced["rows"], name, count)
        if got is None:
            continue
        proxy, direct = got
        added = proxy["first_p99_ms"] - direct["first_p99_ms"] \
            if proxy["first_p99_ms"] is not None else None
        out += [
            report.target(f"{name}: {count} paced streams complete", f"{proxy['complete']:.0f}"
                          f" / {count} (refused {proxy['refused']:.0f})", f"{count}",
                          proxy["complete"] >= count),
            report.target(f"{name}: inter-chunk gap p99", f"{_f(proxy['gap_p99_ms'])} ms "
                          f"(direct {_f(direct['gap_p99_ms'])})",
                          f"<= {pace + PACED_GAP_SLACK_MS:g} ms", proxy["gap_p99_ms"] is not None
                          and proxy["gap_p99_ms"] <= pace + PACED_GAP_SLACK_MS),
            report.target(f"{name}: time to first chunk p99 over direct", f"{_f(added)} ms "
                          f"({_f(proxy['first_p99_ms'])} - {_f(direct['first_p99_ms'])})",
                          f"<= {PACED_FIRST_SLACK_MS:g} ms",
                          added is not None and added <= PACED_FIRST_SLACK_MS)]
    return out


def _paced_holds(rows, variant, count, pace) -> bool:
    """Whether ``count`` streams met all three targets (medians over the rounds)."""
    got = _paced_medians(rows, variant, count)
    if got is None:
        return False
    proxy, direct = got
    return (proxy["complete"] >= count and proxy["gap_p99_ms"] is not None
            and proxy["gap_p99_ms"] <= pace + PACED_GAP_SLACK_MS
            and proxy["first_p99_ms"] is not None and direct["first_p99_ms"] is not None
            and proxy["first_p99_ms"] - direct["first_p99_ms"] <= PACED_FIRST_SLACK_MS)


def _paced_medians(rows, variant, count):
    """(proxy, direct): the median of each figure over a variant's rounds at ``count``."""
    import statistics
    picked = {path: [r for r in rows if r["variant"] == variant and r["streams"] == count
                     and r["path"] == path] for path in ("proxy", "direct")}
    if not picked["proxy"] or not picked["direct"]:
        return None

    def median(group):
        out = {}
        for key in ("complete", "gap_p50_ms", "gap_p99_ms", "gap_max_ms", "first_p50_ms",
                    "first_p99_ms", "proxy_cpu_pct", "others_cpu_pct", "steal_pct"):
            values = [r.get(key) for r in group if r.get(key) is not None]
            out[key] = statistics.median(values) if values else None
        out["refused"] = statistics.median(sum(r["refused"].values()) + r["connect_failed"]
                                           for r in group)
        return out
    return median(picked["proxy"]), median(picked["direct"])


def render_paced(paced) -> list[str]:
    st = paced["settings"]
    lines = [
        f"- proxy: `python wsgi.py` on core {services.PROXY_CORE}, the production profile "
        f"({', '.join(f'{k}={v}' for k, v in st['proxy_env'].items())}, one API key), cache off;"
        " a fresh proxy per variant and round, the variants in turn",
        f"- upstream: `bench.upstreams.sse` on core {services.LOAD_CORE}, model "
        f"`sse-{st['chunks']}-{st['pace_ms']}`: {st['chunks']} chunks {st['pace_ms']} ms apart "
        "and `[DONE]`; client: this process on that core (asyncio, one connection a stream, all "
        "opened first, then every request sent "
        + (f"evenly over {st['spread_ms']:g} ms)" if st.get("spread_ms") else "at once)"),
        "- variants: " + "; ".join(f"`{n}` {e or '(as configured)'}" for n, e in st["variants"]),
        "", "| variant | round | path | streams | complete | refused | gap p50 ms | gap p99 ms "
        "| gap max ms | first p50 ms | first p99 ms | proxy CPU | CPU ms a stream | others | steal "
        "| threads |",
        "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: |"]
    for r in paced["rows"]:
        refused = ", ".join(f"{k}: {v}" for k, v in r["refused"].items()) or "0"
        lines.append(
            f"| {r['variant']} | {r['round']} | {r['path']} | {r['streams']} | {r['complete']} | "
            f"{refused} | {_f(r['gap_p50_ms'])} | {_f(r['gap_p99_ms'])} | {_f(r['gap_max_ms'])} "
            f"| {_f(r['first_p50_ms'])} | {_f(r['first_p99_ms'])} | {r['proxy_cpu_pct']:.0f}% | "
            f"{_f(r.get('cpu_ms_per_stream'))} | {r['others_cpu_pct']:.0f}% | "
            f"{r.get('steal_pct', 0):.0f}% | "
            f"{r.get('threads', '-')} |")
    return lines


def _cpu_seconds(pid: int) -> float:
    """The CPU time (user + system) a process has used, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _variant(value: str):
    """``NAME`` or ``NAME:VAR=VALUE,VAR=VALUE``: a proxy variant of the paced ramp."""
    name, _, rest = value.partition(":")
    env = dict(pair.split("=", 1) for pair in rest.split(",") if "=" in pair)
    if not name:
        raise ValueError(value)
    return name, env


def _counts(value: str) -> list[int]:
    counts = [int(v) for v in value.split(",") if v.strip()]
    if not counts or min(counts) < 1 or max(counts) > 2000:
        raise ValueError(value)
    return counts
