"""The OpenAI Responses API passed through to an upstream that speaks it (OpenAI, Azure).

The client's body goes as it came and the upstream's events come back unchanged; what the
proxy needs of them is read on the way: the answer's usage (``response.completed``, or the
whole answer's ``usage``), made OpenAI-chat-shaped so limits and cost work as for any call,
and the id of each response the upstream keeps, so ``GET /v1/responses/{id}`` and its cancel
reach the provider that made it (``StoredResponses``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import orjson

from app.errors import UpstreamError
from app.providers.base import tokens_of_chars
from app.sse import KEEPALIVE, event_field

MAX_STORED = 10000  # response ids remembered per provider, the oldest forgotten first
MAX_ID = 256  # characters; a longer id is none the proxy keeps
# The events that end a Responses stream: each carries the whole response, usage included.
FINAL = frozenset((b"response.completed", b"response.incomplete", b"response.failed"))
# Those whose ``delta`` is answer text: counted for an estimate should no usage come.
DELTAS = frozenset((b"response.output_text.delta", b"response.function_call_arguments.delta",
                    b"response.custom_tool_call_input.delta", b"response.refusal.delta"))
FAILED_AT = "responses_failed_at"  # attribute of an error raised mid-stream: see ``mark_failed``


def chat_usage(usage) -> dict | None:
    """A Responses ``usage`` (input_tokens, output_tokens, ...) in the OpenAI chat shape the
    limits and the price table read; None when it is none."""
    if not isinstance(usage, dict) or not usage:
        return None
    prompt, completion = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
    found = {"prompt_tokens": prompt, "completion_tokens": completion,
             "total_tokens": _count(usage.get("total_tokens")) or prompt + completion}
    cached = _count(_get(usage.get("input_tokens_details"), "cached_tokens"))
    if cached:
        found["prompt_tokens_details"] = {"cached_tokens": cached}
    reasoning = _count(_get(usage.get("output_tokens_details"), "reasoning_tokens"))
    if reasoning:
        found["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return found


def prompt_tokens(call) -> int:
    """A Responses call's prompt, estimated from its bytes (about four characters a token; the
    tools and instructions count too, as the upstream counts them): for an answer that came
    without usage."""
    return tokens_of_chars(len(call.raw) if call.raw is not None else len(orjson.dumps(call.body)))


def mark_failed(error: Exception, response: dict | None, sequence: int) -> None:
    """Note on ``error``, raised after a Responses stream began, the response its events
    described and the next sequence number: the gateway writes the stream's last event from the
    error alone (app/protocols ``error_event``), and ``response.failed`` should name the
    response that failed and continue its numbering."""
    setattr(error, FAILED_AT, (response, sequence))


def failed_at(error: Exception) -> tuple[dict | None, int] | None:
    """(response, next sequence number) that ``mark_failed`` noted; None when none was."""
    return getattr(error, FAILED_AT, None)


def relay(response, meter, provider: str, on_created):
    """The upstream's SSE events relayed unchanged, ``KEEPALIVE`` for quiet; the final usage
    reported to ``meter``; ``on_created(response)`` with the response the first event
    describes. UpstreamError when the stream ends before its final event; an error raised
    mid-stream carries where it stopped (``mark_failed``)."""
    sequence, created = 0, None
    try:
        for event in response.events():
            if event is KEEPALIVE:
                yield KEEPALIVE
                continue
            kind = event_field(event, b"event")
            if kind is None:  # no event line: the type is in the data only
                kind = _data(event).get("type")
                kind = kind.encode() if isinstance(kind, str) else b""
            sequence += 1
            if kind in DELTAS:
                delta = _data(event).get("delta")
                meter.relayed += len(delta) if isinstance(delta, str) else 0
            elif kind in FINAL or kind == b"response.created":
                answer = _data(event).get("response")
                if isinstance(answer, dict):
                    if kind == b"response.created":
                        created = answer
                        on_created(answer)
                    else:
                        usage = chat_usage(answer.get("usage"))
                        if usage:
                            meter.report(usage)
            yield event + b"\n\n"
            if kind in FINAL:
                return
        raise UpstreamError(f"provider {provider}: the stream ended before it was complete",
                            provider=provider, kind="truncated")
    except UpstreamError as e:
        mark_failed(e, created, sequence)
        raise
    finally:
        response.close()


class StoredResponses:
    """The responses a provider's upstream keeps that were made through this proxy: id ->
    the tenant that made it, so only that tenant reaches it again. Bounded (the oldest
    forgotten first) and per process: an id made by another worker is unknown here."""

    def __init__(self, limit: int = MAX_STORED):
        self._ids: OrderedDict[str, str] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def add(self, response_id, tenant: str) -> None:
        if not isinstance(response_id, str) or not 0 < len(response_id) <= MAX_ID:
            return
        with self._lock:
            self._ids[response_id] = tenant
            self._ids.move_to_end(response_id)
            while len(self._ids) > self._limit:
                self._ids.popitem(last=False)

    def owned_by(self, response_id: str, tenant: str) -> bool:
        with self._lock:
            return self._ids.get(response_id) == tenant

    def __len__(self) -> int:
        return len(self._ids)


def kept_upstream(body: dict) -> bool:
    """Whether the upstream keeps the response this body asks for (``store`` defaults to
    true in the Responses API)."""
    return body.get("store") is not False


def _data(event: bytes) -> dict:
    """An event's data as a JSON object ({} for anything else)."""
    data = event_field(event, b"data")
    try:
        value = orjson.loads(data) if data else None
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _get(mapping, key):
    return mapping.get(key) if isinstance(mapping, dict) else None


def _count(value) -> int:
    return value if type(value) is int and value > 0 else 0
