"""Adapter for Anthropic's Messages API, translated to and from the OpenAI shape.

Requests become a ``POST /v1/messages`` body built per call; answers come back as
``chat.completion`` (or ``text_completion`` for the legacy endpoint). Streams are translated
event by event in ``anthropic_stream``.

Calls of the Messages front end (endpoint ``messages``, app/protocols/messages.py) are served
natively: the client's body goes as it is, with the client's ``anthropic-version`` and
``anthropic-beta`` and this provider's key, and the answer and its events come back unchanged.
"""

from __future__ import annotations

import time
from urllib.parse import quote

import orjson

from app.errors import InvalidRequest, UpstreamError
from app.providers.anthropic_stream import (StreamTranslator, finish_reason, message_events,
                                            native_relay, relay, usage)
from app.providers.base import (ProviderAdapter, ProviderStream, Reply, UsageMeter, asked_usage,
                                 listed_models, parse_json, replayed, tokens_of_chars, with_total)
from app.validation import MAX_DEPTH, nesting_depth, too_deep

API_VERSION = "2023-06-01"

TOOL_CHOICES = {"auto": "auto", "required": "any", "none": "none"}
MODEL_PAGES = 20  # of up to 1000 models each: Anthropic lists a few dozen


class AnthropicAdapter(ProviderAdapter):
    """Speaks the Messages API for chat and legacy completion calls, and natively for the
    Messages front end's."""

    endpoints = ("chat", "completions", "messages")
    lists_models = True

    def __init__(self, settings, http, *, clock=time.time):
        super().__init__(settings, http)
        self._clock = clock  # wall clock for ``created``: Anthropic's answers carry no time
        base = settings.base_url.rstrip("/")
        self._url = base + ("/messages" if base.endswith("/v1") else "/v1/messages")
        self._models_url = base + ("/models" if base.endswith("/v1") else "/v1/models")
        key = settings.api_key
        self._headers = {"content-type": "application/json", "anthropic-version": API_VERSION,
                         **({"x-api-key": key} if key else {}), **settings.headers}

    def list_models(self, timeout: float) -> dict[str, int] | None:
        """``GET /v1/models``, page by page (``has_more``, ``after_id``)."""
        headers = {k: v for k, v in self._headers.items() if k != "content-type"}
        found, after = {}, ""
        for _ in range(MODEL_PAGES):
            query = "?limit=1000" + (f"&after_id={quote(after, safe='')}" if after else "")
            page = self._get_model_list(self._models_url + query, headers, timeout)
            found.update(listed_models(page))
            after = page.get("last_id")
            if page.get("has_more") is not True or not isinstance(after, str) or not after:
                break
        return found

    def send(self, call, model, request, attempts, *, retry=True) -> Reply:
        if call.endpoint == "messages":
            return self._send_native(call, model, request, attempts, retry)
        payload = messages_request(call, model, self.settings.max_tokens_default, stream=False)
        answer = self._answer(call, self._post(payload, request, attempts, stream=False,
                                                          retry=retry).body())
        return Reply(orjson.dumps(answer), usage=answer.get("usage"))

    def stream(self, call, model, request, attempts, *, retry=True):
        # The POST happens here, not in the generator: a refused request raises before the
        # first event, so the gateway can still fall back to another provider.
        if call.endpoint == "messages":
            return self._stream_native(call, model, request, attempts, retry)
        payload = messages_request(call, model, self.settings.max_tokens_default, stream=True)
        response = self._post(payload, request, attempts, stream=True, retry=retry)
        if response.is_json:  # a whole message where a stream was asked: replay it as one
            return replayed(call, self._answer(call, response.body()), self.name)
        translator = StreamTranslator(call.endpoint, int(self._clock()), self.name,
                                      include_usage=asked_usage(call))
        return ProviderStream(call, relay(response, translator, self.name), translator.meter)

    # --- the Messages front end's calls, as they are ----------------------------------------

    def count_tokens(self, call, model, request, attempts) -> bytes:
        """``POST /v1/messages/count_tokens`` upstream with the client's body: its answer's
        bytes (``{"input_tokens": n}``); UpstreamError / UpstreamClientError as for a call."""
        response = self._post(native_payload(call, model), request, attempts, stream=False,
                              retry=False, url=self._url + "/count_tokens",
                              headers=call.headers)
        answer = parse_json(response.body(), self.name)
        if not isinstance(answer, dict) or type(answer.get("input_tokens")) is not int:
            raise UpstreamError(f"provider {self.name} sent a token count without input_tokens",
                                provider=self.name, kind="protocol")
        return response.body()

    def _send_native(self, call, model, request, attempts, retry) -> Reply:
        """The upstream's message, its bytes relayed; its usage read, OpenAI-shaped."""
        response = self._post(native_payload(call, model), request, attempts, stream=False,
                              retry=retry, headers=call.headers)
        body = response.body()
        message = self._message(body)
        counts = message.get("usage")
        if isinstance(counts, dict) and counts:
            return Reply(body, usage=usage(counts))
        # None sent (Anthropic always does; a compatible server may not): estimated
        return Reply(body, usage=with_total({
            "prompt_tokens": estimated_input_tokens(call.body),
            "completion_tokens": tokens_of_chars(len(body))}), usage_estimated=True)

    def _stream_native(self, call, model, request, attempts, retry):
        response = self._post(native_payload(call, model), request, attempts, stream=True,
                              retry=retry, headers=call.headers)
        meter = UsageMeter()
        if response.is_json:  # a whole message where a stream was asked: its events
            message = self._message(response.body())
            meter.report(usage(message.get("usage")))
            try:
                events = message_events(message)
            except (AttributeError, TypeError, orjson.JSONEncodeError):
                raise UpstreamError(f"provider {self.name} sent a message that cannot be "
                                    "replayed as a stream", provider=self.name,
                                    kind="protocol") from None
            return ProviderStream(call, (event for event in events), meter)
        return ProviderStream(call, native_relay(response, meter, self.name), meter)

    def _message(self, body: bytes) -> dict:
        message = parse_json(body, self.name)
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list) or message.get("type") != "message" or not all(
                isinstance(b, dict) for b in content):
            raise UpstreamError(f"provider {self.name} sent an answer that is not a message",
                                provider=self.name, kind="protocol")
        return message

    def _answer(self, call, body: bytes) -> dict:
        """The OpenAI answer for a whole Messages API message."""
        message = parse_json(body, self.name)
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
            raise UpstreamError(f"provider {self.name} sent an answer that is not a message",
                                provider=self.name, kind="protocol")
        created = int(self._clock())
        try:
            if call.endpoint == "completions":
                return text_completion(message, created)
            return chat_completion(message, created)
        except orjson.JSONEncodeError:  # a tool input nested past what JSON writers take
            raise UpstreamError(f"provider {self.name} sent an answer that cannot be written "
                                "back as JSON", provider=self.name, kind="protocol") from None

    def _post(self, payload: bytes, request, attempts, *, stream, retry, url=None, headers=None):
        """``headers``: the client's protocol headers (native calls), over the defaults and
        under the provider's own ``headers``; never its key: this provider's goes."""
        if headers:
            headers = {**self._headers, **headers, **self.settings.headers,
                       "X-Request-ID": request.id}
        else:
            headers = {**self._headers, "X-Request-ID": request.id}
        response = self.http.post(url or self._url, payload, headers, request, attempts,
                                  stream=stream, retry=retry)
        if not response.ok:
            raise response.failure(translate_error=openai_error,
                                   key_hint=self.key_hint(response.status))
        return response


