"""Whole answers and streams, one into the other: replaying a cached answer as SSE events, and
assembling a relayed stream into the whole answer the cache stores."""

from __future__ import annotations

import orjson

from app.sse import DONE, data_event


def replay_events(endpoint: str, body: bytes, *, include_usage=False):
    """The SSE events a stream of this whole answer would have carried, ``[DONE]`` last.

    Made for answers the proxy stored itself, and also used for an upstream's whole JSON
    answer sent where a stream was asked, so it trusts no shape: an answer it cannot replay
    raises ValueError, and nothing else, on the first ``next()``, before any event is
    yielded (a client never gets half a replay). That is a body that is not a JSON object,
    ``choices`` that is not an array of objects, a ``message`` that is not an object,
    ``tool_calls`` that is not an array of objects, or values nested too deep to write.
    Everything else is carried over as it is; only ``usage`` is left out unless an object.
    """
    yield from _replayed(endpoint, body, include_usage)


def _replayed(endpoint: str, body: bytes, include_usage: bool) -> list[bytes]:
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"the answer is not JSON: {e}") from None
    if not isinstance(answer, dict):
        raise ValueError("the answer is not a JSON object")
    choices = answer.get("choices") or []
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise ValueError("the answer's 'choices' is not an array of objects")
    chat = endpoint == "chat"
    base = {"id": answer.get("id"), "object": "chat.completion.chunk" if chat else "text_completion",
            "created": answer.get("created"), "model": answer.get("model")}
    firsts, lasts = [], []
    for choice in choices:
        index = choice.get("index", 0)
        if chat:
            firsts.append({"index": index, "delta": _message_delta(choice), "logprobs": None,
                           "finish_reason": None})
        else:
            firsts.append({"index": index, "text": choice.get("text", ""), "logprobs": None,
                           "finish_reason": None})
        last = {"index": index, "logprobs": None, "finish_reason": choice.get("finish_reason")}
        last.update({"delta": {}} if chat else {"text": ""})
        lasts.append(last)
    chunks = [{**base, "choices": [part]} for part in firsts + lasts]
    usage = answer.get("usage")
    if include_usage and usage and isinstance(usage, dict):
        chunks.append({**base, "choices": [], "usage": usage})
    try:
        return [data_event(chunk) for chunk in chunks] + [DONE]
    except orjson.JSONEncodeError as e:
        raise ValueError(f"the answer cannot be written back as JSON: {e}") from None


def _message_delta(choice: dict) -> dict:
    """The first delta of a chat choice: its message's role, content and tool calls."""
    message = choice.get("message") or {}
    if not isinstance(message, dict):
        raise ValueError("a choice's 'message' is not an object")
    delta = {"role": message.get("role", "assistant"), "content": message.get("content")}
    calls = message.get("tool_calls")
    if calls:
        if not isinstance(calls, list) or not all(isinstance(call, dict) for call in calls):
            raise ValueError("a message's 'tool_calls' is not an array of objects")
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
    return delta


class _Unexpected(Exception):
    """A chunk of a shape the assembler does not take: the stream is relayed, not stored."""


