"""The Responses answer written from a chat one (app/protocols/responses.py): the Response
object, whole, or as the event stream Codex and the openai SDK read, built as the chat chunks
come; and the ``response.failed`` that ends a stream which broke off."""

from __future__ import annotations

import time
import uuid

import orjson

from app.errors import ProxyError, UpstreamError
from app.providers.openai_responses import failed_at, mark_failed
from app.sse import KEEPALIVE

CUSTOM_INPUT = "input"  # the one argument of the function a custom tool becomes


def responses_usage(usage) -> dict | None:
    """OpenAI chat usage as the Responses API writes it."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": _count(
                _get(usage.get("prompt_tokens_details"), "cached_tokens"))},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": _count(
                _get(usage.get("completion_tokens_details"), "reasoning_tokens"))},
            "total_tokens": _count(usage.get("total_tokens")) or prompt + completion}


# --- the answer ----------------------------------------------------------------------------

def response_object(call, status: str) -> dict:
    """The Response object for ``call``, without its output and usage."""
    body = call.body
    return {"id": _new_id("resp"), "object": "response", "created_at": int(time.time()),
            "status": status, "background": False, "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "model": body["model"],
            "output": [], "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
            "previous_response_id": None,
            "reasoning": {"effort": _get(body.get("reasoning"), "effort"), "summary": None},
            "store": False, "temperature": body.get("temperature"),
            "text": {"format": {"type": "text"}, **(body.get("text") or {})},
            "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
            "top_p": body.get("top_p"), "truncation": "disabled", "usage": None,
            "user": body.get("user"), "metadata": body.get("metadata") or {}}


def finished(response: dict, finish_reason, output: list, usage) -> dict:
    """``response`` completed (or incomplete: cut at max_output_tokens, or filtered)."""
    reason = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(finish_reason)
    response.update(status="incomplete" if reason else "completed", output=output,
                    incomplete_details={"reason": reason} if reason else None,
                    usage=responses_usage(usage))
    return response


def output_items(message: dict, custom: set) -> list:
    """A chat answer's message as Response output items."""
    items = []
    content, refusal = message.get("content"), message.get("refusal")
    if isinstance(content, list):
        content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    parts = [_text_part(content)] if isinstance(content, str) and content else []
    if isinstance(refusal, str) and refusal:
        parts.append({"type": "refusal", "refusal": refusal})
    calls = message.get("tool_calls") if isinstance(message.get("tool_calls"), list) else []
    if parts or not calls:
        items.append({"id": _new_id("msg"), "type": "message", "status": "completed",
                      "role": "assistant", "content": parts or [_text_part("")]})
    for call in calls:
        function = _get(call, "function") or {}
        name, arguments = function.get("name") or "", function.get("arguments") or ""
        items.append(_call_item(_get(call, "id") or _new_id("call"), name, "completed",
                                arguments, name in custom))
    return items


def _call_item(call_id: str, name: str, status: str, arguments: str, custom: bool) -> dict:
    if custom:
        return {"id": _new_id("ctc"), "type": "custom_tool_call", "status": status,
                "call_id": call_id, "name": name, "input": _custom_input(arguments)}
    return {"id": _new_id("fc"), "type": "function_call", "status": status,
            "call_id": call_id, "name": name, "arguments": arguments}


def _custom_input(arguments: str) -> str:
    """A custom tool's input from the arguments of the function it was offered as: their one
    string (the arguments as they are when the model wrote something else)."""
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return arguments
    value = value.get(CUSTOM_INPUT) if isinstance(value, dict) else value
    return value if isinstance(value, str) else arguments


def _text_part(text: str) -> dict:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def custom_names(body: dict) -> set:
    return {tool.get("name") for tool in body.get("tools") or ()
            if isinstance(tool, dict) and tool.get("type") == "custom"}


# --- the stream ----------------------------------------------------------------------------

class _Call:
    """A tool call being streamed: its chat fields as they come, its item once it has a name."""
    __slots__ = ("call_id", "name", "arguments", "item", "index")

    def __init__(self, call_id, name):
        self.call_id, self.name, self.arguments = call_id, name, []
        self.item, self.index = None, 0


