"""The app's own cost per request, in-process: no sockets, no server, no upstream.

Calls the WSGI app directly with a prepared environ, the mock provider standing in for the
upstream, and reports microseconds per request (best of three runs) for the paths that matter:
a cache hit, a miss answered by the mock, each with observability on and off, and with the
production profile's API key check and rate limit. ``--profile`` adds a cProfile of the cache
hit with everything on, sorted by own time: what to optimise next. Waitress, the network and
the upstream come on top of these figures (``python -m bench run`` measures the whole).

Then the streams, the front ends' included: microseconds per relayed event, from a stream of
``--chunks`` text chunks less one of a single chunk, divided by the difference in events. From
the mock provider (no socket): chat relayed, and translated to Anthropic's events and to
Responses events. From ``bench.upstreams.sse`` on the other core (a real loopback upstream, this
process pinned to the proxy's core): the same three from an OpenAI-type provider, and the
pass-through of an Anthropic stream and of a Responses stream. And in the same rounds, whole
answers (no stream) from the upstream: chat, messages and responses, passed through and
translated. ``--profile-stream`` adds a cProfile of one of these paths.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import logging
import os
import pstats
import statistics
import sys
import time

import orjson

from bench import machine, report, services

TOOLS = ("taskset",)
TITLE = "hot path, in-process"
OUTPUT = "hotpath"
QUICK = {"requests": 300, "streams": 20}
LIMITS = {"requests": (10, 1_000_000), "streams": (5, 100_000), "chunks": (2, 5000)}
EVENT_TARGET_US = 200  # issue 17: a translated stream adds no more than 0.2 ms per event
STREAM_ROUNDS = 5
KEY = "sk-hotpath-0123456789abcdef"
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
QUIET = {"metrics_enabled": False, "access_log": False}
CASES = {
    "cache hit, everything on": {},
    "cache hit, metrics and access log off": {"observability": QUIET},
    "cache hit, API key and rate limit (production)": {
        "auth": {"api_keys_required": True, "requests_per_minute": 10**9, "env_keys": f"b:{KEY}"}},
    "miss (mock provider), everything on": {"cache": {"enabled": False}},
    "miss (mock provider), metrics and access log off": {"cache": {"enabled": False},
                                                         "observability": QUIET},
}
# Issue 19: the miss with OpenTelemetry traces on, sent to a discarding OTLP receiver on the
# other core (bench/upstreams/otlp.py): the export thread's work is in these figures too.
TRACED = {"miss (mock provider), everything on, traces sampled 1%": 0.01,
          "miss (mock provider), everything on, traces sampled 100%": 1.0}


PROMPT = "Say hello to the benchmark, and keep it short: this is only a measurement run."
# protocol: (route, body for a model, the marker of one text event in the answer, headers)
PROTOCOLS = {
    "chat": ("/v1/chat/completions", lambda model: {
        "model": model, "messages": [{"role": "user", "content": PROMPT}], "stream": True},
        b"data: {", {}),
    "messages": ("/v1/messages", lambda model: {
        "model": model, "max_tokens": 256, "messages": [{"role": "user", "content": PROMPT}],
        "stream": True}, b"event: content_block_delta", {"anthropic-version": "2023-06-01"}),
    "responses": ("/v1/responses", lambda model: {
        "model": model, "input": PROMPT, "store": False, "stream": True},
        b"event: response.output_text.delta", {}),
}
# label: (protocol, provider: mock, or at the SSE upstream openai / anthropic / responses)
STREAMS = {
    "mock: chat, relayed": ("chat", "mock"),
    "mock: messages, translated from chat": ("messages", "mock"),
    "mock: responses, translated from chat": ("responses", "mock"),
    "upstream: chat, relayed": ("chat", "openai"),
    "upstream: messages, translated from chat": ("messages", "openai"),
    "upstream: responses, translated from chat": ("responses", "openai"),
    "upstream: messages, passed through (anthropic provider)": ("messages", "anthropic"),
    "upstream: responses, passed through (responses: true)": ("responses", "responses"),
}
# label: (protocol, provider at the SSE upstream): whole answers, no stream; "production":
# the client's key checked (Bearer for chat, x-api-key as Claude Code sends it for messages)
WHOLE = {
    "chat, passed through": ("chat", "openai"),
    "messages, passed through (anthropic provider)": ("messages", "anthropic"),
    "messages, translated to chat": ("messages", "openai"),
    "responses, passed through (responses: true)": ("responses", "responses"),
    "responses, translated to chat": ("responses", "openai"),
    "production: chat, passed through": ("chat", "openai"),
    "production: messages, passed through (anthropic provider)": ("messages", "anthropic"),
}
WHOLE_ROUNDS = 20  # whole answers are cheap: more rounds, a steadier median
STREAM_CONFIG = {"cache": {"enabled": False}, "routing": {"model_refresh_interval": 0}}
KEY_CHECKED = {"auth": {"api_keys_required": True, "requests_per_minute": 10**9,
                        "env_keys": f"b:{KEY}"}}


def add_arguments(p) -> None:
    p.add_argument("--requests", type=int, default=3000, help="requests per path (3000)")
    p.add_argument("--profile", action="store_true", help="add a cProfile of the cache hit")
    p.add_argument("--streams", type=int, default=100,
                   help="streams per stream path, length and round (100)")
    p.add_argument("--chunks", type=int, default=200,
                   help="text chunks of the long upstream streams (200; the mock's: as many as "
                        "its answer has characters)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each round of streams, wait up to this long for an idle machine")
    p.add_argument("--profile-stream", choices=[*STREAMS, *WHOLE], metavar="LABEL",
                   help="add a cProfile of the long stream (or the whole answer) of one of: "
                        f"{'; '.join([*STREAMS, *WHOLE])}")


def build(extra, providers=None):
    """An app in this process; the database off unless ``extra`` sets it (its default file
    would land in the working directory)."""
    from app import create_app
    from settings import build_settings
    extra = {"database": {"enabled": False}, **extra}
    return create_app(build_settings(
        {"providers": providers or [{"name": "m", "type": "mock", "models": ["m"]}], **extra}))


def call(app, key=None, path="/v1/chat/completions", body=BODY, headers=None) -> bytes:
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": path,
               "SERVER_NAME": "bench", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
               "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
               "wsgi.errors": sys.stderr, "CONTENT_LENGTH": str(len(body)),
               "CONTENT_TYPE": "application/json"}
    if key:
        environ["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    status = []
    result = app(environ, lambda line, response_headers, exc_info=None: status.append(line))
    answer = b"".join(result)
    result.close()  # as a server does: the access log line and the metrics run here
    if not status or not status[0].startswith("200"):
        raise RuntimeError(f"POST {path} answered {status[:1]}: {answer[:300]!r}")
    return answer


def per_request(app, key, n):
    with contextlib.redirect_stdout(io.StringIO()):  # the access log
        for _ in range(300):
            call(app, key)
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(n):
                call(app, key)
            best = min(best, (time.perf_counter() - started) / n)
    return best * 1e6


def measure(args, procs, tmp) -> dict:
    sys.path.insert(0, args.source)  # the app measured is the one in --source
    rows = []
    for name, extra in CASES.items():
        app = build(extra)
        rows.append({"path": name, "us": round(per_request(app, KEY if "auth" in extra else None,
                                                           args.requests), 1)})
        report.progress(f"hotpath {name}: {rows[-1]['us']} us")
        app.extensions["llm_proxy"].close()
    collector, _ = services.start_upstream(procs, tmp, "otlp", lifetime=3600)
    for name, ratio in TRACED.items():
        app = build({"cache": {"enabled": False}, "observability": {
            "traces_endpoint": collector + "/v1/traces", "traces_sample_ratio": ratio}})
        rows.append({"path": name, "us": round(per_request(app, None, args.requests), 1)})
        report.progress(f"hotpath {name}: {rows[-1]['us']} us")
        app.extensions["llm_proxy"].close()
    profile_text = None
    if args.profile:
        app = build({})
        profile = cProfile.Profile()
        with contextlib.redirect_stdout(io.StringIO()):
            profile.enable()
            for _ in range(args.requests):
                call(app)
            profile.disable()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
        profile_text = out.getvalue()
    streams, whole, stream_profile = measure_streams(args, procs, tmp)
    targets = stream_targets(streams) + whole_targets(whole)
    return {"settings": {"requests": args.requests, "streams": args.streams,
                         "chunks": args.chunks},
            "rows": rows, "profile": profile_text, "streams": streams, "whole": whole,
            "stream_profile": stream_profile, "targets": targets,
            "pass": report.passed(targets)}


def _providers(kind, upstream, many):
    """The provider of a stream path: the mock (``one``: 1 chunk, ``many``: one a character),
    or one at the SSE upstream (models ``sse-<chunks>-0``)."""
    if kind == "mock":
        return [{"name": "mock-one", "type": "mock", "models": ["one"], "chunks": 1},
                {"name": "mock-many", "type": "mock", "models": ["many"], "chunks": many}]
    provider = {"name": "sse", "type": "openai", "base_url": upstream + "/v1",
                "models": ["sse-*"], "responses": kind == "responses"}
    if kind == "anthropic":
        provider = {"name": "sse", "type": "anthropic", "base_url": upstream,
                    "models": ["sse-*"]}
    return [provider]


def measure_streams(args, procs, tmp):
    """Per stream path: us per stream of one chunk and of many, and per event between them;
    per front-end path (``WHOLE``): us per whole answer. Every path's app is built first, then
    ``STREAM_ROUNDS`` rounds run each stream path in turn (so a slower spell of this shared
    machine hits them all alike), then ``WHOLE_ROUNDS`` rounds the whole answers: the best round
    gives the figures, the rounds' own the spread."""
    upstream, _ = services.start_upstream(procs, tmp, "sse", lifetime=3600)
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(services.PROXY_CORE)})  # the upstream has the other core
    logging.getLogger("llm_proxy.pricing").setLevel(logging.ERROR)  # "sse-200-0 has no price"
    cases, profile_text = [], None
    paths = [(label, protocol, kind, True) for label, (protocol, kind) in STREAMS.items()]
    paths += [(label, protocol, kind, False) for label, (protocol, kind) in WHOLE.items()]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the access log
            for label, protocol, kind, stream in paths:
                path, body, marker, headers = PROTOCOLS[protocol]
                models = ("one", "many") if kind == "mock" else ("sse-1-0",
                                                                 f"sse-{args.chunks}-0")
                bodies = [orjson.dumps({**body(m), "stream": stream}) for m in models]
                production = label.startswith("production:")
                if production:
                    headers = {**headers, **({"x-api-key": KEY} if protocol == "messages" else
                                             {"Authorization": f"Bearer {KEY}"})}
                app = build({**STREAM_CONFIG, **(KEY_CHECKED if production else {})},
                            _providers(kind, upstream, 100_000))
                runs = [(lambda b=b, app=app, path=path, h=headers:
                         call(app, path=path, body=b, headers=h))
                        for b in (bodies if stream else bodies[:1])]
                events = [run().count(marker) for run in runs]
                for _ in range(20):  # warm-up
                    for run in runs:
                        run()
                cases.append((label, protocol, kind, app, runs, events, [[] for _ in runs],
                              [[] for _ in runs]))
            for answers, rounds in ((False, STREAM_ROUNDS), (True, WHOLE_ROUNDS)):
                for round_ in range(rounds):
                    _round(args, [c for c in cases if (len(c[4]) == 1) == answers],
                           f"{'whole answers' if answers else 'streams'}: round {round_ + 1} of "
                           f"{rounds}")
            for label, *_, runs, _, _, _ in cases:
                if label == args.profile_stream:
                    profile_text = _profile(runs[-1], args.streams)
    finally:
        os.sched_setaffinity(0, affinity)
        for case in cases:
            case[3].extensions["llm_proxy"].close()
    streams, whole = [], []
    for label, protocol, kind, _, _, events, times, cpu in cases:
        if len(times) == 1:  # this thread's CPU time too: waits for the upstream left out
            whole.append({"path": label, "protocol": protocol, "provider": kind,
                          "us": round(min(times[0]), 1),
                          "us_rounds": [round(min(times[0]), 1), round(max(times[0]), 1)],
                          "cpu_us": round(statistics.median(cpu[0]), 1),
                          "cpu_us_rounds": [round(min(cpu[0]), 1), round(max(cpu[0]), 1)]})
            continue
        (one, many), more = times, max(1, events[1] - events[0])
        rounds = sorted((b - a) / more for a, b in zip(one, many))
        streams.append({"stream": label, "protocol": protocol, "provider": kind,
                        "events": events, "us": [round(min(one), 1), round(min(many), 1)],
                        "us_per_event": round((min(many) - min(one)) / more, 2),
                        "us_per_event_rounds": [round(rounds[0], 2), round(rounds[-1], 2)]})
        report.progress(f"hotpath stream {label}: {streams[-1]['us']} us ({events} events): "
                        f"{streams[-1]['us_per_event']} us per event")
    return streams, whole, profile_text


