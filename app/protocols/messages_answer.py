"""Chat Completions answers written as Anthropic Messages: a whole ``chat.completion`` as a
Message (``message_from_chat``), a Chat stream as Anthropic's SSE events (``message_events``),
OpenAI usage in Anthropic's words (``anthropic_usage``). The Messages front end's other half
(app/protocols/messages.py)."""

from __future__ import annotations

import orjson

from app.errors import UpstreamError
from app.providers.anthropic_stream import MESSAGE_STOP, anthropic_event
from app.providers.base import Call
from app.sse import KEEPALIVE, event_field

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "function_call": "tool_use", "content_filter": "refusal"}


def anthropic_usage(usage) -> dict:
    """Anthropic's usage for OpenAI-shaped counts: ``input_tokens`` are those not read from
    the cache (OpenAI's ``prompt_tokens`` count them all), ``cache_read_input_tokens`` the
    cached ones."""
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    written = _count(usage.get("cache_creation_input_tokens"))
    out = {"input_tokens": max(0, _count(usage.get("prompt_tokens")) - cached - written),
           "output_tokens": _count(usage.get("completion_tokens"))}
    if cached:
        out["cache_read_input_tokens"] = cached
    if written:
        out["cache_creation_input_tokens"] = written
    return out


def _count(value) -> int:
    return value if type(value) is int and value > 0 else 0


