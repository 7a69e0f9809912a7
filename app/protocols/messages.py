"""The Anthropic Messages front end (``POST /v1/messages``): its body checked, its errors in
Anthropic's envelope, and a call translated to Chat Completions and back for every provider
that does not speak it natively.

An Anthropic provider gets the call as it is (app/providers/anthropic.py); any other gets the
Chat Completions call ``to_chat`` builds, and its answer comes back as a Message, or as
Anthropic's SSE events built chunk by chunk (app/protocols/messages_answer.py). What has no
Chat counterpart is dropped, not refused: ``thinking`` and thinking blocks,
``context_management``, ``cache_control``, ``defer_loading``, server tools, ``top_k``.
docs/front-ends.md lists it all.
"""

from __future__ import annotations

import logging

import orjson

from app import protocols
from app.errors import InvalidRequest, ProxyError, UpstreamClientError, UpstreamError
from app.protocols.messages_answer import message_events, message_from_chat
from app.providers.anthropic import estimated_input_tokens
from app.providers.base import Call, Reply

log = logging.getLogger("llm_proxy.messages")

PATH = "/v1/messages"
# The client's headers a native provider gets as sent (lower-case: they replace the adapter's).
PROTOCOL_HEADERS = ("anthropic-version", "anthropic-beta")
OVERLOADED = 529  # Anthropic's status for "no capacity now": the proxy's 503s are sent as it
# Anthropic's error type for each status; any other 4xx is invalid_request_error, 5xx api_error
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 504: "timeout_error", OVERLOADED: "overloaded_error"}
KNOWN_ERROR_TYPES = frozenset((*ERROR_TYPES.values(), "api_error", "conflict_error"))

TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "max": "high", "xhigh": "high"}
# Blocks a Chat provider can do nothing with: thinking, and the results of Anthropic's server
# tools (web search, code execution...) in the history; left out of the translation.
DROPPED_BLOCKS = frozenset(("thinking", "redacted_thinking", "server_tool_use",
                            "mcp_tool_use", "mcp_tool_result", "container_upload"))

STRING, INTEGER, NUMBER, BOOLEAN, ARRAY, OBJECT = (str,), (int,), (int, float), (bool,), \
    (list,), (dict,)
# The known fields' JSON types (a bool is no number here, though Python says it is an int)
FIELDS = {"model": STRING, "max_tokens": INTEGER, "messages": ARRAY, "system": (str, list),
          "stream": BOOLEAN, "temperature": NUMBER, "top_p": NUMBER, "top_k": INTEGER,
          "stop_sequences": ARRAY, "tools": ARRAY, "tool_choice": OBJECT, "metadata": OBJECT,
          "thinking": OBJECT, "output_config": OBJECT, "context_management": OBJECT}
_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
          list: "an array", dict: "an object"}
ROLES = ("user", "assistant", "system")  # system: a mid-conversation system message (beta)


# --- the request ---------------------------------------------------------------------------

def validate(body: dict, *, count: bool = False) -> dict:
    """Check a Messages body (``count``: a count_tokens body, which has no ``max_tokens``): the
    required fields, the types of the known ones, each message's role and content shape, each
    tool's name; InvalidRequest (400) naming the field. Unknown fields pass: a native provider
    may know them."""
    for name in ("model", "messages") if count else ("model", "messages", "max_tokens"):
        if body.get(name) is None:
            raise InvalidRequest(f"{name}: Field required", param=name,
                                 code="missing_required_parameter")
    for name, value in body.items():
        kinds = FIELDS.get(name)
        if kinds is None or value is None:
            continue
        if not isinstance(value, kinds) or (value.__class__ is bool and kinds is not BOOLEAN):
            expected = " or ".join(_NAMES[k] for k in kinds if k is not int or float not in kinds)
            raise InvalidRequest(f"{name}: Input should be {expected}", param=name,
                                 code="invalid_type")
    if not body["model"]:
        raise InvalidRequest("model: String should have at least 1 character", param="model",
                             code="invalid_value")
    if not count and body["max_tokens"] < 1:
        raise InvalidRequest("max_tokens: Input should be greater than or equal to 1",
                             param="max_tokens", code="invalid_value")
    if not body["messages"]:
        raise InvalidRequest("messages: at least one message is required", param="messages",
                             code="invalid_value")
    for i, message in enumerate(body["messages"]):
        _check_message(message, f"messages.{i}")
    if isinstance(body.get("system"), list):
        _check_blocks(body["system"], "system")
    for i, tool in enumerate(body.get("tools") or ()):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise InvalidRequest(f"tools.{i}: a tool is an object with a name",
                                 param=f"tools.{i}", code="invalid_value")
    stops = body.get("stop_sequences")
    if stops is not None and not all(isinstance(s, str) for s in stops):
        raise InvalidRequest("stop_sequences: each must be a string", param="stop_sequences",
                             code="invalid_type")
    return body


