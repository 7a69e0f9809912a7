"""A provider whose key variable is unset says so: at start-up, in /health, in /providers and
in the 502 its refused calls end in. A provider with no key variable (vLLM, Ollama) is fine."""

import logging

from tests.conftest import provider
from tests.upstream import Reply

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
UNSET = "LLM_PROXY_TEST_KEY_THAT_IS_NEVER_SET"
SET = "LLM_PROXY_TEST_KEY_THAT_IS_SET"


def keyed(url, name="up", env=UNSET, **fields):
    return provider(url, name, api_key_env=env, **fields)


def test_a_missing_key_is_one_warning_line_per_provider_at_start_up(make_app, upstream, caplog):
    caplog.set_level(logging.WARNING, logger="llm_proxy")
    make_app([keyed(upstream.url, "a"), keyed(upstream.url, "b", env=UNSET + "_B"),
              provider(upstream.url, "local")])  # no key variable at all: nothing to say
    lines = [r.getMessage() for r in caplog.records if "key variable" in r.getMessage()]
    assert len(lines) == 2
    assert "provider a" in lines[0] and UNSET in lines[0]
    assert "provider b" in lines[1] and UNSET + "_B" in lines[1]


def test_a_provider_whose_key_is_set_or_that_needs_none_starts_quietly(
        make_app, upstream, caplog, monkeypatch):
    monkeypatch.setenv(SET, "sk-test-0123456789")
    caplog.set_level(logging.WARNING, logger="llm_proxy")
    app = make_app([keyed(upstream.url, "a", env=SET), provider(upstream.url, "local")])
    assert not [r for r in caplog.records if "key variable" in r.getMessage()]
    health = app.test_client().get("/health").json
    assert health["status"] == "healthy"
    assert "missing_keys" not in health["checks"]["providers"]


def test_health_names_the_provider_and_its_unset_variable(make_app, upstream):
    app = make_app([keyed(upstream.url, "a"), provider(upstream.url, "local")])
    response = app.test_client().get("/health")
    assert response.status_code == 200  # still serving: a warning, not unhealthy
    assert response.json["status"] == "warning"
    check = response.json["checks"]["providers"]
    assert check["status"] == "warning"
    assert check["missing_keys"] == [{"provider": "a", "env": UNSET}]


def test_a_disabled_provider_without_its_key_does_not_degrade_health(make_app, upstream):
    app = make_app([keyed(upstream.url, "a", enabled=False), provider(upstream.url, "local")])
    assert app.test_client().get("/health").json["status"] == "healthy"


def test_providers_shows_each_key_variable_and_whether_it_is_set(make_app, upstream, monkeypatch):
    monkeypatch.setenv(SET, "sk-test-0123456789")
    app = make_app([keyed(upstream.url, "a"), keyed(upstream.url, "b", env=SET),
                    provider(upstream.url, "local"),
                    {"name": "m", "type": "mock", "models": ["mock-model"]}])
    data = app.test_client().get("/providers").json["providers"]
    assert [p["key"] for p in data] == [{"env": UNSET, "set": False}, {"env": SET, "set": True},
                                        None, None]
    assert "sk-test-0123456789" not in str(data)


def test_a_401_from_a_provider_without_its_key_names_the_variable(make_app, upstream):
    app = make_app([keyed(upstream.url, "a")], http_client={"retry_attempts": 0})
    upstream.script(Reply(401, {"error": {"message": "missing key"}}))
    response = app.test_client().post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 502
    assert (f"provider a answered HTTP 401 (its key variable {UNSET} is unset)"
            in response.json["error"]["message"])


def test_a_403_while_streaming_names_the_variable_too(make_app, upstream):
    app = make_app([keyed(upstream.url, "a")], http_client={"retry_attempts": 0})
    upstream.script(Reply(403, {"error": {"message": "forbidden"}}))
    response = app.test_client().post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status_code == 502
    assert f"HTTP 403 (its key variable {UNSET} is unset)" in response.json["error"]["message"]


def test_a_401_with_the_key_set_says_nothing_about_the_variable(make_app, upstream, monkeypatch):
    monkeypatch.setenv(SET, "sk-test-0123456789")
    app = make_app([keyed(upstream.url, "a", env=SET)], http_client={"retry_attempts": 0})
    upstream.script(Reply(401, {"error": {"message": "bad key"}}))
    message = app.test_client().post("/v1/chat/completions", json=CHAT).json["error"]["message"]
    assert "provider a answered HTTP 401" in message and "unset" not in message
