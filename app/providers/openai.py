"""Adapter for OpenAI and every OpenAI-compatible upstream (OpenRouter, Groq, vLLM, Ollama...)."""

from __future__ import annotations

import orjson

from app.errors import UpstreamError
from app.providers.base import (ProviderAdapter, ProviderStream, Reply, UsageMeter, asked_usage,
                                 completion_chars, estimated_usage, listed_models, parse_json,
                                 replayed, with_total)
from app.sse import DONE, KEEPALIVE, event_field

PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}
TEXT_ENDPOINTS = ("chat", "completions")  # the ones whose streams take stream_options


class OpenAIAdapter(ProviderAdapter):
    """Forwards the client's body as is (only the model name, and a stream's ``stream_options``
    may change) and relays the answer."""

    lists_models = True

    def __init__(self, settings, http):
        super().__init__(settings, http)
        base = settings.base_url.rstrip("/")
        self._urls = {endpoint: base + path for endpoint, path in PATHS.items()}
        self._models_url = base + "/models"
        self._headers = {"Content-Type": "application/json", **self.auth_headers(),
                         **settings.headers}

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
        if response.is_json:  # a whole answer where a stream was asked: replay it as one
            return replayed(call, parse_json(response.body(), self.name), self.name)
        meter = UsageMeter()
        return ProviderStream(call, self._relay(response, meter, asked_usage(call)), meter)

    def _post(self, call, model, request, attempts, *, stream, retry):
        headers = {**self._headers, "X-Request-ID": request.id}
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
