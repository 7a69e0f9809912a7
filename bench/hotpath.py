"""The app's own cost per request, in-process: no sockets, no server, no upstream.

    .venv/bin/python -m bench.hotpath [--requests 3000] [--profile]

Calls the WSGI app directly with a prepared environ, the mock provider standing in for the
upstream, and prints microseconds per request (best of three runs) for the paths that matter:
a cache hit, a miss answered by the mock, each with observability on and off, and with the
production profile's API key check and rate limit. ``--profile`` adds a cProfile of the cache
hit with everything on, sorted by own time: what to optimise next. Waitress, the network and
the upstream come on top of these figures (``bench.run`` measures the whole).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import sys
import time

from app import create_app
from settings import build_settings

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


def build(extra):
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    print("| path (in-process, one thread) | us per request |\n| --- | ---: |")
    for name, extra in CASES.items():
        app = build(extra)
        key = KEY if "auth" in extra else None
        print(f"| {name} | {per_request(app, key, args.requests):.1f} |")
        app.extensions["llm_proxy"].close()
    if args.profile:
        app = build({})
        profile = cProfile.Profile()
        with contextlib.redirect_stdout(io.StringIO()):
            profile.enable()
            for _ in range(args.requests):
                call(app)
            profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
