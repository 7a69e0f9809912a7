"""The OpenAI Responses front end (``POST /v1/responses``, what Codex and
``client.responses.create`` speak) for providers that speak only Chat Completions.

It serves the stateless subset: the whole conversation in ``input`` (``store: false``, as
Codex sends it). Input items become chat messages, ``function`` and ``custom`` tools become
chat tools (a custom tool, such as Codex's apply_patch with its grammar, a function taking one
string, its calls mapped back to ``custom_tool_call``), and the chat answer, whole or streamed,
becomes a Response with its event stream. Hosted tools a chat provider cannot run
(``web_search``, ``tool_search``, ``namespace``...) are dropped and reported; what needs the
upstream to keep state (``previous_response_id``, ``store: true``) is refused with a 400.
A provider that speaks Responses natively gets the call as it is
(app/providers/openai_responses.py), never through here. The answer's writing is
app/protocols/responses_answer.py.
"""

from __future__ import annotations

import logging

import orjson

from app.errors import InvalidRequest, ProxyError, UpstreamError
from app.protocols import FrontEnd, TranslatedStream
from app.protocols.responses_answer import (CUSTOM_INPUT, EventWriter,
                                            custom_names, failed_event, finished, output_items,
                                            response_object, translated_events)
from app.providers.base import Call, Reply

log = logging.getLogger("llm_proxy.responses")

# The request's known fields and their JSON types; unknown ones pass untouched (to a native
# provider) or are left out (translated).
FIELDS = {
    "model": (str,), "input": (str, list), "instructions": (str,), "stream": (bool,),
    "store": (bool,), "background": (bool,), "tools": (list,), "tool_choice": (str, dict),
    "parallel_tool_calls": (bool,), "max_output_tokens": (int,), "max_tool_calls": (int,),
    "temperature": (int, float), "top_p": (int, float), "top_logprobs": (int,),
    "reasoning": (dict,), "text": (dict,), "previous_response_id": (str,),
    "conversation": (str, dict), "metadata": (dict,), "include": (list,), "user": (str,),
    "prompt": (dict,), "prompt_cache_key": (str,), "safety_identifier": (str,),
    "service_tier": (str,), "truncation": (str,), "stream_options": (dict,),
}
# What only an upstream that keeps responses can serve: refused when translated.
STATEFUL = ("previous_response_id", "conversation", "prompt")
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = ("input_text", "output_text")