def _round(args, cases, what) -> None:
    """One round: each case's runs ``--streams`` times, its us (and CPU us) per run noted."""
    machine.wait_quiet(args.wait_quiet)
    report.progress(f"hotpath {what}")
    for *_, runs, _, times, cpu in cases:
        for run, seen, used in zip(runs, times, cpu):
            started, cpu_started = time.perf_counter(), time.thread_time()
            for _ in range(args.streams):
                run()
            seen.append((time.perf_counter() - started) / args.streams * 1e6)
            used.append((time.thread_time() - cpu_started) / args.streams * 1e6)


def _profile(run, n) -> str:
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(n):
        run()
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
    return out.getvalue()


def whole_targets(whole) -> list[dict]:
    """The in-process side of ``run``'s target: a messages pass-through costs no more than a
    chat pass-through (information: ``run`` measures the target through the server)."""
    out = []
    for prefix in ("", "production: "):
        chat = next((r for r in whole if r["path"] == prefix + "chat, passed through"), None)
        native = next((r for r in whole if r["path"].startswith(prefix + "messages, passed")),
                      None)
        if chat is None or native is None:
            continue
        added = native["cpu_us"] - chat["cpu_us"]
        out.append(report.target(
            f"{prefix}messages pass-through vs chat pass-through, whole answers, CPU us per "
            "request (medians)",
            f"{added:+.1f} us ({native['cpu_us']:.1f} - {chat['cpu_us']:.1f})", "<= 0 us",
            added <= 0, info=True))
    return out


