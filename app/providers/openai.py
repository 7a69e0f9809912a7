"""Adapter for OpenAI and every OpenAI-compatible upstream (OpenRouter, Groq, vLLM, Ollama...)."""

from __future__ import annotations

from urllib.parse import quote

import orjson

from app.errors import NotFound, UpstreamClientError, UpstreamError
from app.providers import openai_responses as native
from app.providers.base import (ENDPOINTS, ProviderAdapter, ProviderStream, Reply, UsageMeter,
                                 asked_usage, completion_chars, estimated_usage, listed_models,
                                 parse_json, replayed, tokens_of_chars, with_total)
from app.sse import DONE, KEEPALIVE, event_field
from app.upstream import PROVIDER_4XX

PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings",
         "responses": "/responses"}
TEXT_ENDPOINTS = ("chat", "completions")  # the ones whose streams take stream_options


class OpenAIAdapter(ProviderAdapter):
    """Forwards the client's body as is (only the model name, and a stream's ``stream_options``
    may change) and relays the answer. With ``responses`` on (OpenAI itself and Azure by
    default) it serves the Responses API natively too (app/providers/openai_responses.py)."""

    lists_models = True

    def __init__(self, settings, http):
        super().__init__(settings, http)
        base = settings.base_url.rstrip("/")
        self._urls = {endpoint: base + path for endpoint, path in PATHS.items()}
        self._models_url = base + "/models"
        self._headers = {"Content-Type": "application/json", **self.auth_headers(),
                         **settings.headers}
        # The responses its upstream keeps, made through this proxy (None: it speaks no
        # Responses, and /v1/responses reaches it translated to chat).
        self.stored_responses = None
        if settings.speaks_responses:
            self.endpoints = (*ENDPOINTS, "responses")
            self.stored_responses = native.StoredResponses()

    def auth_headers(self) -> dict:
        key = self.settings.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def url(self, endpoint: str, model: str) -> str:
        return self._urls[endpoint]

    def list_models(self, timeout: float) -> dict[str, int] | None:
        """``GET {base_url}/models``, which every OpenAI-compatible server answers."""
        headers = {**self.auth_headers(), **self.settings.headers}
        return listed_models(self._get_model_list(self._models_url, headers, timeout))

    def payload(self, call, model: str) -> bytes:
        """The client's bytes when nothing changes; re-serialised for an alias, and for a
        stream whose client did not ask for usage: the upstream is always asked
        (``stream_options.include_usage``), so that every stream's tokens are charged, unless
        the provider's ``stream_usage`` is off (an upstream that refuses ``stream_options``)."""
        ask_usage = (call.stream and call.endpoint in TEXT_ENDPOINTS and not asked_usage(call)
                     and self.settings.stream_usage)
        if call.raw is not None and call.body.get("model") == model:
            if not ask_usage:
                return call.raw
            raw = call.raw.rstrip()
            if "stream_options" not in call.body and raw.endswith(b"}"):
                # One member added at the end of the client's object: no duplicate key made,
                # nothing else re-written (nor any risk of orjson refusing to write it).
                return raw[:-1] + b',"stream_options":{"include_usage":true}}'
        body = {**call.body, "model": model}
        if ask_usage:
            options = call.body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                      "include_usage": True}
        return orjson.dumps(body)

    def send(self, call, model, request, attempts, *, retry=True) -> Reply:
        body = self._post(call, model, request, attempts, stream=False, retry=retry).body()
        answer = parse_json(body, self.name)  # a 200 with a broken body is the provider's failure
        if call.endpoint == "responses":
            return self._response_reply(call, request, body, answer)
        usage = answer.get("usage") if isinstance(answer, dict) else None
        if isinstance(usage, dict) and usage:
            return Reply(body, usage=with_total(usage))
        if call.endpoint not in TEXT_ENDPOINTS or not isinstance(answer, dict):
            return Reply(body)
        # No usage (some compatible servers leave it out): estimated, so the tokens are charged.
        usage = estimated_usage(call, completion_chars(answer.get("choices")))
        return Reply(body, usage=usage, usage_estimated=True)

    def stream(self, call, model, request, attempts, *, retry=True):
        response = self._post(call, model, request, attempts, stream=True, retry=retry)
        if call.endpoint == "responses":
            return self._response_stream(call, request, response)
        if response.is_json:  # a whole answer where a stream was asked: replay it as one
            return replayed(call, parse_json(response.body(), self.name), self.name)
        meter = UsageMeter()
        return ProviderStream(call, self._relay(response, meter, asked_usage(call)), meter)

    def stored_response(self, response_id: str, request, attempts, *, cancel=False,
                        query: str = "") -> Reply:
        """``GET /responses/{id}`` (``cancel``: ``POST .../cancel``) of a response this
        provider's upstream keeps, its answer as it is; UpstreamError when it failed."""
        url = f"{self.url('responses', '')}/{quote(response_id, safe='')}"
        headers = {**self._headers, "X-Request-ID": request.id}
        if cancel:
            answer = self.http.post(url + "/cancel", b"", headers, request, attempts, retry=False)
            status, body = answer.status, answer.body()
        else:
            status, body = self.http.get(url + (f"?{query}" if query else ""), headers,
                                         timeout=self.http.read_timeout)
            attempts.record()
        if 200 <= status < 300:
            return Reply(body, status=status)
        if status == 404:
            raise NotFound(f"The response {response_id!r} is gone from provider {self.name}.",
                           param="response_id")
        if 400 <= status < 500 and status not in PROVIDER_4XX:
            raise UpstreamClientError(f"provider {self.name} refused it (HTTP {status})",
                                      status=status, body=body, provider=self.name)
        raise UpstreamError(f"provider {self.name} answered HTTP {status}{self.key_hint(status)}",
                            provider=self.name, upstream_status=status, kind="status")

    def _response_reply(self, call, request, body: bytes, answer) -> Reply:
        """A whole Responses answer as the upstream sent it; its usage chat-shaped, its id
        remembered when the upstream keeps it."""
        if not isinstance(answer, dict) or answer.get("object") != "response":
            raise UpstreamError(f"provider {self.name} sent JSON that is not a response",
                                provider=self.name, kind="protocol")
        if native.kept_upstream(call.body):
            self.stored_responses.add(answer.get("id"), request.tenant.id)
        usage = native.chat_usage(answer.get("usage"))
        if usage:
            return Reply(body, usage=usage)
        chars = sum(len(part.get("text") or "") for item in answer.get("output") or ()
                    if isinstance(item, dict) for part in item.get("content") or ()
                    if isinstance(part, dict))
        prompt, completion = native.prompt_tokens(call), tokens_of_chars(chars)
        return Reply(body, usage={"prompt_tokens": prompt, "completion_tokens": completion,
                                  "total_tokens": prompt + completion}, usage_estimated=True)

    def _response_stream(self, call, request, response):
        """The upstream's Responses events relayed unchanged, usage read on the way."""
        if response.is_json:
            response.close()
            raise UpstreamError(f"provider {self.name} sent JSON where a Responses stream was "
                                "asked", provider=self.name, kind="protocol")
        meter = UsageMeter()
        # What is known before the answer: the prompt's estimate, should no usage come.
        meter.report({"prompt_tokens": native.prompt_tokens(call)}, final=False)
        keep = native.kept_upstream(call.body)
        tenant = request.tenant.id

        def created(answer):
            if keep:
                self.stored_responses.add(answer.get("id"), tenant)
        return ProviderStream(call, native.relay(response, meter, self.name, created), meter)

    def _post(self, call, model, request, attempts, *, stream, retry):
        headers = {**self._headers, "X-Request-ID": request.id}
        if call.endpoint == "responses":
            headers.update(call.headers)  # OpenAI-Beta, as the client sent it
        response = self.http.post(self.url(call.endpoint, model), self.payload(call, model),
                                  headers, request, attempts, stream=stream,
                                  retry=retry)
        if not response.ok:
            raise response.failure(key_hint=self.key_hint(response.status))
        return response

    def _relay(self, response, meter, usage_chunk: bool):
        """The upstream's SSE events re-emitted one by one until ``[DONE]``; what they tell of
        the answer's tokens noted in ``meter``. The usage-only chunk reaches the client only
        when it asked for it (``usage_chunk``): the proxy asks the upstream for it anyway."""
        finished = started = False
        try:
            for event in response.events():
                data = event_field(event, b"data") if event is not KEEPALIVE else None
                if data is None:
                    yield KEEPALIVE  # comments, keep-alives, quiet: the gateway decides
                    continue
                if data == b"[DONE]":
                    if not started:
                        break  # nothing but [DONE]: a broken answer, not an empty one
                    yield DONE
                    return
                started = True
                finished = finished or b'"finish_reason":"' in data or b'"finish_reason": "' in data
                if _metered(data, meter) and not usage_chunk:
                    yield KEEPALIVE  # nothing for the client: the gateway decides
                    continue
                yield b"data: " + data + b"\n\n"
            if not finished:
                raise UpstreamError(f"provider {self.name}: the stream ended before it was complete",
                                    provider=self.name, kind="truncated")
            yield DONE  # some compatible servers end without [DONE] after the last choice
        finally:
            response.close()


def _metered(data: bytes, meter: UsageMeter) -> bool:
    """Note what one chunk tells of the answer's tokens: its usage, or the text it carries (for
    an estimate should no usage come). True for the usage-only chunk (usage and no choices)
    that ``include_usage`` adds; any other chunk, whatever its shape, is relayed as it is."""
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(chunk, dict):
        return False
    choices, usage = chunk.get("choices"), chunk.get("usage")
    meter.relayed += completion_chars(choices)
    if not isinstance(usage, dict):
        return False
    if usage:
        meter.report(usage)
    return choices is None or choices == []
