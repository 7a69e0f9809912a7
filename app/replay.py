"""Whole answers and streams, one into the other: replaying a cached answer as SSE events, and
assembling a relayed stream into the whole answer the cache stores."""

from __future__ import annotations

import orjson

from app.sse import DONE, data_event


def replay_events(endpoint: str, body: bytes, *, include_usage=False):
    """The SSE events a stream of this whole (cached) answer would have carried."""
    answer = orjson.loads(body)
    chat = endpoint == "chat"
    base = {"id": answer.get("id"), "object": "chat.completion.chunk" if chat else "text_completion",
            "created": answer.get("created"), "model": answer.get("model")}
    choices = answer.get("choices") or []
    for choice in choices:
        index = choice.get("index", 0)
        if chat:
            message = choice.get("message") or {}
            delta = {"role": message.get("role", "assistant"), "content": message.get("content")}
            if message.get("tool_calls"):
                delta["tool_calls"] = [{"index": i, **call}
                                       for i, call in enumerate(message["tool_calls"])]
            first = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        else:
            first = {"index": index, "text": choice.get("text", ""), "logprobs": None,
                     "finish_reason": None}
        yield data_event({**base, "choices": [first]})
    for choice in choices:
        last = {"index": choice.get("index", 0), "logprobs": None,
                "finish_reason": choice.get("finish_reason")}
        last.update({"delta": {}} if chat else {"text": ""})
        yield data_event({**base, "choices": [last]})
    if include_usage and answer.get("usage"):
        yield data_event({**base, "choices": [], "usage": answer["usage"]})
    yield DONE


class StreamAssembler:
    """Feeds on relayed SSE events; ``result()`` is the whole answer once the stream completed."""

    def __init__(self, endpoint: str):
        self._chat = endpoint == "chat"
        self._head: dict = {}
        self._choices: dict[int, dict] = {}
        self._usage = None
        self._done = False
        self._broken = False

    def feed(self, event: bytes):
        if self._broken or not event.startswith(b"data: "):
            return
        data = event[6:].rstrip()
        if data == b"[DONE]":
            self._done = True
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._broken = True
            return
        if "error" in chunk:
            self._broken = True
            return
        if not self._head:
            self._head = {k: chunk.get(k) for k in ("id", "created", "model")}
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for part in chunk.get("choices") or ():
            self._merge(part)

    def result(self) -> bytes | None:
        """The assembled answer, or None when the stream did not complete cleanly."""
        if not self._done or self._broken or not self._choices:
            return None
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
        if self._usage:
            answer["usage"] = self._usage
        return orjson.dumps(answer)

    def _merge(self, part: dict):
        index = part.get("index", 0)
        c = self._choices.setdefault(index, {"content": [], "tool_calls": {}, "finish_reason": None})
        if part.get("finish_reason"):
            c["finish_reason"] = part["finish_reason"]
        if not self._chat:
            c["content"].append(part.get("text") or "")
            return
        delta = part.get("delta") or {}
        if delta.get("content"):
            c["content"].append(delta["content"])
        for call in delta.get("tool_calls") or ():
            slot = c["tool_calls"].setdefault(call.get("index", 0), {
                "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            if call.get("id"):
                slot["id"] = call["id"]
            function = call.get("function") or {}
            slot["function"]["name"] += function.get("name") or ""
            slot["function"]["arguments"] += function.get("arguments") or ""
