"""The ping floor: what a cache hit can at best cost on this stack.

``python bench/floors/ping.py PORT THREADS``: each POST's body is parsed and hashed as the
proxy's cache key is (sha256 of the JSON with sorted keys), and a fixed completion answers it.
"""

import hashlib
import sys

import orjson
import waitress
from flask import Flask, Response, request

port, threads = int(sys.argv[1]), int(sys.argv[2])
app = Flask(__name__)
ANSWER = orjson.dumps({
    "id": "chatcmpl-ping", "object": "chat.completion", "created": 1700000000,
    "model": "bench-model", "choices": [{
        "index": 0, "message": {"role": "assistant", "content": "Hello from the ping floor."},
        "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 6, "total_tokens": 7}})


@app.post("/v1/chat/completions")
def chat():
    body = orjson.loads(request.get_data())
    key = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return Response(ANSWER, 200, content_type="application/json", headers={"X-Cache-Key": key})


@app.get("/ready")
def ready():
    return "ready"


if __name__ == "__main__":
    waitress.serve(app, host="127.0.0.1", port=port, threads=threads, connection_limit=2000,
                   asyncore_use_poll=True, channel_request_lookahead=1)