def _check_message(message, param):
    if not isinstance(message, dict):
        raise InvalidRequest(f"{param}: Input should be an object", param=param,
                             code="invalid_type")
    if message.get("role") not in ROLES:
        raise InvalidRequest(f"{param}.role: Input should be 'user', 'assistant' or 'system'",
                             param=f"{param}.role", code="invalid_value")
    content = message.get("content")
    if isinstance(content, list):
        _check_blocks(content, f"{param}.content")
    elif not isinstance(content, str):
        raise InvalidRequest(f"{param}.content: Input should be a string or a list of blocks",
                             param=f"{param}.content", code="invalid_type")


def _check_blocks(blocks, param):
    for j, block in enumerate(blocks):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise InvalidRequest(f"{param}.{j}: a content block is an object with a type",
                                 param=f"{param}.{j}", code="invalid_type")


def speaks(path) -> bool:
    """Whether a request path is this protocol's (its errors then in Anthropic's envelope)."""
    return isinstance(path, str) and (path == PATH or path.startswith(PATH + "/"))


def protocol_headers(headers) -> dict:
    """The client's protocol headers a native provider gets (``anthropic-version``, its
    ``anthropic-beta`` list), as sent; nothing else of the client's, its key least of all."""
    return {name: headers[name] for name in PROTOCOL_HEADERS if headers.get(name)}


# --- errors --------------------------------------------------------------------------------

def error_status(error: ProxyError) -> int:
    """The status Anthropic's clients expect: the proxy's 503 (overloaded, no provider
    available now) as 529; any other as it is."""
    return OVERLOADED if error.status == 503 else error.status


