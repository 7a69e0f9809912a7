"""The upstreams a benchmark starts besides nginx, each a program of its own, started as
``python -m bench.upstreams.<name> PORT LIFETIME``: it listens on 127.0.0.1:PORT, prints
``READY`` and exits by itself after LIFETIME seconds (the benchmark also stops it).

- ``sse``: a streaming OpenAI-compatible upstream (asyncio, keep-alive, chunked SSE);
- ``hang``: accepts every connection, reads, never answers (a provider that hangs);
- ``hostile``: answers by the model asked: a gzip bomb, a giant body, endless streams;
- ``otlp``: an OTLP/HTTP trace receiver that counts and discards what traced proxies send.
"""

import json
import socket

# The fixed OpenAI chat.completion body every healthy upstream answers (nginx included).
CHAT_COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
    "model": "bench-model", "choices": [{
        "index": 0, "message": {"role": "assistant", "content": "Hello from the bench upstream."},
        "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 6, "total_tokens": 7}},
    separators=(",", ":"))
# The same answer as an Anthropic Message (nginx's /v1/messages) and as an OpenAI Response
# (nginx's /v1/responses): what the front ends' pass-through benchmarks relay.
ANTHROPIC_MESSAGE = json.dumps({
    "id": "msg_bench", "type": "message", "role": "assistant", "model": "bench-model",
    "content": [{"type": "text", "text": "Hello from the bench upstream."}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 1, "output_tokens": 6}}, separators=(",", ":"))
RESPONSE = json.dumps({
    "id": "resp_bench", "object": "response", "created_at": 1700000000, "status": "completed",
    "error": None, "incomplete_details": None, "model": "bench-model", "output": [{
        "id": "msg_bench", "type": "message", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": "Hello from the bench upstream.",
                     "annotations": []}]}],
    "store": False, "usage": {"input_tokens": 1, "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens": 6,
                              "output_tokens_details": {"reasoning_tokens": 0},
                              "total_tokens": 7}}, separators=(",", ":"))


def listener(port: int, backlog: int = 1024) -> socket.socket:
    """A listening socket on 127.0.0.1:``port``."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(backlog)
    return srv


def ready() -> None:
    print("READY", flush=True)
