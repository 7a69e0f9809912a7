"""The tuned floor: the naive pass-through with urllib3's pool called directly and orjson.

``python bench/floors/tuned.py PORT THREADS UPSTREAM``: the body is parsed (a proxy must read
the model to route it) and passed on as it came; the answer comes back as it was.
"""

import sys

import orjson
import urllib3
import waitress
from flask import Flask, Response, request

port, threads, upstream = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
app = Flask(__name__)
pool = urllib3.connection_from_url(upstream, maxsize=threads, retries=False,
                                   timeout=urllib3.Timeout(connect=2, read=60))


@app.post("/v1/chat/completions")
def chat():
    body = request.get_data()
    if not isinstance(orjson.loads(body).get("model"), str):
        return Response(b'{"error":{"message":"model is required"}}', 400,
                        content_type="application/json")
    answer = pool.urlopen("POST", "/v1/chat/completions", body=body,
                          headers={"Content-Type": "application/json",
                                   "Authorization": request.headers.get("Authorization", "")})
    return Response(answer.data, answer.status,
                    content_type=answer.headers.get("Content-Type"))


@app.get("/ready")
def ready():
    return "ready"


if __name__ == "__main__":
    waitress.serve(app, host="127.0.0.1", port=port, threads=threads, connection_limit=2000,
                   asyncore_use_poll=True, channel_request_lookahead=1)