# --- the Messages front end's bodies --------------------------------------------------------

def native_payload(call, model: str) -> bytes:
    """The client's bytes as they are; re-encoded only when an alias renames the model."""
    if call.raw is not None and call.body.get("model") == model:
        return call.raw
    return orjson.dumps({**call.body, "model": model})


IMAGE_TOKENS = 1600  # an image or a document page: Anthropic's count for about a megapixel


def estimated_input_tokens(body: dict) -> int:
    """The input tokens of a Messages request, estimated where no Anthropic upstream counts
    them: four characters a token over the system prompt, every text of the messages (tool
    inputs as their JSON, tool results' text) and the tool definitions as JSON; 1,600 for each
    image or document. A rule of thumb, within some tens of percent for English text and
    code."""
    chars, media = 0, 0
    parts = [body.get("system"), body.get("messages")]
    while parts:
        part = parts.pop()
        if isinstance(part, str):
            chars += len(part)
        elif isinstance(part, list):
            parts.extend(part)
        elif isinstance(part, dict):
            kind = part.get("type")
            if kind in ("image", "document"):
                media += 1
            elif kind == "tool_use":
                chars += len(part.get("name") or "") + len(orjson.dumps(part.get("input")))
            else:
                parts.extend(part.get(k) for k in ("text", "content", "thinking"))
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        chars += len(orjson.dumps(tools))
    return tokens_of_chars(chars) + media * IMAGE_TOKENS


