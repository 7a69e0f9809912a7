"""Helpers for the store's tests (spend, budgets, the request log, outages): apps with the
database on and an injected wall clock, keys made over HTTP, answers with chosen usage, bounded
waits for the writer, and /metrics samples."""

from __future__ import annotations

import calendar
import json
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from tests.conftest import settings_of
from tests.store_helpers import store_of
from tests.upstream import Reply, Stream, chat_chunks, chat_completion

ADMIN = "admin-key-for-store-tests"
MILLION = 1_000_000
MODEL = "gpt-test"
# USD per million tokens: prompt tokens not cached, cached prompt tokens, completion tokens.
PRICE = {"model": MODEL, "input": 2.0, "output": 8.0, "cached_input": 0.5}


def admin() -> dict:
    return {"Authorization": f"Bearer {ADMIN}"}


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def chat(content="hi", model=MODEL, **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **fields}


def utc(text: str) -> float:
    """UNIX seconds of a UTC time written 2027-03-15T23:59:00."""
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S")))


class Wall:
    """A wall clock (UNIX seconds) that moves only when the test sets or advances it."""

    def __init__(self, start: float):
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float):
        with self._lock:
            self.now += seconds

    def set(self, now: float):
        with self._lock:
            self.now = now


class Apps:
    """Builds apps with the database on (``database``: the conftest fixture's section) and
    closes them all at the end of the test."""

    def __init__(self):
        self.built = []

    def make(self, section, providers, *, wall=None, clock=None, environ=None, **sections):
        """``section``: the database fixture's; a ``database`` section adds to it."""
        data = {"providers": providers, "admin_api_key": ADMIN, **sections}
        data["database"] = {**section, **sections.get("database", {})}
        http = data.setdefault("http_client", {})
        http.setdefault("backoff_base", 0.0)
        http.setdefault("timeout", 5.0)
        http.setdefault("connect_timeout", 2.0)
        # Budgets and spend want every request to reach the upstream: the cache only on request.
        data.setdefault("cache", {}).setdefault("enabled", False)
        options = {}
        if wall is not None:
            options["wall"] = wall
        if clock is not None:
            options["clock"] = clock
        app = create_app(settings_of(data, environ), **options)
        app.testing = True
        self.built.append(app)
        return app

    def close(self):
        for app in self.built:
            app.extensions["llm_proxy"].close()


def create_key(client, **fields) -> tuple[str, str]:
    """A key made through POST /admin/keys: (id, secret)."""
    response = client.post("/admin/keys", json=fields, headers=admin())
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.json["id"], response.json["key"]


def post(client, path, body, headers=None, **kwargs):
    """POST and close the response (its request log row is recorded on close)."""
    response = client.post(path, json=body, headers=headers or {}, **kwargs)
    response.get_data()
    response.close()
    return response


def wait_written(app, count: int, timeout: float = 5.0):
    """Until the writer has written ``count`` rows; the test fails past ``timeout`` seconds."""
    writer = store_of(app).writer
    deadline = time.monotonic() + timeout
    while writer.stats()["written"] < count:
        if time.monotonic() > deadline:
            pytest.fail(f"the writer wrote {writer.stats()} rows, not {count}, in {timeout} s")
        time.sleep(0.01)


def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    out = {"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion}
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def answer_with(used: dict, model: str = MODEL) -> Reply:
    """A whole chat answer reporting ``used`` as its usage."""
    return Reply(body={**chat_completion(model, "Hello from upstream"), "usage": used})


def stream_with(used: dict, model: str = MODEL) -> Stream:
    """A streamed chat answer whose last chunk before [DONE] carries ``used``."""
    chunks = chat_chunks(model, ["Hello", " there"])[:-1]
    last = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [], "usage": used}
    return Stream(chunks + [last, b"[DONE]"])


def priced(used: dict, price: dict = PRICE) -> float:
    """What ``used`` costs at ``price``, worked out here from the price table's rule (cached
    prompt tokens at the cached rate, the rest of the prompt at the input rate)."""
    cached = used.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    plain = used["prompt_tokens"] - cached
    return (plain * price["input"] + cached * price.get("cached_input", price["input"])
            + used["completion_tokens"] * price["output"]) / MILLION


def samples(app) -> dict:
    """/metrics as {(sample name, sorted labels): value}."""
    text = app.test_client().get("/metrics").get_data(as_text=True)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(app, name: str, **labels) -> float:
    return samples(app).get((name, tuple(sorted(labels.items()))), 0.0)


def all_rows(client, **query) -> list[dict]:
    """Every request log row through the NDJSON export (oldest first)."""
    response = client.get("/admin/requests", query_string={**query, "format": "ndjson"},
                          headers=admin())
    assert response.status_code == 200, response.get_data(as_text=True)
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines()]