def stream_targets(streams) -> list[dict]:
    """A translated stream adds no more than 0.2 ms per event to the chat stream relayed from
    the same provider; an Anthropic pass-through (information) against the chat relay."""
    def find(protocol, kind):
        return next((r for r in streams if (r["protocol"], r["provider"]) == (protocol, kind)),
                    None)
    out = []
    for source, kind in (("mock", "mock"), ("upstream", "openai")):
        relayed = find("chat", kind)
        for protocol in ("messages", "responses"):
            translated = find(protocol, kind)
            if relayed and translated:
                added = translated["us_per_event"] - relayed["us_per_event"]
                out.append(report.target(
                    f"{source}: {protocol} stream translated, added per event",
                    f"{added:.1f} us ({translated['us_per_event']:.1f} - "
                    f"{relayed['us_per_event']:.1f})", f"<= {EVENT_TARGET_US} us",
                    added <= EVENT_TARGET_US))
    relayed, native = find("chat", "openai"), find("messages", "anthropic")
    if relayed and native:
        added = native["us_per_event"] - relayed["us_per_event"]
        out.append(report.target(
            "upstream: messages stream passed through, per event vs chat relayed",
            f"{added:+.1f} us ({native['us_per_event']:.1f} - {relayed['us_per_event']:.1f})",
            "<= 0 us", added <= 0, info=True))
    return out


