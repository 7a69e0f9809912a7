"""Tenants sharing one proxy, each with its own API key: one key never gets another's cached
answer or summary, nor learns from X-Cache or Age what another asked (``cache.scope: key``);
``cache.scope: shared`` shares them for those who want the savings."""

import json

import pytest

from settings import hash_key
from tests.conftest import FakeClock, provider
from tests.upstream import Reply, chat_completion, openai_answer

KEY_A = "sk-team-a-0123456789abcdef"
KEY_B = "sk-team-b-0123456789abcdef"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "our merger plans"}]}
KEYS = {"api_keys_required": True,
        "api_keys": [{"id": "team-a", "sha256": hash_key(KEY_A)},
                     {"id": "team-b", "sha256": hash_key(KEY_B)}]}


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def build(make_app, upstream, clock):
    """An app with two keys, the response cache on, an alias, and a summarizing model."""
    def build(**cache):
        return make_app([provider(upstream.url, models=["gpt-test", "summarizer"],
                                  aliases={"fast": "gpt-test"})],
                        clock=clock, auth=KEYS, http_client={"retry_attempts": 0},
                        cache={"enabled": True, **cache},
                        condense={"threshold_tokens": 500, "keep_last": 2, "step": 2,
                                  "summary_model": "summarizer"})
    return build


def post(app, headers, body=CHAT):
    response = app.test_client().post("/v1/chat/completions", json=body, headers=headers)
    response.get_data()  # a stream read to its end, as a client does
    response.close()  # as a server does after the last byte
    return response


def answered(upstream, text):
    """The upstream answers every call with ``text``, so a test can tell whose answer it is."""
    upstream.default = lambda r: Reply(200, chat_completion("gpt-test", text))


def test_another_key_never_gets_a_cached_answer(build, upstream, clock):
    app = build()
    answered(upstream, "for team a")
    assert post(app, A).headers["X-Cache"] == "MISS"
    clock.advance(1)
    answered(upstream, "for team b")
    response = post(app, B)
    assert response.headers["X-Cache"] == "MISS" and "Age" not in response.headers
    assert response.json["choices"][0]["message"]["content"] == "for team b"
    again = post(app, A)  # each key still hits its own entry
    assert again.headers["X-Cache"] == "HIT" and again.headers["Age"] == "1"
    assert again.json["choices"][0]["message"]["content"] == "for team a"
    assert upstream.calls == 2


def test_another_key_never_gets_a_cached_answer_through_an_alias(build, upstream):
    app = build()
    post(app, A)
    assert post(app, B, {**CHAT, "model": "fast"}).headers["X-Cache"] == "MISS"
    assert post(app, A, {**CHAT, "model": "fast"}).headers["X-Cache"] == "HIT"
    assert upstream.calls == 2


def test_another_key_never_gets_a_cached_answer_replayed_as_a_stream(build, upstream):
    app = build()
    answered(upstream, "for team a")
    post(app, A)
    upstream.default = openai_answer  # the fake's own: a stream when a stream is asked
    response = post(app, B, {**CHAT, "stream": True})
    assert response.headers["X-Cache"] == "MISS"
    assert b"for team a" not in response.data and b"upstream" in response.data
    assert upstream.calls == 2
    assert post(app, A, {**CHAT, "stream": True}).headers["X-Cache"] == "HIT"


def test_another_keys_stream_is_not_stored_for_this_key(build, upstream):
    app = build()
    post(app, A, {**CHAT, "stream": True})
    assert post(app, B).headers["X-Cache"] == "MISS"
    assert post(app, A).headers["X-Cache"] == "HIT"


def test_with_scope_shared_every_key_gets_the_cached_answer(build, upstream, clock):
    app = build(scope="shared")
    answered(upstream, "for team a")
    post(app, A)
    clock.advance(1)
    whole = post(app, B)
    assert whole.headers["X-Cache"] == "HIT" and whole.headers["Age"] == "1"
    assert whole.json["choices"][0]["message"]["content"] == "for team a"
    assert post(app, B, {**CHAT, "model": "fast"}).headers["X-Cache"] == "HIT"
    assert post(app, B, {**CHAT, "stream": True}).headers["X-Cache"] == "HIT"
    assert upstream.calls == 1


def long_chat():
    return [{"role": "user" if i % 2 == 0 else "assistant",
             "content": f"turn {i} " + "x" * 400} for i in range(8)]


def summaries(upstream):
    return sum(r.json()["model"] == "summarizer" for r in upstream.requests)


def test_another_key_never_gets_a_summary_of_this_keys_conversation(build, upstream):
    app = build()
    body = {"model": "gpt-test", "messages": long_chat()}
    # Cache-Control: no-cache keeps the response cache out of it: only summaries are tested
    for headers in (A, B):
        response = app.test_client().post("/v1/chat/completions", json=body,
                                          headers={**headers, "Cache-Control": "no-cache"})
        assert response.headers["X-Proxy-Condensed"] == "summary"
    assert summaries(upstream) == 2
    app.test_client().post("/v1/chat/completions", json=body,
                           headers={**A, "Cache-Control": "no-cache"})
    assert summaries(upstream) == 2  # team a's own summary came from the cache


def test_with_scope_shared_a_summary_serves_every_key(build, upstream):
    app = build(scope="shared")
    body = {"model": "gpt-test", "messages": long_chat()}
    for headers in (A, B):
        app.test_client().post("/v1/chat/completions", json=body,
                               headers={**headers, "Cache-Control": "no-cache"})
    assert summaries(upstream) == 1


def test_an_unknown_scope_is_refused_at_start(make_app, upstream):
    from settings import SettingsError
    with pytest.raises(SettingsError, match="cache.scope"):
        make_app([provider(upstream.url)], cache={"scope": "everyone"})


def test_keys_in_redis_are_scoped_too(make_app, upstream, redis_url, prefix):
    """Two processes on one Redis: the shared cache keeps each key's answers apart too."""
    one, two = (make_app([provider(upstream.url)], auth=KEYS, cache={"enabled": True},
                         redis={"url": redis_url, "prefix": prefix, "timeout": 0.5})
                for _ in range(2))
    answered(upstream, "for team a")
    assert post(one, A).headers["X-Cache"] == "MISS"
    answered(upstream, "for team b")
    response = post(two, B)
    assert response.headers["X-Cache"] == "MISS"
    assert json.loads(response.data)["choices"][0]["message"]["content"] == "for team b"
    assert post(two, A).headers["X-Cache"] == "HIT"  # shared across processes, per key
    assert upstream.calls == 2
