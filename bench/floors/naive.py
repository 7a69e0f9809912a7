"""The naive floor: the pass-through a user of Flask, requests and waitress writes in 30 lines.

``python bench/floors/naive.py PORT THREADS UPSTREAM``: each POST goes to UPSTREAM's
/v1/chat/completions with one shared ``requests.Session``; its answer comes back as it was.
"""

import sys

import requests
import waitress
from flask import Flask, Response, request

port, threads, upstream = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
app = Flask(__name__)
session = requests.Session()
# The one thing a user fixes after the first load test: requests keeps 10 connections a host
# and logs "Connection pool is full" at every request beyond them.
session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=threads))


@app.post("/v1/chat/completions")
def chat():
    answer = session.post(upstream + "/v1/chat/completions", data=request.get_data(),
                          headers={"Content-Type": "application/json",
                                   "Authorization": request.headers.get("Authorization", "")})
    return Response(answer.content, answer.status_code,
                    content_type=answer.headers.get("Content-Type"))


@app.get("/ready")
def ready():
    return "ready"


if __name__ == "__main__":
    # The proxy's waitress options that change throughput: its threads, the poll() loop, and
    # reading the next request while one is served (bench/floors/__init__.py).
    waitress.serve(app, host="127.0.0.1", port=port, threads=threads, connection_limit=2000,
                   asyncore_use_poll=True, channel_request_lookahead=1)