class EventWriter:
    """The Responses events of one answer, written from its chat chunks: the message item
    and its text deltas, one item per tool call (its argument deltas; a custom tool's input
    whole once known, since its arguments are JSON until then), and the end."""

    def __init__(self, call, custom: set):
        self.response = response_object(call, "in_progress")
        self.sequence = 0
        self.items: list[dict] = []  # the output items, in order
        self._custom = custom
        self._text = None  # the open message item: [item, output_index, pieces]
        self._calls: dict[int, _Call] = {}  # chat tool-call index -> its call
        self._finish_reason = None

    def event(self, kind: str, payload: dict) -> bytes:
        data = orjson.dumps({"type": kind, "sequence_number": self.sequence, **payload})
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def start(self) -> list:
        response = self.response
        return [self.event("response.created", {"response": response}),
                self.event("response.in_progress", {"response": response})]

    def chunk(self, data: bytes) -> list:
        """The events of one chat chunk (none for a role, a usage or an unreadable chunk)."""
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return []
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        if not choices:
            if isinstance(chunk, dict) and isinstance(chunk.get("error"), dict):
                # Its text is the upstream's own: kept out of the client's error and the log.
                raise UpstreamError("the provider's stream broke off with an error event",
                                    kind="protocol")
            return []
        choice = choices[0] if isinstance(choices[0], dict) else {}
        delta = choice.get("delta") or {}
        out = []
        for key in ("content", "refusal"):
            text = delta.get(key)
            if isinstance(text, str) and text:
                out += self._text_delta(text)
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict):
                out += self._call_delta(call)
        if choice.get("finish_reason"):
            self._finish_reason = choice["finish_reason"]
        return out

    def finish(self, usage) -> list:
        """The events that close every open item and the response."""
        out = self._close_text()
        for call in self._calls.values():
            out += self._close_call(call)
        response = finished(self.response, self._finish_reason, self.items, usage)
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        return out + [self.event(kind, {"response": response})]

    def _text_delta(self, text: str) -> list:
        out = []
        if self._text is None:
            item = {"id": _new_id("msg"), "type": "message", "status": "in_progress",
                    "role": "assistant", "content": []}
            self._text = [item, len(self.items), []]
            self.items.append(item)
            out += [self.event("response.output_item.added",
                               {"output_index": self._text[1], "item": item}),
                    self.event("response.content_part.added",
                               {"item_id": item["id"], "output_index": self._text[1],
                                "content_index": 0, "part": _text_part("")})]
        item, index, pieces = self._text
        pieces.append(text)
        out.append(self.event("response.output_text.delta",
                              {"item_id": item["id"], "output_index": index, "content_index": 0,
                               "delta": text, "logprobs": []}))
        return out

    def _close_text(self) -> list:
        if self._text is None:
            return []
        item, index, pieces = self._text
        self._text = None
        part = _text_part("".join(pieces))
        item.update(status="completed", content=[part])
        return [self.event("response.output_text.done",
                           {"item_id": item["id"], "output_index": index, "content_index": 0,
                            "text": part["text"], "logprobs": []}),
                self.event("response.content_part.done",
                           {"item_id": item["id"], "output_index": index, "content_index": 0,
                            "part": part}),
                self.event("response.output_item.done", {"output_index": index, "item": item})]

    def _call_delta(self, delta: dict) -> list:
        function = delta.get("function") if isinstance(delta.get("function"), dict) else {}
        index = delta.get("index") if type(delta.get("index")) is int else len(self._calls)
        call = self._calls.get(index)
        if call is None:
            call = self._calls[index] = _Call(delta.get("id"), function.get("name"))
        else:
            call.call_id = call.call_id or delta.get("id")
            call.name = call.name or function.get("name")
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            call.arguments.append(arguments)
        if call.item is None:
            return self._open_call(call) if call.name else []
        if arguments and call.item["type"] == "function_call":
            return [self.event("response.function_call_arguments.delta",
                               {"item_id": call.item["id"], "output_index": call.index,
                                "delta": arguments})]
        return []

    def _open_call(self, call: _Call) -> list:
        """The item of a tool call whose name came (its arguments so far in one delta)."""
        out = self._close_text()
        custom = call.name in self._custom
        call.item = _call_item(call.call_id or _new_id("call"), call.name or "", "in_progress",
                               "", custom)
        call.index = len(self.items)
        self.items.append(call.item)
        out.append(self.event("response.output_item.added",
                              {"output_index": call.index, "item": call.item}))
        if call.arguments and not custom:
            out.append(self.event("response.function_call_arguments.delta",
                                  {"item_id": call.item["id"], "output_index": call.index,
                                   "delta": "".join(call.arguments)}))
        return out

    def _close_call(self, call: _Call) -> list:
        out = self._open_call(call) if call.item is None else []
        item, arguments = call.item, "".join(call.arguments)
        where = {"item_id": item["id"], "output_index": call.index}
        if item["type"] == "custom_tool_call":
            item.update(status="completed", input=_custom_input(arguments))
            out += [self.event("response.custom_tool_call_input.delta",
                               {**where, "delta": item["input"]}),
                    self.event("response.custom_tool_call_input.done",
                               {**where, "input": item["input"]})]
        else:
            item.update(status="completed", arguments=arguments)
            out.append(self.event("response.function_call_arguments.done",
                                  {**where, "name": item["name"], "arguments": arguments}))
        out.append(self.event("response.output_item.done",
                              {"output_index": call.index, "item": item}))
        return out


def translated_events(writer: EventWriter, stream):
    """The Responses events of a chat stream. Nothing is written before the provider's first
    chunk, so a provider that fails before it still falls back; a failure after it carries
    the response so far (``mark_failed``) for its ``response.failed``."""
    started = False
    try:
        for event in stream:
            if event is KEEPALIVE or not event.startswith(b"data: "):
                yield KEEPALIVE  # nothing for the client: the gateway decides
                continue
            out = [] if started else writer.start()
            started = True
            data = event[6:].rstrip()
            if data == b"[DONE]":
                yield b"".join(out + writer.finish(stream.usage))
                return
            out += writer.chunk(data)
            yield b"".join(out) if out else KEEPALIVE
        yield b"".join(([] if started else writer.start()) + writer.finish(stream.usage))
    except ProxyError as e:
        if started:
            mark_failed(e, {**writer.response, "output": writer.items}, writer.sequence)
        raise
    finally:
        stream.close()


def failed_event(error: ProxyError) -> bytes:
    """``response.failed``, naming the response that failed and continuing its numbering
    when the stream noted them (``mark_failed``)."""
    response, sequence = failed_at(error) or (None, 0)
    response = {**(response or {"id": _new_id("resp"), "object": "response",
                                "created_at": int(time.time()), "model": None,
                                "output": []}),
                "status": "failed", "usage": None,
                "error": {"code": "rate_limit_exceeded" if error.status == 429
                          else "server_error", "message": error.message}}
    payload = {"type": "response.failed", "sequence_number": sequence, "response": response}
    return b"event: response.failed\ndata: " + orjson.dumps(payload) + b"\n\n"


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _get(mapping, key):
    return mapping.get(key) if isinstance(mapping, dict) else None


def _count(value) -> int:
    return value if type(value) is int and value > 0 else 0
