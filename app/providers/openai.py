"""Adapter for OpenAI and every OpenAI-compatible upstream (OpenRouter, Groq, vLLM, Ollama...)."""

from __future__ import annotations

import orjson

from app.errors import UpstreamError
from app.providers.base import ProviderAdapter, Reply, listed_models, parse_json, replayed
from app.sse import DONE, KEEPALIVE, event_field

PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}


class OpenAIAdapter(ProviderAdapter):
    """Forwards the client's body as is (only the model name may change) and relays the answer."""

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
        """The client's bytes when nothing changes; re-serialised only for an alias."""
        if call.raw is not None and call.body.get("model") == model:
            return call.raw
        return orjson.dumps({**call.body, "model": model})

    def send(self, call, model, request, attempts, *, retry=True) -> Reply:
        body = self._post(call, model, request, attempts, stream=False, retry=retry).body()
        answer = parse_json(body, self.name)  # a 200 with a broken body is the provider's failure
        usage = answer.get("usage") if isinstance(answer, dict) else None
        return Reply(body, usage=usage if isinstance(usage, dict) else None)

    def stream(self, call, model, request, attempts, *, retry=True):
        response = self._post(call, model, request, attempts, stream=True, retry=retry)
        if response.is_json:  # a whole answer where a stream was asked: replay it as one
            return replayed(call, parse_json(response.body(), self.name), self.name)
        return self._relay(response)

    def _post(self, call, model, request, attempts, *, stream, retry):
        headers = {**self._headers, "X-Request-ID": request.id}
        response = self.http.post(self.url(call.endpoint, model), self.payload(call, model),
                                  headers, request, attempts, stream=stream,
                                  retry=retry)
        if not response.ok:
            raise response.failure(key_hint=self.key_hint(response.status))
        return response

    def _relay(self, response):
        """The upstream's SSE events re-emitted one by one until ``[DONE]``."""
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
                yield b"data: " + data + b"\n\n"
            if not finished:
                raise UpstreamError(f"provider {self.name}: the stream ended before it was complete",
                                    provider=self.name, kind="truncated")
            yield DONE  # some compatible servers end without [DONE] after the last choice
        finally:
            response.close()
