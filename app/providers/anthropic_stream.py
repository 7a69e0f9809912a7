"""Anthropic answers in OpenAI's words: stop reasons, usage, and streamed events as chunks;
and, for the Messages front end's pass-through, Anthropic's events relayed as they are."""

from __future__ import annotations

import orjson

from app.errors import UpstreamError
from app.providers.base import UsageMeter, parse_json
from app.sse import DONE, KEEPALIVE, data_event, event_field

FINISH_REASONS = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
    "max_tokens": "length", "model_context_window_exceeded": "length",
    "tool_use": "tool_calls", "refusal": "content_filter",
}


def finish_reason(stop_reason) -> str:
    """OpenAI's finish_reason for an Anthropic stop_reason ("stop" for any unknown one)."""
    return FINISH_REASONS.get(stop_reason, "stop")


def usage(anthropic_usage) -> dict:
    """OpenAI usage. As at OpenAI, ``prompt_tokens`` is every input token: Anthropic's
    ``input_tokens`` counts only those after the last cache breakpoint, so the cache reads
    (``prompt_tokens_details.cached_tokens``) and the cache writes are added; the writes,
    which OpenAI has no field for (and which cost more), stay as
    ``cache_creation_input_tokens``."""
    u = anthropic_usage if isinstance(anthropic_usage, dict) else {}
    cached, written = _count(u.get("cache_read_input_tokens")), _count(
        u.get("cache_creation_input_tokens"))
    prompt = _count(u.get("input_tokens")) + written + cached
    completion = _count(u.get("output_tokens"))
    result = {"prompt_tokens": prompt, "completion_tokens": completion,
              "total_tokens": prompt + completion}
    if cached:
        result["prompt_tokens_details"] = {"cached_tokens": cached}
    if written:
        result["cache_creation_input_tokens"] = written
    return result


def _count(value) -> int:
    return value if type(value) is int and value > 0 else 0


def relay(response, translator, provider: str):
    """OpenAI SSE events for the Anthropic events of an ``UpstreamResponse``, closed at the
    end; ``KEEPALIVE`` for whatever gives the client nothing (pings, quiet), so the gateway
    decides."""
    try:
        for event in response.events():
            data = event_field(event, b"data") if event is not KEEPALIVE else None
            if data is None:
                yield KEEPALIVE  # comments, keep-alives, quiet
                continue
            translated = translator.feed(parse_json(data, provider))
            if translated:
                yield from translated
            else:
                yield KEEPALIVE
            if translator.finished:
                return
        raise UpstreamError(f"provider {provider}: the stream ended before it was complete",
                            provider=provider, kind="truncated")
    finally:
        response.close()