def validate_request(body: dict) -> dict:
    """The Responses body's known fields type-checked, ``model`` present; the body."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("Missing required parameter: 'model'.", param="model",
                             code="missing_required_parameter")
    for name, value in body.items():
        kinds = FIELDS.get(name)
        if kinds is None or value is None:
            continue
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise InvalidRequest(f"Invalid type for '{name}': expected {_kinds(kinds)}.",
                                 param=name, code="invalid_type")
    for name in ("input", "tools"):
        for i, item in enumerate(body.get(name) if isinstance(body.get(name), list) else ()):
            if not isinstance(item, dict):
                raise InvalidRequest(f"Invalid type for '{name}[{i}]': expected an object.",
                                     param=f"{name}[{i}]", code="invalid_type")
    return body


def dropped_tools(body: dict) -> list[str]:
    """The tools of ``body`` a chat provider cannot run, as reported: their type
    (``namespace:NAME`` for a namespace of tools)."""
    dropped = []
    for tool in body.get("tools") or ():
        kind = tool.get("type")
        if kind not in ("function", "custom"):
            dropped.append(f"namespace:{tool.get('name')}" if kind == "namespace" else str(kind))
    return dropped


class ResponsesFrontEnd(FrontEnd):
    endpoint = "responses"

    def to_chat(self, call):
        body = call.body
        _refuse_state(body)
        messages, skipped = _messages(body)
        if not messages:
            raise InvalidRequest("'input' must hold at least one message.", param="input",
                                 code="invalid_value")
        chat = {"model": body["model"], "messages": messages}
        tools = [_chat_tool(tool, i) for i, tool in enumerate(body.get("tools") or ())
                 if tool.get("type") in ("function", "custom")]
        dropped = dropped_tools(body)
        if dropped or skipped:
            log.info("responses for %s: left out what a chat provider cannot serve: tools %s; "
                     "input items %s", body["model"], ", ".join(dropped) or "none",
                     ", ".join(sorted(set(skipped))) or "none")
        if tools:
            chat["tools"] = tools
            choice = _tool_choice(body.get("tool_choice"), {t["function"]["name"] for t in tools})
            if choice is not None:
                chat["tool_choice"] = choice
            if isinstance(body.get("parallel_tool_calls"), bool):
                chat["parallel_tool_calls"] = body["parallel_tool_calls"]
        _sampling(body, chat)
        if call.stream:
            chat["stream"] = True
        return Call("chat", chat, None, call.stream)

    def reply_from_chat(self, call, reply):
        try:
            answer = orjson.loads(reply.body)
            choice = answer["choices"][0]
            message = choice.get("message") or {}
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
            raise UpstreamError("the provider sent a chat answer without a choice",
                                kind="protocol") from None
        items = output_items(message, custom_names(call.body))
        response = finished(response_object(call, "completed"), choice.get("finish_reason"),
                            items, reply.usage)
        return Reply(orjson.dumps(response), status=reply.status, usage=reply.usage,
                     usage_estimated=reply.usage_estimated)

    def stream_from_chat(self, call, stream):
        writer = EventWriter(call, custom_names(call.body))
        return TranslatedStream(translated_events(writer, stream), stream)

    def error_event(self, error: ProxyError) -> bytes:
        return failed_event(error)


# --- the request ---------------------------------------------------------------------------

def _refuse_state(body: dict) -> None:
    """A 400 for what needs the upstream to keep responses, which a chat provider does not."""
    for name in STATEFUL:
        if body.get(name) is not None:
            raise _stateful(name, body["model"])
    for name in ("store", "background"):
        if body.get(name) is True:
            raise _stateful(name, body["model"])


def _stateful(name: str, model: str) -> InvalidRequest:
    return InvalidRequest(
        f"'{name}' needs a provider that keeps responses, and the provider of {model!r} speaks "
        "Chat Completions, through which this proxy serves only stateless responses: send the "
        "whole conversation in 'input' with 'store': false (as Codex does).", param=name,
        code="unsupported_parameter")


def _messages(body: dict) -> tuple[list, list]:
    """(chat messages, the types of input items left out) for the instructions and input."""
    messages, skipped, images = [], [], []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
        return messages, skipped
    for i, item in enumerate(items or ()):
        kind = item.get("type", "message")  # an "easy" input message has no type
        if kind in ("function_call_output", "custom_tool_call_output"):
            messages.append(_tool_result(item, f"input[{i}]", images))
            continue
        if images:  # what the tools returned as images follows their results
            messages.append({"role": "user", "content": images})
            images = []
        if kind == "message":
            messages.append(_message(item, f"input[{i}]"))
        elif kind in ("function_call", "custom_tool_call"):
            _tool_call(messages, item, f"input[{i}]")
        elif kind == "item_reference":
            raise _stateful("item_reference", body["model"])
        elif kind != "reasoning":  # reasoning is the model's own, opaque to another one
            skipped.append(str(kind))
    if images:
        messages.append({"role": "user", "content": images})
    return messages, skipped


def _message(item: dict, param: str) -> dict:
    role = ROLES.get(item.get("role"))
    if role is None:
        raise InvalidRequest(f"Invalid '{param}.role': expected one of user, assistant, system, "
                             "developer.", param=f"{param}.role", code="invalid_value")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise InvalidRequest(f"Invalid type for '{param}.content': expected a string or an "
                             "array.", param=f"{param}.content", code="invalid_type")
    parts = [_part(part, f"{param}.content[{j}]") for j, part in enumerate(content)]
    if role == "user" and (len(parts) > 1 or any(part["type"] != "text" for part in parts)):
        return {"role": role, "content": parts}
    if any(part["type"] != "text" for part in parts):
        raise InvalidRequest(f"'{param}.content' of a {item['role']} message may hold text only.",
                             param=f"{param}.content", code="invalid_value")
    joint = "" if role == "assistant" else "\n\n"
    return {"role": role, "content": joint.join(part["text"] for part in parts)}


def _part(part, param: str) -> dict:
    """An input or output content part as a chat content part."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in TEXT_PARTS or kind == "refusal":
        text = part.get("text" if kind != "refusal" else "refusal")
        if isinstance(text, str):
            return {"type": "text", "text": text}
    elif kind == "input_image":
        url = part.get("image_url")
        if isinstance(url, str) and url:
            return {"type": "image_url",
                    "image_url": {"url": url, "detail": part.get("detail") or "auto"}}
        raise InvalidRequest(f"'{param}' names an uploaded file; a chat provider takes images "
                             "by URL or data URL only.", param=param, code="unsupported_value")
    raise InvalidRequest(f"Unsupported content part {kind!r} in '{param}'.", param=param,
                         code="invalid_value")