# --- OpenAI request -> Anthropic request ---------------------------------------------------

def messages_request(call, model: str, max_tokens_default: int, *, stream: bool) -> bytes:
    """The Messages API body for an OpenAI chat or completion call, as JSON bytes.

    Only parameters Anthropic knows are set: OpenAI-only ones (penalties, seed, logit_bias,
    logprobs, response_format...) are dropped rather than refused.
    """
    body = call.body
    if call.endpoint == "completions":
        system, messages = None, [{"role": "user", "content": _prompt(body.get("prompt"))}]
    else:
        system, messages = _conversation(body["messages"])
    if (body.get("n") or 1) != 1:
        raise InvalidRequest("This model answers one choice per request: 'n' must be 1.",
                             param="n", code="unsupported_value")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or max_tokens_default
    request = {"model": model, "max_tokens": max_tokens, "messages": messages}
    if system:
        request["system"] = system
    stop = body.get("stop")
    if stop:
        request["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    request.update(_sampling(body))
    if isinstance(body.get("user"), str) and body["user"]:
        request["metadata"] = {"user_id": body["user"]}
    if call.endpoint == "chat":
        request.update(_tools(body))
    if stream:
        request["stream"] = True
    return orjson.dumps(request)


def _sampling(body: dict) -> dict:
    """temperature, top_p, top_k as the 2023-06-01 API takes them."""
    sampling = {}
    if body.get("temperature") is not None:
        # OpenAI allows 0..2, Anthropic 0..1: clamp rather than have the provider refuse.
        sampling["temperature"] = min(max(body["temperature"], 0), 1)
    elif body.get("top_p") is not None:
        sampling["top_p"] = body["top_p"]  # recent models refuse top_p beside temperature
    if body.get("top_k") is not None:  # no OpenAI field, but clients send it as an extra
        sampling["top_k"] = body["top_k"]
    return sampling


def _prompt(prompt) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequest("This model takes one text prompt: 'prompt' must be a string.",
                             param="prompt", code="unsupported_value")
    return prompt


def _conversation(messages: list) -> tuple[str | list | None, list]:
    """(system, Anthropic turns): system messages hoisted (one text, or text blocks when one
    carries cache_control), same-role turns merged."""
    system, turns = [], []
    for i, message in enumerate(messages):
        role, content = message["role"], message.get("content")
        if role in ("system", "developer"):
            system.append(_cache_marked(_text_blocks(content, f"messages[{i}].content"), message))
            continue
        if role == "user":
            blocks = _content_blocks(content, f"messages[{i}].content")
        elif role == "assistant":
            blocks = _content_blocks(content, f"messages[{i}].content")
            blocks += [_tool_use(c, f"messages[{i}].tool_calls[{j}]")
                       for j, c in enumerate(message.get("tool_calls") or [])]
        elif role == "tool":
            role, blocks = "user", [_tool_result(message, i)]
        else:
            raise InvalidRequest(f"Unsupported role {role!r} in 'messages[{i}]'.",
                                 param=f"messages[{i}].role", code="invalid_value")
        _cache_marked(blocks, message)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)  # Anthropic wants the roles to alternate
        else:
            turns.append({"role": role, "content": blocks})
    turns = [_compact(turn) for turn in turns if turn["content"]]
    if any("cache_control" in block for blocks in system for block in blocks):
        return [block for blocks in system for block in blocks], turns  # prompt caching
    texts = ("\n".join(block["text"] for block in blocks) for blocks in system)
    return "\n\n".join(t for t in texts if t) or None, turns


