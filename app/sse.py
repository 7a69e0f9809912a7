"""Server-sent events: splitting an upstream byte stream into events, and writing them."""

from __future__ import annotations

import orjson

DONE = b"data: [DONE]\n\n"


def iter_events(chunks):
    """Complete SSE events (without their blank-line terminator) from a stream of byte chunks.

    An event cut off by the end of the stream is dropped: the caller sees the stream end early.
    """
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        while True:
            end = buffer.find(b"\n\n")
            if end < 0:
                break
            event, buffer = buffer[:end], buffer[end + 2:]
            if event:
                yield event


def event_field(event: bytes, name: bytes) -> bytes | None:
    """The value of one field (``data``, ``event``) of an event; data lines are joined."""
    prefix = name + b":"
    if event.startswith(prefix) and b"\n" not in event:  # the usual one-line event
        return event[len(prefix):].removeprefix(b" ")
    values = [line[len(prefix):].removeprefix(b" ") for line in event.split(b"\n")
              if line.startswith(prefix)]
    return b"\n".join(values) if values else None


def data_event(payload) -> bytes:
    """One ``data:`` event carrying ``payload`` as JSON."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"
