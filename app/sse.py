"""Server-sent events: splitting an upstream byte stream into events, and writing them."""

from __future__ import annotations

import orjson

from app.errors import UpstreamError

DONE = b"data: [DONE]\n\n"
# An SSE comment: clients ignore it. Upstream reads that complete no event yield it too, so the
# layers above get control back while an upstream is quiet (see gateway.StreamRelay).
KEEPALIVE = b": keepalive\n\n"


def iter_events(chunks, *, max_event_bytes: int = 0, provider: str = ""):
    """Complete SSE events (without their blank-line terminator) from a stream of byte chunks,
    and ``KEEPALIVE`` for every chunk (an empty one too) that completed no event.

    Linear in the bytes received: each byte is scanned for a boundary once. An event growing
    past ``max_event_bytes`` (0: no bound) raises UpstreamError. An event cut off by the end of
    the stream is dropped: the caller sees the stream end early.
    """
    buffer = bytearray()
    scanned = 0  # bytes of the buffer known to hold no boundary
    carriage = False  # the last chunk ended in \r: its \n may start the next one
    for chunk in chunks:
        if b"\r" in chunk or carriage:
            if carriage:
                chunk = b"\r" + chunk
            carriage = chunk.endswith(b"\r")
            chunk = (chunk[:-1] if carriage else chunk).replace(b"\r\n", b"\n")
        buffer += chunk
        start, found = 0, False
        while True:
            end = buffer.find(b"\n\n", max(start, scanned - 1))
            if end < 0:
                break
            if end > start:
                found = True
                yield bytes(buffer[start:end])
            start = scanned = end + 2
        if start:
            del buffer[:start]
        scanned = len(buffer)
        if max_event_bytes and len(buffer) > max_event_bytes:
            raise UpstreamError(
                f"provider {provider} sent an SSE event larger than the limit of "
                f"{max_event_bytes / 1024:g} KB (streaming.max_event_kb)", provider=provider,
                kind="too_large")
        if not found:
            yield KEEPALIVE


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
