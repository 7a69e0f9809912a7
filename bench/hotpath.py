"""The app's own cost per request, in-process: no sockets, no server, no upstream.

Calls the WSGI app directly with a prepared environ, the mock provider standing in for the
upstream, and reports microseconds per request (best of three runs) for the paths that matter:
a cache hit, a miss answered by the mock, each with observability on and off, and with the
production profile's API key check and rate limit. ``--profile`` adds a cProfile of the cache
hit with everything on, sorted by own time: what to optimise next. Waitress, the network and
the upstream come on top of these figures (``python -m bench run`` measures the whole).
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import pstats
import sys
import time

from bench import report

TOOLS = ()
TITLE = "hot path, in-process"
OUTPUT = "hotpath"
QUICK = {"requests": 300}
LIMITS = {"requests": (10, 1_000_000)}
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


def add_arguments(p) -> None:
    p.add_argument("--requests", type=int, default=3000, help="requests per path (3000)")
    p.add_argument("--profile", action="store_true", help="add a cProfile of the cache hit")


def build(extra):
    from app import create_app
    from settings import build_settings
    return create_app(build_settings(
        {"providers": [{"name": "m", "type": "mock", "models": ["m"]}], **extra}))


def call(app, key=None):
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/v1/chat/completions",
               "SERVER_NAME": "bench", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
               "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(BODY),
               "wsgi.errors": sys.stderr, "CONTENT_LENGTH": str(len(BODY)),
               "CONTENT_TYPE": "application/json"}
    if key:
        environ["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    result = app(environ, lambda status, headers, exc_info=None: None)
    b"".join(result)
    result.close()  # as a server does: the access log line and the metrics run here


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
    return {"settings": {"requests": args.requests}, "rows": rows, "profile": profile_text}


def render(rep) -> list[str]:
    lines = [f"- {rep['settings']['requests']} requests per path, best of 3",
             "", "| path (in-process, one thread) | us per request |", "| --- | ---: |",
             *(f"| {r['path']} | {r['us']:.1f} |" for r in rep["rows"])]
    if rep["profile"]:
        lines += ["", "cProfile of the cache hit, everything on, by own time:", "", "```",
                  rep["profile"].strip(), "```"]
    return lines