def error_type(error: ProxyError, status: int) -> str:
    """Anthropic's error type: the upstream's own where it named one (an Anthropic upstream's
    refusal, or its error event mid-stream), else the status's."""
    named = error.code
    if isinstance(error, UpstreamClientError):
        try:
            named = orjson.loads(error.body())["error"]["type"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            named = None
    if isinstance(named, str) and named in KNOWN_ERROR_TYPES:
        return named
    return ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")


def error_body(error: ProxyError, request_id: str | None = None) -> bytes:
    """``{"type": "error", "error": {"type", "message"}}`` (and the request's id, as
    Anthropic's errors carry theirs)."""
    body = {"type": "error", "error": {"type": error_type(error, error_status(error)),
                                       "message": error.message}}
    if request_id:
        body["request_id"] = request_id
    return orjson.dumps(body)


# --- Messages -> Chat Completions ----------------------------------------------------------

def chat_body(body: dict, stream: bool) -> dict:
    """The Chat Completions body that asks the same as a Messages body."""
    messages = []
    system = _text(body.get("system"), "system")
    if system:
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(body["messages"]):
        messages += _chat_messages(message, f"messages.{i}")
    chat = {"model": body["model"], "messages": messages, "max_tokens": body["max_tokens"]}
    if stream:
        chat["stream"] = True
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("stop_sequences"):
        chat["stop"] = list(body["stop_sequences"])
    tools = _chat_tools(body.get("tools") or ())
    if tools:
        chat["tools"] = tools
        chat.update(_tool_choice(body.get("tool_choice")))
    config = body.get("output_config")
    effort = EFFORTS.get(config.get("effort")) if isinstance(config, dict) else None
    if effort:
        chat["reasoning_effort"] = effort
    metadata = body.get("metadata")
    user = metadata.get("user_id") if isinstance(metadata, dict) else None
    if isinstance(user, str) and user:
        chat["user"] = user
    return chat


def _text(content, param) -> str:
    """A system prompt's or system message's text: a string, or its text blocks joined."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, block in enumerate(content):
        if block["type"] != "text" or not isinstance(block.get("text"), str):
            raise InvalidRequest(f"{param}.{j}: a system prompt holds text blocks only",
                                 param=f"{param}.{j}", code="invalid_value")
        texts.append(block["text"])
    return "\n\n".join(t for t in texts if t)


def _chat_messages(message: dict, param: str) -> list:
    """The Chat messages for one Anthropic message: tool results become ``tool`` messages
    (first: Chat wants them right after the assistant's tool calls), the rest one message."""
    role, content = message["role"], message["content"]
    if role == "system":
        return [{"role": "system", "content": _text(content, f"{param}.content")}]
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    param += ".content"
    if role == "assistant":
        return _assistant(content, param)
    results, parts = [], []
    for j, block in enumerate(content):
        kind = block["type"]
        if kind == "tool_result":
            text, media = _tool_result(block, f"{param}.{j}")
            results.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id") or ""),
                            "content": text})
            parts += media
        elif kind not in DROPPED_BLOCKS and not kind.endswith("_tool_result"):
            parts.append(_part(block, f"{param}.{j}"))
    if parts:
        texts = [p["text"] for p in parts if p["type"] == "text"]
        results.append({"role": "user",
                        "content": "\n".join(texts) if len(texts) == len(parts) else parts})
    return results


def _assistant(content: list, param: str) -> list:
    texts, calls = [], []
    for j, block in enumerate(content):
        kind = block["type"]
        if kind == "text":
            texts.append(_string(block, "text", f"{param}.{j}"))
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") if block.get("input") is not None else {})
            calls.append({"id": str(block.get("id") or ""), "type": "function", "function": {
                "name": _string(block, "name", f"{param}.{j}"), "arguments": arguments.decode()}})
        elif kind not in DROPPED_BLOCKS and not kind.endswith("_tool_result"):
            raise InvalidRequest(f"{param}.{j}: a {kind!r} block cannot be sent to this model's "
                                 "provider", param=f"{param}.{j}", code="unsupported_value")
    if not texts and not calls:
        return []  # only thinking: nothing a Chat provider takes
    out = {"role": "assistant", "content": "\n".join(texts) or None}
    if calls:
        out["tool_calls"] = calls
    return [out]


def _tool_result(block: dict, param: str) -> tuple[str, list]:
    """A tool result's text (``Error: `` before it when ``is_error``: Chat has no flag for
    it), and its images, which a ``tool`` message cannot hold: they follow as user parts."""
    content = block.get("content")
    texts, media = [], []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for k, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise InvalidRequest(f"{param}.content.{k}: a content block is an object with "
                                     "a type", param=f"{param}.content.{k}", code="invalid_type")
            translated = _part(part, f"{param}.content.{k}")
            if translated["type"] == "text":
                texts.append(translated["text"])
            else:
                media.append(translated)
    text = "\n".join(texts)
    if block.get("is_error") is True:
        text = "Error: " + text
    return text, media


