"""A streaming OpenAI-compatible upstream (asyncio, one process, keep-alive HTTP/1.1).

``python -m bench.upstreams.sse PORT LIFETIME``. ``POST /v1/chat/completions`` answers the
fixed ``CHAT_COMPLETION`` unless the body has ``"stream": true``; then N
``chat.completion.chunk`` events DELAY ms apart (chunked transfer encoding) and
``data: [DONE]``. N and DELAY come from the model name ``sse-<N>-<DELAY>`` (the proxy passes it
through untouched; default 5 chunks, no delay). With no delay every event is still its own HTTP
chunk, all written at once (what the proxy must relay is then only its own cost).

``POST /v1/messages`` (Anthropic) and ``POST /v1/responses`` (OpenAI Responses) do the same in
their protocols: the fixed Message or Response, or a stream whose N text deltas are framed by
the events the protocol opens and closes an answer with (the front ends' pass-through).
"""

import asyncio
import json
import sys
import time

from bench.upstreams import ANTHROPIC_MESSAGE, CHAT_COMPLETION, RESPONSE, listener, ready

COMPLETION = CHAT_COMPLETION.encode()


def frame(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(i, n, model):
    delta = {"role": "assistant", "content": f"tok{i} "} if i == 0 else {"content": f"tok{i} "}
    body = json.dumps({"id": "chatcmpl-sse", "object": "chat.completion.chunk",
                       "created": 1700000000, "model": model, "choices": [{
                           "index": 0, "delta": delta, "logprobs": None,
                           "finish_reason": "stop" if i == n - 1 else None}]},
                      separators=(",", ":")).encode()
    return frame(b"data: " + body + b"\n\n")


HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")
END = b"0\r\n\r\n"
TAIL = frame(b"data: [DONE]\n\n") + END


def named(kind, payload):
    """One ``event:``/``data:`` SSE event, an HTTP chunk of its own."""
    data = json.dumps({"type": kind, **payload}, separators=(",", ":")).encode()
    return frame(b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n")


class Chat:
    """The chat stream: N chunks, then ``[DONE]``."""
    first = staticmethod(lambda n, model: b"")
    each = staticmethod(event)
    last = staticmethod(lambda n, model: TAIL)


class Messages:
    """Anthropic's stream: message_start, one text block of N deltas, message_delta/stop."""

    @staticmethod
    def first(n, model):
        message = {**json.loads(ANTHROPIC_MESSAGE), "model": model, "content": [],
                   "stop_reason": None, "usage": {"input_tokens": 1, "output_tokens": 1}}
        return (named("message_start", {"message": message}) + named(
            "content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}))

    @staticmethod
    def each(i, n, model):
        return named("content_block_delta", {"index": 0, "delta": {"type": "text_delta",
                                                                   "text": f"tok{i} "}})

    @staticmethod
    def last(n, model):
        return (named("content_block_stop", {"index": 0}) + named(
            "message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                              "usage": {"output_tokens": n}})
                + named("message_stop", {}) + END)


class Responses:
    """The Responses stream: created, in_progress, a message item of N text deltas, its
    closing events and response.completed (sequence numbers: 0-3, then 4 + i, then on)."""

    @staticmethod
    def _response(model, status, output):
        return {**json.loads(RESPONSE), "model": model, "status": status, "output": output}

    @staticmethod
    def first(n, model):
        response = {**Responses._response(model, "in_progress", []), "usage": None}
        item = {"id": "msg_sse", "type": "message", "status": "in_progress",
                "role": "assistant", "content": []}
        part = {"type": "output_text", "text": "", "annotations": []}
        return b"".join(named(kind, {"sequence_number": i, **payload}) for i, (kind, payload) in
                        enumerate((("response.created", {"response": response}),
                                   ("response.in_progress", {"response": response}),
                                   ("response.output_item.added",
                                    {"output_index": 0, "item": item}),
                                   ("response.content_part.added",
                                    {"item_id": "msg_sse", "output_index": 0,
                                     "content_index": 0, "part": part}))))

    @staticmethod
    def each(i, n, model):
        return named("response.output_text.delta", {
            "sequence_number": 4 + i, "item_id": "msg_sse", "output_index": 0,
            "content_index": 0, "delta": f"tok{i} "})

    @staticmethod
    def last(n, model):
        text = "".join(f"tok{i} " for i in range(n))
        part = {"type": "output_text", "text": text, "annotations": []}
        item = {"id": "msg_sse", "type": "message", "status": "completed", "role": "assistant",
                "content": [part]}
        where = {"item_id": "msg_sse", "output_index": 0, "content_index": 0}
        return b"".join(named(kind, {"sequence_number": 4 + n + i, **payload})
                        for i, (kind, payload) in enumerate((
                            ("response.output_text.done", {**where, "text": text}),
                            ("response.content_part.done", {**where, "part": part}),
                            ("response.output_item.done", {"output_index": 0, "item": item}),
                            ("response.completed", {"response": Responses._response(
                                model, "completed", [item])})))) + END


# path -> (the stream's protocol, the whole answer)
ROUTES = {b"/v1/chat/completions": (Chat, COMPLETION),
          b"/v1/messages": (Messages, ANTHROPIC_MESSAGE.encode()),
          b"/v1/responses": (Responses, RESPONSE.encode())}


def plain(status, ctype, body):
    return (b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
            % (status, ctype, len(body))) + body


def shape(model):
    parts = model.split("-")
    try:
        return max(1, int(parts[1])), max(0.0, float(parts[2]) / 1000)
    except (IndexError, ValueError):
        return 5, 0.0


WHOLE: dict = {}  # (protocol, model) -> a zero-delay stream's bytes, made once
WHOLE_LIMIT = 256


async def stream(writer, model, protocol=Chat):
    n, delay = shape(model)
    if delay <= 0:  # made once: the upstream's own cost is then no part of what is measured
        whole = WHOLE.get((protocol, model))
        if whole is None:
            whole = (HEAD + protocol.first(n, model)
                     + b"".join(protocol.each(i, n, model) for i in range(n))
                     + protocol.last(n, model))
            if len(WHOLE) < WHOLE_LIMIT:
                WHOLE[(protocol, model)] = whole
        writer.write(whole)
        return
    writer.write(HEAD + protocol.first(n, model) + protocol.each(0, n, model))
    await writer.drain()
    start = time.monotonic()
    for i in range(1, n):
        await asyncio.sleep(max(0.0, start + i * delay - time.monotonic()))
        writer.write(protocol.each(i, n, model))
        await writer.drain()
    writer.write(protocol.last(n, model))


async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, path = lines[0].split(b" ")[:2]
            length, close = 0, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            body = await reader.readexactly(length) if length else b""
            if path == b"/ready":
                writer.write(plain(200, b"text/plain", b"ready"))
            elif method == b"POST" and path.split(b"?")[0] in ROUTES:
                protocol, whole = ROUTES[path.split(b"?")[0]]
                try:
                    req = json.loads(body or b"{}")
                except ValueError:
                    req = {}
                if req.get("stream"):
                    await stream(writer, str(req.get("model", "")), protocol)
                else:
                    writer.write(plain(200, b"application/json", whole))
            else:
                writer.write(plain(404, b"application/json", b'{"error":{"message":"no"}}'))
            await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def main(port, lifetime):
    server = await asyncio.start_server(handle, sock=listener(port, 4096))
    ready()
    async with server:
        await asyncio.sleep(lifetime)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))