def stop_reason(finish, tools_called: bool, matched, stops) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for a Chat finish_reason. A stop sequence is named only
    where the upstream tells which matched (vLLM's ``stop_reason``); else a stop is
    ``end_turn``."""
    if isinstance(matched, str) and stops and matched in stops:
        return "stop_sequence", matched
    reason = STOP_REASONS.get(finish, "end_turn")
    return ("tool_use" if tools_called and reason == "end_turn" else reason), None


def message_id(chat_id) -> str:
    return "msg_" + (chat_id.removeprefix("chatcmpl-") if isinstance(chat_id, str) and chat_id
                     else "proxy")


def message_from_chat(answer: dict, model: str, stops) -> dict:
    """An Anthropic Message for a ``chat.completion`` (UpstreamError-free: the caller maps
    what it raises)."""
    choice = answer["choices"][0]
    reply = choice["message"]
    content = []
    text = reply.get("content")
    if isinstance(text, list):  # some servers answer in parts
        text = "".join(p.get("text") or "" for p in text if isinstance(p, dict))
    if text:
        content.append({"type": "text", "text": text})
    calls = reply.get("tool_calls") or []
    for call in calls:
        function = call["function"]
        content.append({"type": "tool_use", "id": call.get("id") or "", "name": function["name"],
                        "input": _arguments(function.get("arguments"))})
    reason, sequence = stop_reason(choice.get("finish_reason"), bool(calls),
                                   choice.get("stop_reason"), stops)
    return {"id": message_id(answer.get("id")), "type": "message", "role": "assistant",
            "model": model, "content": content, "stop_reason": reason,
            "stop_sequence": sequence, "usage": anthropic_usage(answer.get("usage"))}


def _arguments(arguments) -> dict:
    """A tool call's arguments as the input object Anthropic's clients need; ValueError when
    they are none (the model wrote broken JSON)."""
    value = orjson.loads(arguments) if isinstance(arguments, str) and arguments else {}
    if not isinstance(value, dict):
        raise ValueError("tool arguments are not a JSON object")
    return value


class ChatToMessage:
    """One streamed answer: Chat chunks in, Anthropic events out (bytes, several events joined).

    ``message_start`` goes out with the first chunk; a text delta opens a text block, a new tool
    call a ``tool_use`` block (closing the one before: Anthropic's blocks come one at a time),
    its argument pieces ``input_json_delta``; reasoning deltas are left out. ``end`` closes the
    open block and writes ``message_delta`` (stop reason, usage) and ``message_stop``.
    """

    __slots__ = ("model", "stops", "started", "index", "text_open", "tool", "tools", "finish",
                 "matched", "id")

    def __init__(self, model: str, stops):
        self.model, self.stops = model, stops
        self.started = False
        self.index = -1  # the open block's index (-1: none yet)
        self.text_open = False  # the open block is text
        self.tool = None  # the Chat index of the tool call whose block is open
        self.tools: dict = {}  # Chat tool call index -> its block index
        self.finish = self.matched = self.id = None

    def start(self, chunk: dict, input_tokens: int) -> bytes:
        self.started = True
        self.id = message_id(chunk.get("id"))
        return anthropic_event(b"message_start", {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 0}}})

    def feed(self, chunk: dict) -> bytes:
        choices = chunk.get("choices")
        if not choices:
            if chunk.get("error") is not None:  # some servers report a failure this way
                raise UpstreamError(f"the provider failed mid-stream: {chunk['error']}",
                                    kind="stream_error")
            return b""  # the usage chunk: the usage travels beside the stream
        choice = choices[0]
        delta = choice.get("delta") or {}
        out = b""
        text = delta.get("content")
        if text:
            if not self.text_open:
                out += self._open({"type": "text", "text": ""})
                self.text_open = True
            out += anthropic_event(b"content_block_delta", {
                "type": "content_block_delta", "index": self.index,
                "delta": {"type": "text_delta", "text": text}})
        for call in delta.get("tool_calls") or ():
            out += self._tool_delta(call)
        if choice.get("finish_reason"):
            self.finish, self.matched = choice["finish_reason"], choice.get("stop_reason")
        return out

    def _tool_delta(self, call: dict) -> bytes:
        position = call.get("index", 0)
        function = call.get("function") or {}
        out = b""
        if position not in self.tools:
            self.text_open = False
            out += self._open({"type": "tool_use", "id": call.get("id") or "",
                               "name": function.get("name") or "", "input": {}})
            self.tools[position], self.tool = self.index, position
        elif position != self.tool:
            raise UpstreamError("the provider interleaved the arguments of several tool calls",
                                kind="protocol")
        arguments = function.get("arguments")
        if arguments:
            out += anthropic_event(b"content_block_delta", {
                "type": "content_block_delta", "index": self.index,
                "delta": {"type": "input_json_delta", "partial_json": arguments}})
        return out

    def _open(self, block: dict) -> bytes:
        out = self._close()
        self.index += 1
        return out + anthropic_event(b"content_block_start", {
            "type": "content_block_start", "index": self.index, "content_block": block})

    def _close(self) -> bytes:
        if self.index < 0 or (not self.text_open and self.tool is None):
            return b""
        self.text_open, self.tool = False, None
        return anthropic_event(b"content_block_stop",
                               {"type": "content_block_stop", "index": self.index})

    def end(self, usage) -> bytes:
        reason, sequence = stop_reason(self.finish, bool(self.tools), self.matched, self.stops)
        return self._close() + anthropic_event(b"message_delta", {
            "type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": anthropic_usage(usage)}) + MESSAGE_STOP


def message_events(call: Call, chat):
    """A Chat provider's stream (``chat``) as Anthropic's SSE events."""
    body = call.body
    message = ChatToMessage(body["model"], body.get("stop_sequences"))
    try:
        for event in chat:
            if event is KEEPALIVE:
                yield KEEPALIVE
                continue
            data = (event[6:-2] if event.startswith(b"data: ") and event.endswith(b"\n\n")
                    else event_field(event.strip(), b"data"))
            if data == b"[DONE]":
                break
            try:
                chunk = orjson.loads(data) if data is not None else None
            except orjson.JSONDecodeError:
                chunk = None
            if not isinstance(chunk, dict):
                raise UpstreamError("the provider sent a chunk that is not a JSON object",
                                    kind="protocol")
            out = message.feed(chunk)
            if not message.started:
                out = message.start(chunk, _input_tokens(chat)) + out
            yield out or KEEPALIVE
        if not message.started:
            raise UpstreamError("the provider's stream ended before it began",
                                kind="truncated")
        yield message.end(chat.usage)
    except (KeyError, TypeError, AttributeError):
        raise UpstreamError("the provider sent a malformed chunk", kind="protocol") from None
    finally:
        chat.close()


def _input_tokens(chat) -> int:
    """The input tokens for ``message_start``: the upstream's count if it came already (the
    mock's), else the estimate; ``message_delta`` gives the final count."""
    usage = chat.usage
    return anthropic_usage(usage)["input_tokens"] if isinstance(usage, dict) else 0
