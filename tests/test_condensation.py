"""Chat condensation through HTTP: summarized once, reused next turn, truncation as fallback."""

import pytest

from tests.conftest import provider
from tests.upstream import Reply

SYSTEM = {"role": "system", "content": "You are terse."}


def turns(n):
    """n alternating user/assistant messages of about 100 estimated tokens each."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "x" * 400}
            for i in range(n)]


@pytest.fixture
def app(make_app, upstream):
    return make_app([provider(upstream.url, models=["gpt-test", "summarizer"])],
                    condense={"threshold_tokens": 500, "keep_last": 2, "step": 2,
                              "summary_model": "summarizer"},
                    http_client={"retry_attempts": 0})


def chat(app, messages):
    return app.test_client().post("/v1/chat/completions",
                                  json={"model": "gpt-test", "messages": messages})


def test_a_chat_over_the_threshold_is_summarized_before_it_is_sent(app, upstream):
    messages = [SYSTEM] + turns(8)
    response = chat(app, messages)
    assert response.status_code == 200
    assert response.headers["X-Proxy-Condensed"] == "summary"
    summary_call, main_call = (r.json() for r in upstream.requests)
    assert summary_call["model"] == "summarizer" and summary_call["max_tokens"] == 512
    assert "turn 0" in summary_call["messages"][-1]["content"]
    sent = main_call["messages"]
    assert sent[0] == SYSTEM
    assert sent[1]["role"] == "system" and "Hello from upstream" in sent[1]["content"]
    assert sent[2:] == messages[-2:]


def test_the_next_turn_reuses_the_cached_summary(app, upstream):
    messages = [SYSTEM] + turns(8)
    chat(app, messages)
    # One message more: with step 2 the summarized part moves two messages at a time, so it is
    # the same as before and its summary comes from the cache.
    chat(app, messages + [{"role": "user", "content": "and then?"}])
    assert [r.json()["model"] for r in upstream.requests] == ["summarizer", "gpt-test", "gpt-test"]


def test_a_short_chat_is_sent_as_it_is(app, upstream):
    response = chat(app, [SYSTEM, {"role": "user", "content": "hi"}])
    assert "X-Proxy-Condensed" not in response.headers
    assert upstream.calls == 1


def test_when_summarizing_fails_the_oldest_turns_are_dropped(app, upstream):
    upstream.script(Reply(500, {"error": {"message": "down"}}))
    messages = [SYSTEM] + turns(8)
    response = chat(app, messages)
    assert response.status_code == 200
    assert response.headers["X-Proxy-Condensed"] == "truncate"
    sent = upstream.requests[-1].json()["messages"]
    assert sent[0] == SYSTEM and sent[-1] == messages[-1] and len(sent) < len(messages)


def test_an_upstream_context_error_condenses_and_retries_once(app, upstream):
    upstream.script(Reply(400, {"error": {"message": "This model's maximum context length is "
                                          "8192 tokens", "type": "invalid_request_error",
                                          "code": "context_length_exceeded"}}))
    messages = [SYSTEM] + turns(4)  # under the threshold: only the upstream knows it is too long
    response = chat(app, messages)
    assert response.status_code == 200
    assert response.headers["X-Proxy-Condensed"] == "summary"
    assert [r.json()["model"] for r in upstream.requests] == ["gpt-test", "summarizer", "gpt-test"]


def test_other_client_errors_are_not_retried(app, upstream):
    upstream.script(Reply(400, {"error": {"message": "bad temperature"}}))
    assert chat(app, [SYSTEM] + turns(4)).status_code == 400
    assert upstream.calls == 1
