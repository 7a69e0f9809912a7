"""Issue 20's floors: what a user of this stack would write instead of the proxy, each a small
program of its own, started as ``python bench/floors/<name>.py PORT THREADS [UPSTREAM]``.

- ``naive``: a Flask view passing the body on with ``requests`` (the pass-through floor);
- ``tuned``: the same with urllib3's pool called directly and orjson;
- ``ping``: parses and hashes the body, answers a fixed completion (what a cache hit can cost).

Each serves ``POST /v1/chat/completions`` and ``GET /ready`` with waitress: ``THREADS`` threads
(the bench passes the production profile's) and the proxy's waitress options that change
throughput (the ``poll()`` loop, reading the next request while one is served). They are
written as a user would write them, the app built at the module's top: run, never imported.
"""