def render(rep) -> list[str]:
    lines = [f"- {rep['settings']['requests']} requests per path, best of 3",
             "", "| path (in-process, one thread) | us per request |", "| --- | ---: |",
             *(f"| {r['path']} | {r['us']:.1f} |" for r in rep["rows"])]
    if rep["profile"]:
        lines += ["", "cProfile of the cache hit, everything on, by own time:", "", "```",
                  rep["profile"].strip(), "```"]
    st = rep["settings"]
    lines += ["", f"Streams: {st['streams']} per path, length and round, {STREAM_ROUNDS} rounds"
              " with the paths in turn, the best round of each; the upstream streams "
              f"{st['chunks']} chunks (or 1), the mock one a character of its answer (or 1); "
              "events: the text events in the answer; per event: the difference in us per "
              "stream / the difference in events (in brackets: the rounds' lowest - highest).",
              "", "| stream (in-process, one thread) | events | us per stream | us per event |",
              "| --- | ---: | ---: | ---: |",
              *(f"| {r['stream']} | {r['events'][0]} / {r['events'][1]} | {r['us'][0]:,.1f} / "
                f"{r['us'][1]:,.1f} | {r['us_per_event']:.1f} ({r['us_per_event_rounds'][0]:.1f}"
                f" - {r['us_per_event_rounds'][1]:.1f}) |" for r in rep["streams"])]
    lines += ["", f"Whole answers from the upstream (no stream), {WHOLE_ROUNDS} rounds of "
              f"{st['streams']} per path, the paths in turn: us per request, the best round, and "
              "this thread's CPU us per request (without the waits for the upstream), the median"
              " round (the rounds' lowest - highest); production: the client's key checked.", "",
              "| front end (in-process, one thread) | us per request | CPU us per request, "
              "median |", "| --- | ---: | ---: |",
              *(f"| {r['path']} | {r['us']:,.1f} ({r['us_rounds'][0]:,.1f} - "
                f"{r['us_rounds'][1]:,.1f}) | {r['cpu_us']:,.1f} ({r['cpu_us_rounds'][0]:,.1f} - "
                f"{r['cpu_us_rounds'][1]:,.1f}) |" for r in rep["whole"])]
    if rep["stream_profile"]:
        lines += ["", "cProfile of the long stream chosen, by own time:", "", "```",
                  rep["stream_profile"].strip(), "```"]
    return lines