class StreamAssembler:
    """Feeds on relayed SSE events; ``result()`` is the whole answer once the stream completed.

    The events are relayed to the client whatever they hold; the assembler only decides whether
    the answer can be stored. So no event makes it raise: an event it does not recognise as an
    OpenAI chunk (not JSON, not an object, an error, ``choices`` that is not an array of
    objects, an ``id``, ``delta``, ``content``, ``index``, tool call or ``usage`` of another
    kind...)
    marks the assembly broken, and ``result()`` is then None: that answer is not cached.

    The answer carries the usage of the stream's usage chunk or, when the client saw none (it
    did not ask ``include_usage``), the one that travelled beside the events: ``relay.usage``
    (app/pipeline/gateway StreamRelay), unless that is the proxy's estimate. So an answer
    assembled from a stream has its usage like a fresh one.
    """

    def __init__(self, endpoint: str, relay=None):
        self._chat = endpoint == "chat"
        self._relay = relay
        self._head: dict = {}
        self._choices: dict[int, dict] = {}
        self._usage = None
        self._done = False
        self._broken = False

    def feed(self, event: bytes):
        """Take one relayed event; never raises."""
        if self._broken:
            return
        try:
            self._feed(event)
        except Exception:  # _Unexpected, bad JSON, or a shape nobody foresaw: not storing is safe
            self._broken = True

    def result(self) -> bytes | None:
        """The assembled answer, or None when the stream did not complete cleanly."""
        if not self._done or self._broken or not self._choices:
            return None
        try:
            return self._assemble()
        except Exception:  # e.g. a head too deep to write back: not stored
            self._broken = True
            return None

    def _feed(self, event: bytes):
        if not event.startswith(b"data: "):
            return  # comments, keep-alives, other fields
        data = event[6:].rstrip()
        if data == b"[DONE]":
            self._done = True
            return
        chunk = orjson.loads(data)
        if not isinstance(chunk, dict) or "error" in chunk:
            raise _Unexpected
        head = {"id": _text(chunk.get("id")), "created": _number(chunk.get("created")),
                "model": _text(chunk.get("model"))}
        usage, choices = _object(chunk.get("usage")), _array(chunk.get("choices"))
        if not self._head:
            self._head = head
        if usage:
            self._usage = usage
        for part in choices:
            self._merge(part)

    def _merge(self, part):
        if not isinstance(part, dict):
            raise _Unexpected
        index = _integer(part.get("index", 0))
        finish_reason = _text(part.get("finish_reason"))
        c = self._choices.setdefault(index, {"content": [], "tool_calls": {}, "finish_reason": None})
        if finish_reason:
            c["finish_reason"] = finish_reason
        if not self._chat:
            c["content"].append(_text(part.get("text")) or "")
            return
        delta = _object(part.get("delta"))
        content = _text(delta.get("content"))
        if content:
            c["content"].append(content)
        for call in _array(delta.get("tool_calls")):
            call = _object(call)
            function = _object(call.get("function"))
            call_id, name = _text(call.get("id")), _text(function.get("name"))
            arguments = _text(function.get("arguments"))
            slot = c["tool_calls"].setdefault(_integer(call.get("index", 0)), {
                "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            if call_id:
                slot["id"] = call_id
            slot["function"]["name"] += name or ""
            slot["function"]["arguments"] += arguments or ""

    def _assemble(self) -> bytes | None:
        if any(c["finish_reason"] is None for c in self._choices.values()):
            return None
        choices = []
        for index in sorted(self._choices):
            c = self._choices[index]
            if self._chat:
                message = {"role": "assistant", "content": "".join(c["content"]) or None}
                if c["tool_calls"]:
                    message["tool_calls"] = [c["tool_calls"][i] for i in sorted(c["tool_calls"])]
                choices.append({"index": index, "message": message, "logprobs": None,
                                "finish_reason": c["finish_reason"]})
            else:
                choices.append({"index": index, "text": "".join(c["content"]), "logprobs": None,
                                "finish_reason": c["finish_reason"]})
        answer = {**self._head, "object": "chat.completion" if self._chat else "text_completion",
                  "choices": choices}
        usage = self._usage or self._relayed_usage()
        if usage:
            answer["usage"] = usage
        return orjson.dumps(answer)

    def _relayed_usage(self) -> dict | None:
        relay = self._relay
        if relay is None or getattr(relay, "usage_estimated", True):
            return None
        usage = getattr(relay, "usage", None)
        return usage if isinstance(usage, dict) else None


def _integer(value) -> int:
    if type(value) is not int:  # bool, float, string, array, object: not an index
        raise _Unexpected
    return value


def _number(value) -> int | float | None:
    if value is not None and (type(value) is bool or not isinstance(value, (int, float))):
        raise _Unexpected
    return value


def _text(value) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _Unexpected
    return value


def _object(value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Unexpected
    return value


def _array(value) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Unexpected
    return value
