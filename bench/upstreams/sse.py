"""A streaming OpenAI-compatible upstream (asyncio, one process, keep-alive HTTP/1.1).

``python -m bench.upstreams.sse PORT LIFETIME``. ``POST /v1/chat/completions`` answers the
fixed ``CHAT_COMPLETION`` unless the body has ``"stream": true``; then N
``chat.completion.chunk`` events DELAY ms apart (chunked transfer encoding) and
``data: [DONE]``. N and DELAY come from the model name ``sse-<N>-<DELAY>`` (the proxy passes it
through untouched; default 5 chunks, no delay). With no delay every event is still its own HTTP
chunk, all written at once (what the proxy must relay is then only its own cost).
"""

import asyncio
import json
import sys
import time

from bench.upstreams import CHAT_COMPLETION, listener, ready

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
TAIL = frame(b"data: [DONE]\n\n") + b"0\r\n\r\n"


def plain(status, ctype, body):
    return (b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
            % (status, ctype, len(body))) + body


def shape(model):
    parts = model.split("-")
    try:
        return max(1, int(parts[1])), max(0.0, float(parts[2]) / 1000)
    except (IndexError, ValueError):
        return 5, 0.0


async def stream(writer, model):
    n, delay = shape(model)
    if delay <= 0:
        writer.write(HEAD + b"".join(event(i, n, model) for i in range(n)) + TAIL)
        return
    writer.write(HEAD + event(0, n, model))
    await writer.drain()
    start = time.monotonic()
    for i in range(1, n):
        await asyncio.sleep(max(0.0, start + i * delay - time.monotonic()))
        writer.write(event(i, n, model))
        await writer.drain()
    writer.write(TAIL)


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
            elif method == b"POST" and path == b"/v1/chat/completions":
                try:
                    req = json.loads(body or b"{}")
                except ValueError:
                    req = {}
                if req.get("stream"):
                    await stream(writer, str(req.get("model", "")))
                else:
                    writer.write(plain(200, b"application/json", COMPLETION))
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
