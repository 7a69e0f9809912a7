"""What the proxy's spans say: the attributes of the HTTP and GenAI semantic conventions, and
the proxy's own (``llm_proxy.*``), read from the request, what serving it found, and the
provider's answers in each protocol the proxy speaks. Never a prompt, an answer or a key.

A value a client or an upstream chose (a user agent, a path, a model) is cut here to
``ATTRIBUTE_LIMIT`` characters, before the SDK, which would log a warning for each value it
cuts itself. No OpenTelemetry import: these are plain dicts and strings.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import orjson

from app.errors import ProxyError, UpstreamClientError, UpstreamError
from app.sse import event_field

ATTRIBUTE_LIMIT = 1024
MAX_FINISH_REASONS = 32  # one per choice: an answer asked for n choices could list many
ANSWER_PARSE_LIMIT = 256 * 1024  # bytes of a whole answer read for its model and finish reasons

HTTP_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                          "PATCH"))
# gen_ai.operation.name of each Call.endpoint: the front ends' calls are chats too.
OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings",
              "messages": "chat", "responses": "chat"}
# gen_ai.provider.name of each provider type: the wire protocol, which is what the proxy knows
# (an OpenAI-compatible server is "openai"; server.address tells which one it is).
GENAI_PROVIDERS = {"openai": "openai", "azure_openai": "azure.ai.openai",
                   "anthropic": "anthropic", "mock": "llm_proxy.mock"}
# The request's sampling parameters worth a look beside its answer (no content is ever kept).
REQUEST_PARAMETERS = (("max_tokens", "gen_ai.request.max_tokens"),
                      ("max_output_tokens", "gen_ai.request.max_tokens"),
                      ("temperature", "gen_ai.request.temperature"),
                      ("top_p", "gen_ai.request.top_p"))


def cut(text: str) -> str:
    """``text``, at most ``ATTRIBUTE_LIMIT`` characters of it."""
    return text if len(text) <= ATTRIBUTE_LIMIT else text[:ATTRIBUTE_LIMIT]


# --- the request's span (SERVER) ----------------------------------------------------------------

def server_name(request) -> tuple[str, str, str]:
    """(span name, http.request.method, http.route) of an HTTP request (Flask's): "{method}
    {route}", the method "_OTHER" (and the name "HTTP") when it is none HTTP defines."""
    method = request.method if request.method in HTTP_METHODS else "_OTHER"
    rule = request.url_rule
    route = rule.rule if rule is not None else ""
    name = "HTTP" if method == "_OTHER" else method
    return (f"{name} {route}" if route else name), method, route


def server_attributes(request, method: str, route: str, request_id: str) -> dict:
    """The HTTP server conventions' attributes known when ``request`` begins."""
    attributes = {"http.request.method": method, "url.path": cut(request.path),
                  "url.scheme": request.scheme, "llm_proxy.request_id": request_id}
    if method == "_OTHER":
        attributes["http.request.method_original"] = cut(request.method)
    if route:
        attributes["http.route"] = route
    try:
        host = urlsplit("//" + request.host)
        if host.hostname:
            attributes["server.address"] = cut(host.hostname)
            attributes["server.port"] = host.port or (443 if request.scheme == "https" else 80)
    except ValueError:  # a Host header that is no host: left out
        pass
    client = request.remote_addr
    if client:
        attributes["client.address"] = client
    agent = request.headers.get("User-Agent")
    if agent:
        attributes["user_agent.original"] = cut(agent)
    return attributes


def request_attributes(request, trace, status: int) -> dict:
    """What serving the request found (``trace``: app.pipeline.Trace), once it ended: the key's
    id, never the key."""
    attributes = {"http.response.status_code": status}
    if trace.model:
        attributes["llm_proxy.model"] = cut(trace.model)
    if trace.provider:
        attributes["llm_proxy.provider"] = trace.provider
    if trace.cache:
        attributes["llm_proxy.cache"] = trace.cache
    if trace.coalesced:
        attributes["llm_proxy.coalesced"] = True
    if trace.condensed:
        attributes["llm_proxy.condensed"] = trace.condensed
    if trace.upstream.count:
        attributes["llm_proxy.attempts"] = trace.upstream.count
    if trace.cost is not None:
        attributes["llm_proxy.cost_usd"] = trace.cost.usd
    if trace.error_code:
        attributes["llm_proxy.error_code"] = trace.error_code
    if request.tenant is not None:
        attributes["llm_proxy.key_id"] = request.tenant.id
    return attributes


# --- an upstream attempt's span (CLIENT) --------------------------------------------------------

def attempt_attributes(adapter, model: str, call, server: dict) -> dict:
    """The GenAI conventions' attributes of an attempt to ask ``adapter`` for ``model`` (already
    cut); ``server``: its upstream's ``upstream_server``."""
    attributes = {"gen_ai.operation.name": OPERATIONS.get(call.endpoint, call.endpoint),
                  "gen_ai.provider.name": GENAI_PROVIDERS.get(adapter.settings.type,
                                                              adapter.settings.type),
                  "gen_ai.request.model": model, "llm_proxy.provider": adapter.name, **server}
    if call.stream:
        attributes["gen_ai.request.stream"] = True
    for field, name in REQUEST_PARAMETERS:
        value = call.body.get(field)
        if type(value) in (int, float):
            attributes[name] = value
    return attributes


def upstream_server(base_url: str) -> dict:
    """server.address and server.port of a provider's ``base_url`` (none for the mock's)."""
    try:
        url = urlsplit(base_url)
        if url.hostname:
            return {"server.address": url.hostname,
                    "server.port": url.port or (443 if url.scheme == "https" else 80)}
    except ValueError:
        pass
    return {}


def answer_attributes(usage, estimated: bool, documents) -> dict:
    """An answer's attributes: its tokens (``usage``, OpenAI-shaped; ``estimated`` when the
    proxy estimated them), the response model and finish reasons its ``documents`` (JSON
    bodies or SSE events) name."""
    attributes = {}
    if isinstance(usage, dict):
        for field, name in (("prompt_tokens", "gen_ai.usage.input_tokens"),
                            ("completion_tokens", "gen_ai.usage.output_tokens")):
            value = usage.get(field)
            if type(value) is int:
                attributes[name] = value
        if estimated:
            attributes["llm_proxy.usage_estimated"] = True
    model, reasons = answer_facts(documents)
    if model:
        attributes["gen_ai.response.model"] = cut(model)
    if reasons:
        attributes["gen_ai.response.finish_reasons"] = tuple(
            cut(reason) for reason in reasons[:MAX_FINISH_REASONS])
    return attributes


def answer_facts(documents) -> tuple[str, tuple[str, ...]]:
    """(response model, finish reasons) from an answer's JSON bodies or SSE events (bytes) in
    any protocol the proxy speaks: OpenAI chat and completions (``model``, each choice's
    ``finish_reason``), Anthropic Messages (``model``, ``stop_reason``; in a stream
    ``message_start`` and ``message_delta``) and OpenAI Responses (the response's ``model``,
    ``status`` or its incomplete reason). What is not JSON, or not of these shapes, is
    skipped."""
    model, reasons = "", []
    for document in documents:
        if not document:
            continue
        data = event_field(document, b"data") if document[:1] in (b"d", b"e") else document
        try:
            answer = orjson.loads(data) if data else None
        except orjson.JSONDecodeError:
            continue
        if not isinstance(answer, dict):
            continue
        inner = answer  # the answer itself, or the one an event carries:
        if answer.get("type") == "message_start":  # Anthropic's, in its first event
            inner = answer.get("message")
        elif isinstance(answer.get("response"), dict):  # a Responses event's
            inner = answer["response"]
        if not isinstance(inner, dict):
            continue
        if isinstance(inner.get("model"), str):
            model = inner["model"]
        for choice in inner.get("choices") if isinstance(inner.get("choices"), list) else ():
            if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
                reasons.append(choice["finish_reason"])
        delta = answer.get("delta")
        stop = delta.get("stop_reason") if isinstance(delta, dict) else inner.get("stop_reason")
        if isinstance(stop, str):
            reasons.append(stop)
        if inner.get("object") == "response" and inner.get("status") in (
                "completed", "incomplete", "failed"):
            details = inner.get("incomplete_details")
            reason = details.get("reason") if isinstance(details, dict) else None
            reasons.append(reason if isinstance(reason, str) else inner["status"])
    return model, tuple(reasons)


def error_type(error: BaseException) -> str:
    """error.type of an exception: the upstream's status, else how it failed (timeout,
    connect, protocol...), else the proxy's error code or the exception's class."""
    if isinstance(error, UpstreamError):
        return str(error.upstream_status) if error.upstream_status else error.kind
    if isinstance(error, UpstreamClientError):
        return str(error.status)
    if isinstance(error, ProxyError):
        return error.code
    return type(error).__qualname__