class StreamTranslator:
    """The state of one streamed answer: Anthropic events in, OpenAI SSE events out.

    The first OpenAI event is held back until the first content block starts, so an error
    event right after ``message_start`` still lets the gateway fall back to another provider.
    The answer's usage goes to ``meter`` as it comes (the input counts with ``message_start``,
    the final ones with ``message_delta``), whether or not the client asked for a usage chunk.
    """

    def __init__(self, endpoint: str, created: int, provider: str, *, include_usage=False):
        self.chat = endpoint == "chat"
        self.created = created
        self.provider = provider
        self.include_usage = include_usage
        self.id = self.model = self.stop_reason = None
        self.usage: dict = {}  # Anthropic's counts so far
        self.meter = UsageMeter()
        self.tool_index: dict = {}  # Anthropic content block index -> OpenAI tool call index
        self.opened = False  # the role chunk has been sent
        self.closed = False  # the finish_reason chunk has been sent
        self.finished = False  # message_stop seen: the answer is complete

    def feed(self, event) -> list[bytes]:
        """The OpenAI events for one Anthropic event (often none)."""
        kind = event.get("type") if isinstance(event, dict) else None
        handler = getattr(self, f"_on_{kind}", None) if isinstance(kind, str) else None
        if handler is None:
            return []  # ping, and event types newer than this adapter
        try:
            return handler(event)
        except (KeyError, TypeError, AttributeError):
            raise UpstreamError(f"provider {self.provider} sent a malformed {kind} event",
                                provider=self.provider, kind="protocol") from None

    def _on_message_start(self, event):
        message = event["message"]
        self.id, self.model = message.get("id"), message.get("model")
        self._add_usage(message.get("usage"))
        self.meter.report(usage(self.usage), final=False)  # output_tokens grows till the end
        return []

    def _on_content_block_start(self, event):
        block, out = event["content_block"], self._open()
        if block["type"] == "text" and block.get("text"):
            self.meter.text(block["text"])
            out.append(self._chunk({"content": block["text"]}))
        elif block["type"] == "tool_use" and self.chat:
            index = self.tool_index[event["index"]] = len(self.tool_index)
            out.append(self._chunk({"tool_calls": [{
                "index": index, "id": block["id"], "type": "function",
                "function": {"name": block["name"], "arguments": ""}}]}))
        return out

    def _on_content_block_delta(self, event):
        delta, out = event["delta"], self._open()
        self.meter.text(delta.get("text"), delta.get("partial_json"), delta.get("thinking"))
        if delta["type"] == "text_delta" and delta["text"]:
            out.append(self._chunk({"content": delta["text"]}))
        elif delta["type"] == "input_json_delta" and delta["partial_json"]:
            index = self.tool_index.get(event["index"])
            if index is not None:
                out.append(self._chunk({"tool_calls": [{
                    "index": index, "function": {"arguments": delta["partial_json"]}}]}))
        return out  # thinking, signature and citation deltas have no OpenAI counterpart

    def _on_message_delta(self, event):
        self.stop_reason = (event.get("delta") or {}).get("stop_reason") or self.stop_reason
        self._add_usage(event.get("usage"))
        self.meter.report(usage(self.usage))
        return self._open() + self._close()

    def _on_message_stop(self, event):
        out = self._open() + self._close()
        if self.include_usage:
            out.append(data_event({**self._base(), "choices": [], "usage": usage(self.usage)}))
        out.append(DONE)
        self.finished = True
        return out

    def _on_error(self, event):
        error = event.get("error") or {}
        raise UpstreamError(f"provider {self.provider} failed mid-stream: "
                            f"{error.get('type', 'error')}: {error.get('message', '')}",
                            provider=self.provider, kind="stream_error")

    def _open(self) -> list:
        if self.opened:
            return []
        self.opened = True
        return [self._chunk({"role": "assistant", "content": ""})] if self.chat else []

    def _close(self) -> list:
        if self.closed:
            return []
        self.closed = True
        return [self._chunk({}, finish_reason(self.stop_reason))]

    def _add_usage(self, counts):
        # message_delta repeats the counts so far (output_tokens is cumulative), some as null
        if isinstance(counts, dict):
            self.usage.update({k: v for k, v in counts.items() if v is not None})

    def _base(self) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _chunk(self, delta: dict, finish=None) -> bytes:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta.get("content", ""), "logprobs": None,
                      "finish_reason": finish}
        return data_event({**self._base(), "choices": [choice]})


# --- Anthropic events relayed as they are (the Messages front end's pass-through) ------------

# Events a native stream holds back: until one that carries the answer arrives, an error event
# can still fall back to another provider (the client has had nothing).
_PREAMBLE = frozenset((b"message_start", b"ping"))
# The bytes of a content_block_delta event that are no answer text (its JSON envelope): what a
# delta's size less this counts as text for an estimate should the final usage never come.
_DELTA_ENVELOPE = 100


def native_relay(response, meter: UsageMeter, provider: str):
    """The Anthropic SSE events of an ``UpstreamResponse``, relayed unchanged (each written back
    with its blank line), closed at the end. The answer's usage goes to ``meter`` as it comes:
    the input counts with ``message_start`` (not final), the final counts with
    ``message_delta``. Only those two and ``error`` are parsed: the others are relayed by their
    ``event:`` line, so the relay costs a few bytes' comparison per event.

    The events before the first content block (``message_start``, pings) are held back and
    sent with it, ``KEEPALIVE`` meanwhile, so an error event right after ``message_start``
    still lets the gateway fall back. An ``error`` event raises UpstreamError whose ``code`` is
    the upstream's error type (the front end's error event keeps it); a stream that ends before
    ``message_stop`` raises UpstreamError too.
    """
    held: list | None = []
    counts: dict = {}
    try:
        for event in response.events():
            if event is KEEPALIVE:
                yield KEEPALIVE
                continue
            name, event = _named(event, provider)
            if name == b"content_block_delta":
                meter.relayed += max(0, len(event) - _DELTA_ENVELOPE)
            elif name == b"message_start":
                message = _data(event, provider).get("message")
                _merge_counts(counts, message.get("usage") if isinstance(message, dict) else None)
                meter.report(usage(counts), final=False)  # output_tokens grows till the end
            elif name == b"message_delta":
                _merge_counts(counts, _data(event, provider).get("usage"))
                meter.report(usage(counts))
            elif name == b"error":
                raise _stream_error(_data(event, provider), provider)
            event += b"\n\n"
            if held is not None:
                held.append(event)
                if name in _PREAMBLE:
                    yield KEEPALIVE
                    continue
                event, held = b"".join(held), None
            yield event
            if name == b"message_stop":
                return
        raise UpstreamError(f"provider {provider}: the stream ended before it was complete",
                            provider=provider, kind="truncated")
    finally:
        response.close()