def _part(block: dict, param: str) -> dict:
    """A user content block as a Chat content part: text, image, document."""
    kind = block["type"]
    if kind == "text":
        return {"type": "text", "text": _string(block, "text", param)}
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    origin = source.get("type")
    if kind == "image" and origin == "base64":
        return {"type": "image_url", "image_url": {
            "url": f"data:{source.get('media_type')};base64,{source.get('data')}"}}
    if kind == "image" and origin == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    if kind == "document" and origin == "text" and isinstance(source.get("data"), str):
        return {"type": "text", "text": source["data"]}
    if kind == "document" and origin == "base64":
        return {"type": "file", "file": {
            "filename": str(block.get("title") or "document.pdf"),
            "file_data": f"data:{source.get('media_type')};base64,{source.get('data')}"}}
    raise InvalidRequest(f"{param}: a {kind!r} block{' from ' + repr(origin) if origin else ''} "
                         "cannot be sent to this model's provider", param=param,
                         code="unsupported_value")


def _string(block: dict, name: str, param: str) -> str:
    value = block.get(name)
    if not isinstance(value, str):
        raise InvalidRequest(f"{param}.{name}: Input should be a string", param=f"{param}.{name}",
                             code="invalid_type")
    return value


def _chat_tools(tools) -> list:
    """Client tools as functions (``input_schema`` as ``parameters``, without its ``$schema``);
    server tools (a ``type`` such as ``web_search_20250305``), which a Chat provider cannot
    run, left out; ``defer_loading``, ``cache_control``, ``strict`` dropped."""
    out = []
    for tool in tools:
        if tool.get("type") not in (None, "custom"):
            continue
        schema = tool.get("input_schema")
        schema = ({k: v for k, v in schema.items() if k != "$schema"}
                  if isinstance(schema, dict) else {"type": "object", "properties": {}})
        function = {"name": tool["name"], "parameters": schema}
        if isinstance(tool.get("description"), str) and tool["description"]:
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice) -> dict:
    if not isinstance(choice, dict):
        return {}
    kind = choice.get("type")
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise InvalidRequest("tool_choice.name: Field required", param="tool_choice.name",
                                 code="missing_required_parameter")
        out = {"tool_choice": {"type": "function", "function": {"name": choice["name"]}}}
    elif kind in TOOL_CHOICES:
        out = {"tool_choice": TOOL_CHOICES[kind]}
    else:
        raise InvalidRequest(f"tool_choice.type: unknown tool choice {kind!r}",
                             param="tool_choice.type", code="invalid_value")
    if choice.get("disable_parallel_tool_use") is True and kind != "none":
        out["parallel_tool_calls"] = False
    return out


class MessagesFrontEnd(protocols.FrontEnd):
    """Anthropic Messages over Chat Completions."""

    endpoint = "messages"

    def to_chat(self, call):
        return Call("chat", chat_body(call.body, call.stream), None, call.stream)

    def reply_from_chat(self, call, reply):
        body = call.body
        try:
            message = message_from_chat(orjson.loads(reply.body), body["model"],
                                        body.get("stop_sequences"))
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError,
                ValueError):
            raise UpstreamError("the provider sent an answer that cannot be written as a "
                                "message", kind="protocol") from None
        return Reply(orjson.dumps(message), status=reply.status, usage=reply.usage,
                     usage_estimated=reply.usage_estimated)

    def stream_from_chat(self, call, stream):
        return protocols.TranslatedStream(message_events(call, stream), stream)

    def error_event(self, error: ProxyError) -> bytes:
        return b"event: error\ndata: " + error_body(error) + b"\n\n"


# --- count_tokens --------------------------------------------------------------------------

def count_tokens(router, call: Call, request, attempts) -> bytes:
    """``{"input_tokens": n}`` for a count_tokens body: counted by the first Anthropic provider
    among the model's candidates; estimated (``estimated_input_tokens``) when there is none or
    it failed. A refusal of the client's request (4xx) stands."""
    for adapter, model in router.candidates(call.body["model"], "messages"):
        if "messages" not in adapter.endpoints:
            continue
        try:
            return adapter.count_tokens(call, model, request, attempts)
        except UpstreamClientError:
            raise
        except UpstreamError as e:
            log.warning("request %s: count_tokens at %s failed, estimated instead: %s",
                        request.id, adapter.name, e.message)
    return orjson.dumps({"input_tokens": estimated_input_tokens(call.body)})
