"""A fake provider for tests: a real threaded HTTP server on loopback, port 0.

It speaks the OpenAI protocol (JSON and SSE) by default and can be scripted, request by
request, to fail the ways a network fails: a status, a reset before any byte or mid-body, a
hang, malformed JSON, a stream cut after some chunks, a slow stream. Every request it receives
is recorded, so tests assert how many calls reached it.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    """Answer with this status and JSON body (or raw bytes)."""
    status: int = 200
    body: object = None
    headers: dict = field(default_factory=dict)
    raw: bytes | None = None
    delay: float = 0.0  # seconds before the answer


@dataclass
class Stream:
    """Answer with these SSE data payloads (dicts or b"[DONE]"), chunked, one write each."""
    events: list
    delay: float = 0.0  # seconds between events
    cut_after: int | None = None  # reset the connection after this many events
    headers: dict = field(default_factory=dict)
    gate: threading.Event | None = None  # after the first event, wait for this before the rest


@dataclass
class Body:
    """Answer with the byte pieces of ``pieces`` (any iterable, endless too) as they come,
    ``delay`` seconds apart: chunked, or with a Content-Length of ``length``. It stops when the
    proxy goes away (``FakeUpstream.aborted``) or the server stops; ``FakeUpstream.sent``
    counts the body bytes written. For giant, dripping, endless and malformed answers."""
    pieces: object
    status: int = 200
    headers: dict = field(default_factory=lambda: {"Content-Type": "application/json"})
    delay: float = 0.0
    length: int | None = None


@dataclass
class Reset:
    """Close the connection with a TCP reset; after ``partial`` bytes of a body if given."""
    partial: bytes = b""


@dataclass
class Hang:
    """Read the request, then send nothing for ``seconds`` (or until the server stops)."""
    seconds: float = 5.0


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict
    body: bytes
    client_port: int = 0  # the same port for two requests: one kept-alive connection

    def json(self):
        return json.loads(self.body)


class FakeUpstream:
    """Context manager running the fake provider; ``url`` is its base URL."""

    def __init__(self, default=None):
        self.requests: list[Recorded] = []
        self.aborted = threading.Event()  # set when a client (the proxy) left mid-stream
        self.sent = 0  # body bytes written by Body behaviours
        self.default = default or openai_answer
        self._script: list = []
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.fake = self
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                        daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def script(self, *behaviours):
        """The next requests get these behaviours, in order; later ones get the default."""
        with self._lock:
            self._script.extend(behaviours)

    @property
    def calls(self) -> int:
        return len(self.requests)

    def _next(self, recorded):
        with self._lock:
            self.requests.append(recorded)
            if self._script:
                return self._script.pop(0)
        return self.default(recorded)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # clients (the proxy) closing or resetting connections is what tests do


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._serve()

    def do_POST(self):
        self._serve()

    def _serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        fake = self.server.fake
        recorded = Recorded(self.command, self.path, dict(self.headers.items()), body,
                            self.client_address[1])
        behaviour = fake._next(recorded)
        if callable(behaviour):
            behaviour = behaviour(recorded)
        if isinstance(behaviour, Reply):
            self._reply(behaviour)
        elif isinstance(behaviour, Stream):
            self._stream(behaviour)
        elif isinstance(behaviour, Body):
            self._body(behaviour)
        elif isinstance(behaviour, Reset):
            if behaviour.partial:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(behaviour.partial) + 100))
                self.end_headers()
                self.wfile.write(behaviour.partial)
                self.wfile.flush()
            self._reset()
        elif isinstance(behaviour, Hang):
            fake.stopping.wait(behaviour.seconds)
            self.close_connection = True

    def _reply(self, reply: Reply):
        if reply.delay and self.server.fake.stopping.wait(reply.delay):
            return
        data = reply.raw if reply.raw is not None else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in reply.headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, stream: Stream):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        for k, v in stream.headers.items():
            self.send_header(k, v)
        self.end_headers()
        for i, event in enumerate(stream.events):
            if stream.cut_after is not None and i >= stream.cut_after:
                self._reset()
                return
            if i == 1 and stream.gate is not None:
                stream.gate.wait(5)
            if i and stream.delay:
                if self.server.fake.stopping.wait(stream.delay):
                    return
            if isinstance(event, bytes) and not event.startswith(b"event:"):
                data = b"data: " + event + b"\n\n"
            elif isinstance(event, bytes):
                data = event + b"\n\n"  # a whole event with its own field lines
            else:
                data = b"data: " + json.dumps(event).encode() + b"\n\n"
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            except OSError:
                self.server.fake.aborted.set()  # the proxy went away
                return
        self.wfile.write(b"0\r\n\r\n")

    def _body(self, body: Body):
        fake = self.server.fake
        self.send_response(body.status)
        for k, v in body.headers.items():
            self.send_header(k, v)
        chunked = body.length is None
        self.send_header(*(("Transfer-Encoding", "chunked") if chunked
                           else ("Content-Length", str(body.length))))
        self.end_headers()
        try:
            for i, piece in enumerate(body.pieces):
                if i and body.delay and fake.stopping.wait(body.delay):
                    return
                if fake.stopping.is_set():
                    return
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                self.wfile.flush()
                fake.sent += len(piece)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            fake.aborted.set()  # the proxy went away
            self.close_connection = True

    def _reset(self):
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True


def openai_answer(recorded: Recorded):
    """The default behaviour: a correct OpenAI answer to whatever was asked."""
    body = recorded.json() if recorded.body else {}
    model = body.get("model", "unknown")
    path = recorded.path.split("?")[0]
    if path.endswith("/embeddings"):
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        return Reply(body={"object": "list", "model": model, "data": [
            {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
            for i in range(len(inputs))], "usage": {"prompt_tokens": 3, "total_tokens": 3}})
    if path.endswith("/chat/completions"):
        if body.get("stream"):
            return Stream(chat_chunks(model, ["Hello", " from", " upstream"]))
        return Reply(body=chat_completion(model, "Hello from upstream"))
    if path.endswith("/completions"):
        if body.get("stream"):
            return Stream([{"id": "cmpl-1", "object": "text_completion", "created": 1,
                            "model": model, "choices": [{"index": 0, "text": t, "logprobs": None,
                                                         "finish_reason": f}]}
                           for t, f in (("Hello", None), (" there", "stop"))] + [b"[DONE]"])
        return Reply(body={"id": "cmpl-1", "object": "text_completion", "created": 1,
                           "model": model, "choices": [{"index": 0, "text": "Hello there",
                                                        "logprobs": None, "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}})
    return Reply(status=404, body={"error": {"message": f"no route {recorded.path}",
                                             "type": "invalid_request_error"}})


def chat_completion(model, text):
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": {"role": "assistant",
                                                                 "content": text},
                                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


def chat_chunks(model, pieces, done=True):
    """OpenAI chat.completion.chunk payloads for these text pieces, then [DONE]."""
    chunks = []
    for i, piece in enumerate(pieces):
        delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
        chunks.append({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                       "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                    "finish_reason": None}]})
    chunks.append({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                   "model": model, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                "finish_reason": "stop"}]})
    return chunks + ([b"[DONE]"] if done else [])


# -- an upstream that speaks the OpenAI Responses API natively ---------------------------------

RESPONSE_USAGE = {"input_tokens": 7, "input_tokens_details": {"cached_tokens": 2},
                  "output_tokens": 4, "output_tokens_details": {"reasoning_tokens": 1},
                  "total_tokens": 11}


def response_object(model, text, *, id="resp_up1", usage=None, output=None):
    """A completed Response whose one output item is a message saying ``text`` (or ``output``)."""
    message = {"id": "msg_up1", "type": "message", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}
    return {"id": id, "object": "response", "created_at": 1, "status": "completed",
            "model": model, "output": output if output is not None else [message],
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": usage if usage is not None else RESPONSE_USAGE}


def response_events(response, pieces):
    """The SSE events (``event:`` lines and all) OpenAI sends for ``response``, its text in
    ``pieces``; numbered from 0."""
    shell = {**response, "status": "in_progress", "output": [], "usage": None}
    item = response["output"][0]
    part = item["content"][0]
    where = {"item_id": item["id"], "output_index": 0}
    events = [{"type": "response.created", "response": shell},
              {"type": "response.in_progress", "response": shell},
              {"type": "response.output_item.added", "output_index": 0,
               "item": {**item, "status": "in_progress", "content": []}},
              {"type": "response.content_part.added", **where, "content_index": 0,
               "part": {**part, "text": ""}}]
    events += [{"type": "response.output_text.delta", **where, "content_index": 0, "delta": p,
                "logprobs": []} for p in pieces]
    events += [{"type": "response.output_text.done", **where, "content_index": 0,
                "text": part["text"], "logprobs": []},
               {"type": "response.content_part.done", **where, "content_index": 0, "part": part},
               {"type": "response.output_item.done", "output_index": 0, "item": item},
               {"type": "response.completed", "response": response}]
    return [f"event: {e['type']}\ndata: {json.dumps({**e, 'sequence_number': i})}".encode()
            for i, e in enumerate(events)]


def responses_answer(recorded: Recorded):
    """A default behaviour: ``POST /v1/responses`` answered like OpenAI ("Hello from
    Responses", whole or streamed), ``GET /v1/responses/{id}`` and its cancel with that
    response; any other path as ``openai_answer``."""
    path = recorded.path.split("?")[0]
    if recorded.method == "POST" and path.endswith("/responses"):
        body = recorded.json()
        response = response_object(body.get("model", "unknown"), "Hello from Responses")
        if body.get("stream"):
            return Stream(response_events(response, ["Hello", " from", " Responses"]))
        return Reply(body=response)
    if "/responses/" in path:
        cancel = path.endswith("/cancel")
        response_id = path.removesuffix("/cancel").rsplit("/", 1)[-1]
        response = response_object("gpt-test", "Hello from Responses", id=response_id)
        return Reply(body={**response, "status": "cancelled"} if cancel else response)
    return openai_answer(recorded)


# -- tool calls, for the agents' tool loops ----------------------------------------------------

def chat_tool_call_chunks(model, call_id, name, arguments: str):
    """The chat.completion.chunk payloads of an answer that calls one tool, its JSON
    ``arguments`` in two pieces, then [DONE]."""
    base = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1, "model": model}
    half = len(arguments) // 2
    deltas = [{"role": "assistant", "content": None, "tool_calls": [
                  {"index": 0, "id": call_id, "type": "function",
                   "function": {"name": name, "arguments": arguments[:half]}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": arguments[half:]}}]}]
    chunks = [{**base, "choices": [{"index": 0, "delta": d, "logprobs": None,
                                    "finish_reason": None}]} for d in deltas]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": "tool_calls"}]})
    return chunks + [b"[DONE]"]


def function_call_events(model, call_id, name, arguments: str, *, id="resp_up2"):
    """The SSE events OpenAI sends for a Response whose one output item calls the function
    ``name`` with the JSON ``arguments`` (in one delta); numbered from 0."""
    item = {"id": "fc_up1", "type": "function_call", "status": "completed", "call_id": call_id,
            "name": name, "arguments": arguments}
    response = response_object(model, "", id=id, output=[item])
    shell = {**response, "status": "in_progress", "output": [], "usage": None}
    where = {"item_id": item["id"], "output_index": 0}
    events = [{"type": "response.created", "response": shell},
              {"type": "response.in_progress", "response": shell},
              {"type": "response.output_item.added", "output_index": 0,
               "item": {**item, "status": "in_progress", "arguments": ""}},
              {"type": "response.function_call_arguments.delta", **where, "delta": arguments},
              {"type": "response.function_call_arguments.done", **where, "name": name,
               "arguments": arguments},
              {"type": "response.output_item.done", "output_index": 0, "item": item},
              {"type": "response.completed", "response": response}]
    return [f"event: {e['type']}\ndata: {json.dumps({**e, 'sequence_number': i})}".encode()
            for i, e in enumerate(events)]