def _tool_call(messages: list, item: dict, param: str) -> None:
    """A function or custom tool call the model made, on the assistant turn it belongs to."""
    call_id, name = _string(item, "call_id", param), _string(item, "name", param)
    if item["type"] == "function_call":
        arguments = _string(item, "arguments", param)
    else:
        arguments = orjson.dumps({CUSTOM_INPUT: _string(item, "input", param)}).decode()
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _tool_result(item: dict, param: str, images: list) -> dict:
    """A tool's output as a chat tool message; images it returned are added to ``images``, to
    follow the results as a user message (a tool message holds text only)."""
    call_id, output = _string(item, "call_id", param), item.get("output")
    if isinstance(output, list):
        texts = []
        for j, part in enumerate(output):
            converted = _part(part, f"{param}.output[{j}]")
            if converted["type"] == "text":
                texts.append(converted["text"])
            else:
                images.append(converted)
        output = "\n".join(texts) or "(the tool returned an image; it follows)"
    if not isinstance(output, str):
        raise InvalidRequest(f"Invalid type for '{param}.output': expected a string or an array.",
                             param=f"{param}.output", code="invalid_type")
    return {"role": "tool", "tool_call_id": call_id, "content": output}


def _chat_tool(tool: dict, i: int) -> dict:
    """A function tool as a chat tool; a custom tool as a function taking one string."""
    name = _string(tool, "name", f"tools[{i}]")
    description = tool.get("description") if isinstance(tool.get("description"), str) else ""
    if tool["type"] == "function":
        function = {"name": name, "parameters": tool.get("parameters")
                    or {"type": "object", "properties": {}}}
        if description:
            function["description"] = description
        if tool.get("strict") is True:
            function["strict"] = True
        return {"type": "function", "function": function}
    text = (description + "\n\n" if description else "") + (
        f"Through this proxy it is called as a function: put the tool's whole input, as it "
        f"is, in its one string argument '{CUSTOM_INPUT}'.")
    form = tool.get("format") if isinstance(tool.get("format"), dict) else {}
    if form.get("type") == "grammar" and isinstance(form.get("definition"), str):
        text += (f" The input must follow this {form.get('syntax') or ''} grammar:\n"
                 f"{form['definition']}")
    return {"type": "function", "function": {
        "name": name, "description": text,
        "parameters": {"type": "object", "properties": {CUSTOM_INPUT: {"type": "string"}},
                       "required": [CUSTOM_INPUT], "additionalProperties": False}}}


def _tool_choice(choice, offered: set):
    """The chat tool_choice for the Responses one; None to leave it out (the default)."""
    if choice in ("auto", "none", "required"):
        return choice
    if not isinstance(choice, dict):
        return None
    kind = choice.get("type")
    if kind in ("function", "custom") and choice.get("name") in offered:
        return {"type": "function", "function": {"name": choice["name"]}}
    if kind == "allowed_tools" and choice.get("mode") in ("auto", "required"):
        return choice["mode"]  # the offer is not narrowed: chat providers seldom can
    return None  # a hosted tool's choice: the tool is left out


def _sampling(body: dict, chat: dict) -> None:
    """max_output_tokens, temperature, top_p, reasoning effort, the text format, the user."""
    if isinstance(body.get("max_output_tokens"), int):
        chat["max_completion_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "user"):
        if body.get(name) is not None:
            chat[name] = body[name]
    effort = _get(body.get("reasoning"), "effort")
    if isinstance(effort, str):
        chat["reasoning_effort"] = effort
    form = _get(body.get("text"), "format")
    kind = _get(form, "type")
    if kind == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            key: form[key] for key in ("name", "schema", "strict", "description") if key in form}}
    elif kind == "json_object":
        chat["response_format"] = {"type": "json_object"}


def _string(item: dict, name: str, param: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise InvalidRequest(f"Missing or invalid '{param}.{name}': expected a string.",
                             param=f"{param}.{name}", code="invalid_type")
    return value


def _kinds(kinds) -> str:
    names = {str: "a string", list: "an array", dict: "an object", bool: "a boolean",
             int: "an integer", float: "a number"}
    return " or ".join(dict.fromkeys(names[k] for k in kinds if not (k is int and float in kinds)))


def _get(mapping, key):
    return mapping.get(key) if isinstance(mapping, dict) else None