def _cache_marked(blocks: list, message: dict) -> list:
    """The ``cache_control`` of a message or content part (Anthropic prompt caching, as
    LiteLLM takes it in OpenAI's shape) on its last block; ``blocks`` returned."""
    if blocks and isinstance(message.get("cache_control"), dict):
        blocks[-1]["cache_control"] = message["cache_control"]
    return blocks


def _compact(turn: dict) -> dict:
    """Tool results first (Anthropic requires it); a lone text block as a plain string."""
    blocks = turn["content"]
    if turn["role"] == "user":
        blocks.sort(key=lambda b: b["type"] != "tool_result")  # stable: order kept otherwise
    if len(blocks) == 1 and blocks[0]["type"] == "text" and "cache_control" not in blocks[0]:
        return {"role": turn["role"], "content": blocks[0]["text"]}
    return turn


def _text_blocks(content, param: str) -> list:
    """A system message's text blocks (their cache_control kept)."""
    blocks = _content_blocks(content, param)
    if any(block["type"] != "text" for block in blocks):
        raise InvalidRequest(f"'{param}' may hold text only.", param=param, code="invalid_value")
    return blocks


def _content_blocks(content, param: str) -> list:
    """OpenAI content (a string or parts) as Anthropic blocks; empty text is left out."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise InvalidRequest(f"Invalid type for '{param}': expected a string or an array.",
                             param=param, code="invalid_type")
    blocks = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "refusal") and isinstance(part.get(kind), str):
            if part[kind]:
                blocks += _cache_marked([{"type": "text", "text": part[kind]}], part)
        elif kind == "image_url":
            blocks += _cache_marked([_image(part.get("image_url"), f"{param}[{j}].image_url")],
                                    part)
        else:
            raise InvalidRequest(f"Unsupported content part {kind!r} in '{param}[{j}]'.",
                                 param=f"{param}[{j}]", code="invalid_value")
    return blocks


def _image(image_url, param: str) -> dict:
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if isinstance(url, str) and url.startswith("data:"):
        header, _, data = url[len("data:"):].partition(",")
        media_type, _, encoding = header.partition(";")
        if encoding == "base64" and data:
            return {"type": "image",
                    "source": {"type": "base64", "media_type": media_type, "data": data}}
    elif isinstance(url, str) and url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise InvalidRequest(f"'{param}' must be an http(s) URL or a base64 data: URL.",
                         param=param, code="invalid_value")


def _tool_use(tool_call, param: str) -> dict:
    function = (tool_call.get("function") if isinstance(tool_call, dict) else None) or {}
    arguments = function.get("arguments") or "{}"
    try:
        arguments = orjson.loads(arguments)
    except (orjson.JSONDecodeError, TypeError):
        arguments = None
    if not isinstance(arguments, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequest(f"'{param}' needs a function name and arguments as a JSON object.",
                             param=param, code="invalid_value")
    if nesting_depth(arguments) > MAX_DEPTH:  # parse_body saw a string; the request nests it
        raise too_deep(f"'{param}.function.arguments'", param=param)
    return {"type": "tool_use", "id": tool_call.get("id") or "", "name": function["name"],
            "input": arguments}


def _tool_result(message: dict, i: int) -> dict:
    result = {"type": "tool_result", "tool_use_id": message.get("tool_call_id") or ""}
    content = message.get("content")
    if isinstance(content, str):
        if content:
            result["content"] = content
    elif content:
        result["content"] = _content_blocks(content, f"messages[{i}].content")
    return result


def _tools(body: dict) -> dict:
    """``tools`` and ``tool_choice`` for the request; nothing when the client sent no tools."""
    tools = []
    for i, tool in enumerate(body.get("tools") or []):
        tool = tool if isinstance(tool, dict) else {}
        function = tool.get("function") if tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"Unsupported tool in 'tools[{i}]': only named functions are.",
                                 param=f"tools[{i}]", code="invalid_value")
        entry = {"name": function.get("name"),
                 "input_schema": function.get("parameters") or {"type": "object", "properties": {}}}
        if function.get("description"):
            entry["description"] = function["description"]
        if isinstance(tool.get("cache_control"), dict):  # prompt caching, as LiteLLM takes it
            entry["cache_control"] = tool["cache_control"]
        tools.append(entry)
    if not tools:
        return {}
    choice = body.get("tool_choice") or "auto"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if not isinstance(name, str):
            raise InvalidRequest("'tool_choice' must name a function.", param="tool_choice",
                                 code="invalid_value")
        tool_choice = {"type": "tool", "name": name}
    elif choice in TOOL_CHOICES:
        tool_choice = {"type": TOOL_CHOICES[choice]}
    else:
        raise InvalidRequest(f"Unsupported 'tool_choice' {choice!r}.", param="tool_choice",
                             code="invalid_value")
    if body.get("parallel_tool_calls") is False and tool_choice["type"] != "none":
        tool_choice["disable_parallel_tool_use"] = True
    return {"tools": tools, "tool_choice": tool_choice}


# --- Anthropic answer -> OpenAI answer -----------------------------------------------------

def chat_completion(message: dict, created: int) -> dict:
    """A ``chat.completion`` from an Anthropic message."""
    text, tool_calls = "", []
    for block in message["content"]:
        if block.get("type") == "text":
            text += block.get("text") or ""
        elif block.get("type") == "tool_use":
            tool_calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name"),
                "arguments": orjson.dumps(block.get("input") or {}).decode()}})
        # thinking and server-tool blocks have no OpenAI counterpart: left out
    reply = {"role": "assistant", "content": text or (None if tool_calls else ""),
             "refusal": None}
    if tool_calls:
        reply["tool_calls"] = tool_calls
    return {"id": message.get("id"), "object": "chat.completion", "created": created,
            "model": message.get("model"), "choices": [{
                "index": 0, "message": reply, "logprobs": None,
                "finish_reason": finish_reason(message.get("stop_reason"))}],
            "usage": usage(message.get("usage"))}


def text_completion(message: dict, created: int) -> dict:
    """A legacy ``text_completion`` from an Anthropic message."""
    text = "".join(b.get("text") or "" for b in message["content"] if b.get("type") == "text")
    return {"id": message.get("id"), "object": "text_completion", "created": created,
            "model": message.get("model"), "choices": [{
                "index": 0, "text": text, "logprobs": None,
                "finish_reason": finish_reason(message.get("stop_reason"))}],
            "usage": usage(message.get("usage"))}


def openai_error(data: dict) -> dict:
    """Anthropic's ``{"type": "error", "error": {...}}`` as OpenAI's ``{"error": {...}}``."""
    error = data.get("error")
    if not isinstance(error, dict):
        return data
    return {"error": {"message": error.get("message"), "type": error.get("type"),
                      "param": None, "code": None}}