def _named(event: bytes, provider: str) -> tuple[bytes, bytes]:
    """(the event's name, the event): its ``event:`` line's, or for an event that has none
    (clients such as the anthropic SDK skip those) its data's ``type``, then written in."""
    if event.startswith(b"event:"):
        end = event.find(b"\n")
        return event[6:end].strip() if end > 0 else event[6:].strip(), event
    kind = _data(event, provider).get("type")
    if not isinstance(kind, str) or not kind:
        raise UpstreamError(f"provider {provider} sent an event without a type",
                            provider=provider, kind="protocol")
    name = kind.encode()
    return name, b"event: " + name + b"\n" + event


def _data(event: bytes, provider: str) -> dict:
    data = event_field(event, b"data")
    payload = parse_json(data, provider) if data is not None else None
    if not isinstance(payload, dict):
        raise UpstreamError(f"provider {provider} sent an event without a JSON object",
                            provider=provider, kind="protocol")
    return payload


def _merge_counts(counts: dict, new) -> None:
    # message_delta repeats the counts so far (output_tokens is cumulative), some as null
    if isinstance(new, dict):
        counts.update({k: v for k, v in new.items() if v is not None})


def _stream_error(payload: dict, provider: str) -> UpstreamError:
    error = payload.get("error") if isinstance(payload.get("error"), dict) else {}
    kind = error.get("type") if isinstance(error.get("type"), str) else "api_error"
    return UpstreamError(f"provider {provider} failed mid-stream: {kind}: "
                         f"{error.get('message', '')}", provider=provider, kind="stream_error",
                         code=kind)


def message_events(message: dict) -> list[bytes]:
    """The SSE events Anthropic would have streamed for a whole ``message`` (an upstream that
    answered JSON where a stream was asked): start, each block with its content in one delta,
    the stop reason and usage, stop."""
    blocks = message.get("content") or []
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    events = [anthropic_event(b"message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(blocks):
        kind = block.get("type")
        first, delta = dict(block), None
        if kind == "text":
            first["text"], delta = "", {"type": "text_delta", "text": block.get("text") or ""}
        elif kind == "tool_use":
            first["input"] = {}
            delta = {"type": "input_json_delta",
                     "partial_json": orjson.dumps(block.get("input") or {}).decode()}
        elif kind == "thinking":
            first["thinking"], first["signature"] = "", ""
            delta = {"type": "thinking_delta", "thinking": block.get("thinking") or ""}
        events.append(anthropic_event(b"content_block_start", {
            "type": "content_block_start", "index": index, "content_block": first}))
        if delta is not None:
            events.append(anthropic_event(b"content_block_delta", {
                "type": "content_block_delta", "index": index, "delta": delta}))
        if kind == "thinking" and block.get("signature"):
            events.append(anthropic_event(b"content_block_delta", {
                "type": "content_block_delta", "index": index,
                "delta": {"type": "signature_delta", "signature": block["signature"]}}))
        events.append(anthropic_event(b"content_block_stop",
                                      {"type": "content_block_stop", "index": index}))
    events.append(anthropic_event(b"message_delta", {
        "type": "message_delta", "usage": message.get("usage") or {"output_tokens": 0},
        "delta": {"stop_reason": message.get("stop_reason"),
                  "stop_sequence": message.get("stop_sequence")}}))
    events.append(MESSAGE_STOP)
    return events


def anthropic_event(name: bytes, payload: dict) -> bytes:
    """One event in Anthropic's wire form: its ``event:`` line, its data, the blank line."""
    return b"event: " + name + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


MESSAGE_STOP = anthropic_event(b"message_stop", {"type": "message_stop"})
