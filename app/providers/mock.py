"""The built-in mock provider: deterministic answers with no network, for local runs and demos.

It answers chat, completions and embeddings in the OpenAI shape after ``latency_ms``, streams
in ``chunks`` pieces, and makes embeddings of ``embedding_dimensions`` from a hash of the
input, so the same request always gets the same answer. It is no model: use it to try the
proxy, to demo it, and to load-test the proxy's own overhead.
"""

from __future__ import annotations

import hashlib
import time

import orjson

from app.providers.base import (ProviderAdapter, ProviderStream, Reply, UsageMeter, asked_usage,
                                 estimate_tokens)
from app.sse import DONE, data_event


class MockAdapter(ProviderAdapter):
    def __init__(self, settings, http=None, *, sleep=time.sleep, clock=time.time):
        super().__init__(settings, http)
        self._sleep, self._clock = sleep, clock

    @property
    def missing_key(self) -> str:
        return ""  # no network, no key

    def send(self, call, model, request, attempts, *, retry=True) -> Reply:
        attempts.record()
        self._wait(self.settings.latency_ms)
        if call.endpoint == "embeddings":
            answer = self._embeddings(call, model)
            return Reply(orjson.dumps(answer), usage=answer["usage"])
        text = answer_text(call)
        usage = _usage(call, text)
        created = int(self._clock())
        if call.endpoint == "chat":
            body = {"id": _id("chatcmpl", call), "object": "chat.completion", "created": created,
                    "model": model, "choices": [{
                        "index": 0, "message": {"role": "assistant", "content": text},
                        "logprobs": None, "finish_reason": "stop"}], "usage": usage}
        else:
            body = {"id": _id("cmpl", call), "object": "text_completion", "created": created,
                    "model": model, "choices": [{
                        "index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
                    "usage": usage}
        return Reply(orjson.dumps(body), usage=usage)

    def stream(self, call, model, request, attempts, *, retry=True):
        attempts.record()
        meter = UsageMeter()
        return ProviderStream(call, self._stream(call, model, meter), meter)

    def _stream(self, call, model, meter):
        self._wait(self.settings.latency_ms)
        text = answer_text(call)
        meter.report(_usage(call, text))  # the mock's counts are known before it answers
        pieces = _split(text, self.settings.chunks)
        chat = call.endpoint == "chat"
        base = {"id": _id("chatcmpl" if chat else "cmpl", call),
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(self._clock()), "model": model}
        for i, piece in enumerate(pieces):
            if i:
                self._wait(self.settings.chunk_delay_ms)
            last = i == len(pieces) - 1
            if chat:
                delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
                choice = {"index": 0, "delta": delta, "logprobs": None,
                          "finish_reason": "stop" if last else None}
            else:
                choice = {"index": 0, "text": piece, "logprobs": None,
                          "finish_reason": "stop" if last else None}
            yield data_event({**base, "choices": [choice]})
        if asked_usage(call):
            yield data_event({**base, "choices": [], "usage": meter.usage})
        yield DONE

    def _embeddings(self, call, model):
        inputs = call.body["input"]
        inputs = [inputs] if isinstance(inputs, str) or _is_token_list(inputs) else inputs
        dims = self.settings.embedding_dimensions
        data = [{"object": "embedding", "index": i, "embedding": _vector(item, dims)}
                for i, item in enumerate(inputs)]
        tokens = sum(estimate_tokens(str(item)) for item in inputs)
        return {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def _wait(self, ms):
        if ms > 0:
            self._sleep(ms / 1000)


def answer_text(call) -> str:
    """The mock's answer: a fixed sentence that quotes the end of the prompt."""
    prompt = _prompt_text(call).strip().replace("\n", " ")
    quoted = prompt[-60:] if prompt else "nothing"
    return f"This is the mock provider answering: {quoted}"


def _usage(call, text: str) -> dict:
    """The mock's token counts for answering ``call`` with ``text``."""
    prompt, completion = estimate_tokens(_prompt_text(call)), estimate_tokens(text)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _prompt_text(call) -> str:
    body = call.body
    if call.endpoint == "chat":  # the last message but instructions (agents put a system
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]  # one last)
        said = [m for m in messages if m.get("role") not in ("system", "developer")]
        for message in reversed(said or messages):
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content
                                if isinstance(p, dict) and isinstance(p.get("text", ""), str))
        return ""
    prompt = body.get("prompt", body.get("input", ""))
    return prompt if isinstance(prompt, str) else " ".join(map(str, prompt))


def _split(text, n):
    size = max(1, -(-len(text) // n))
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def _id(prefix, call):
    digest = hashlib.sha256(orjson.dumps(call.body, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"{prefix}-mock{digest[:24]}"


def _vector(item, dims):
    digest = hashlib.sha256(str(item).encode()).digest()
    while len(digest) < dims:
        digest += hashlib.sha256(digest).digest()
    return [round(b / 127.5 - 1.0, 6) for b in digest[:dims]]


def _is_token_list(value):
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) for v in value)
