"""GET /v1/models and /v1/models/{id}: names, aliases, and the concrete models a provider
serving a pattern (``gpt-*``) has, learnt from its upstream's own model list in the background,
never on a request's path."""

import logging
import queue

import pytest

from app.providers.discovery import ModelDiscovery
from tests.conftest import provider
from tests.upstream import FakeUpstream, Reply, openai_answer

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
KEY_VAR = "LLM_PROXY_TEST_DISCOVERY_KEY"
OPENAI_MODELS = {"object": "list", "data": [
    {"id": "gpt-4o", "object": "model", "created": 1715367049, "owned_by": "system"},
    {"id": "gpt-4o-mini", "object": "model", "created": 1721172741, "owned_by": "system"},
    {"id": "dall-e-3", "object": "model", "created": 1698785189, "owned_by": "system"},
    {"id": "whisper-1", "object": "model", "created": 1677532384, "owned_by": "openai"}]}


def lists(models, status=200):
    """A FakeUpstream default: ``models`` for GET .../models, the OpenAI answer otherwise."""
    def answer(recorded):
        if recorded.method == "GET":
            return Reply(status, models)
        return openai_answer(recorded)
    return answer


def discovered(app):
    """The app's model discovery, after its first round (bounded wait)."""
    discovery = app.extensions["llm_proxy"].discovery
    assert discovery.wait_for_round(1, timeout=5)
    return discovery


def model_ids(app, path="/v1/models"):
    response = app.test_client().get(path)
    assert response.status_code == 200 and response.json["object"] == "list"
    return [m["id"] for m in response.json["data"]]


def gets(upstream):
    return [r for r in upstream.requests if r.method == "GET"]


def test_models_lists_the_upstreams_models_that_match_the_providers_patterns(make_app, upstream):
    upstream.default = lists(OPENAI_MODELS)
    app = make_app([provider(upstream.url, "openai", models=["gpt-*", "gpt-test"],
                             aliases={"fast": "gpt-4o-mini"})])
    discovered(app)
    assert model_ids(app) == ["fast", "gpt-4o", "gpt-4o-mini", "gpt-test"]
    assert model_ids(app, "/models") == model_ids(app)
    listed = {m["id"]: m for m in app.test_client().get("/v1/models").json["data"]}
    assert listed["gpt-4o"] == {"id": "gpt-4o", "object": "model", "created": 1715367049,
                                "owned_by": "openai"}
    assert [(r.method, r.path) for r in gets(upstream)] == [("GET", "/v1/models")]


def test_the_model_list_is_asked_with_the_providers_key_and_headers(make_app, upstream,
                                                                    monkeypatch):
    monkeypatch.setenv(KEY_VAR, "sk-discovery-0123456789")
    upstream.default = lists(OPENAI_MODELS)
    app = make_app([provider(upstream.url, models=["gpt-*"], api_key_env=KEY_VAR,
                             headers={"OpenAI-Organization": "org-1"})])
    discovered(app)
    (recorded,) = gets(upstream)
    assert recorded.headers["Authorization"] == "Bearer sk-discovery-0123456789"
    assert recorded.headers["OpenAI-Organization"] == "org-1"


def test_anthropic_models_are_asked_with_its_headers_page_by_page(make_app, upstream,
                                                                  monkeypatch):
    monkeypatch.setenv(KEY_VAR, "sk-ant-discovery-0123")
    pages = [{"data": [{"type": "model", "id": "claude-sonnet-4-5", "display_name": "S",
                        "created_at": "2025-09-29T00:00:00Z"}],
              "has_more": True, "first_id": "claude-sonnet-4-5", "last_id": "claude-sonnet-4-5"},
             {"data": [{"type": "model", "id": "claude-haiku-4-5", "display_name": "H",
                        "created_at": "2025-10-01T00:00:00Z"}],
              "has_more": False, "first_id": "claude-haiku-4-5", "last_id": "claude-haiku-4-5"}]
    upstream.script(Reply(body=pages[0]), Reply(body=pages[1]))
    app = make_app([{"name": "anthropic", "type": "anthropic", "base_url": upstream.url,
                     "api_key_env": KEY_VAR, "models": ["claude-*"]}])
    discovered(app)
    assert model_ids(app) == ["claude-haiku-4-5", "claude-sonnet-4-5"]
    first, second = gets(upstream)
    assert first.path.startswith("/v1/models?") and "after_id" not in first.path
    assert "after_id=claude-sonnet-4-5" in second.path
    assert first.headers["x-api-key"] == "sk-ant-discovery-0123"
    assert first.headers["anthropic-version"] == "2023-06-01"
    created = {m["id"]: m["created"] for m in app.test_client().get("/v1/models").json["data"]}
    assert created["claude-haiku-4-5"] == 1759276800


def test_a_discovery_failure_leaves_the_static_list_and_logs_one_warning(make_app, upstream,
                                                                         caplog):
    caplog.set_level(logging.WARNING, logger="llm_proxy")
    upstream.default = lists({"error": {"message": "down"}}, status=500)
    app = make_app([provider(upstream.url, "openai", models=["gpt-*", "gpt-test"])])
    discovery = discovered(app)
    discovery.refresh()  # the next interval's round fails too: no second line
    assert model_ids(app) == ["gpt-test"]
    lines = [r.getMessage() for r in caplog.records if "model list" in r.getMessage()]
    assert len(lines) == 1 and "openai" in lines[0] and "HTTP 500" in lines[0]
    assert app.test_client().post("/v1/chat/completions", json=CHAT).status_code == 200


def test_an_unreachable_upstream_is_not_fatal(make_app):
    with FakeUpstream() as gone:
        url = gone.url
    app = make_app([provider(url, models=["gpt-*", "gpt-test"])])
    discovered(app)
    assert model_ids(app) == ["gpt-test"]


def test_a_failed_refresh_keeps_the_models_last_listed(make_app, upstream):
    upstream.default = lists(OPENAI_MODELS)
    app = make_app([provider(upstream.url, models=["gpt-*"])])
    discovery = discovered(app)
    upstream.default = lists({}, status=503)
    discovery.refresh()
    assert model_ids(app) == ["gpt-4o", "gpt-4o-mini"]


def test_no_request_calls_the_upstreams_model_list(make_app, upstream):
    upstream.default = lists(OPENAI_MODELS)
    app = make_app([provider(upstream.url, models=["gpt-*"])])
    discovered(app)
    client = app.test_client()
    for _ in range(3):
        client.get("/v1/models")
        client.get("/v1/models/gpt-4o")
        client.get("/v1/models/nope")
        client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o"})
        client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert len(gets(upstream)) == 1
    assert upstream.calls == 1 + 3


def test_providers_with_no_pattern_no_key_or_disabled_are_never_asked(make_app, upstream):
    app = make_app([provider(upstream.url, "names", models=["gpt-test"]),
                    provider(upstream.url, "nokey", models=["gpt-*"], api_key_env=KEY_VAR + "_X"),
                    provider(upstream.url, "off", models=["gpt-*"], enabled=False),
                    {"name": "m", "type": "mock", "models": ["mock-*"]}])
    assert app.extensions["llm_proxy"].discovery.wait_for_round(1, timeout=5)
    assert upstream.calls == 0


def test_the_list_is_asked_again_every_interval(make_app, upstream):
    upstream.default = lists(OPENAI_MODELS)
    app = make_app([provider(upstream.url, models=["gpt-*"])])
    llm_proxy = app.extensions["llm_proxy"]
    discovered(app)
    ticks = queue.Queue()
    intervals = []

    def wait(seconds):  # the interval passing, on the test's command
        intervals.append(seconds)
        return ticks.get(timeout=5)  # True: stop

    discovery = ModelDiscovery(llm_proxy.providers, llm_proxy.router, interval=600, wait=wait)
    discovery.start()
    try:
        assert discovery.wait_for_round(1, timeout=5)
        upstream.default = lists({"data": [{"id": "gpt-5", "created": 5}]})
        ticks.put(False)
        assert discovery.wait_for_round(2, timeout=5)
        assert model_ids(app) == ["gpt-5"]
        assert intervals[:2] == [600, 600]
    finally:
        ticks.put(True)
        discovery.close()
    assert len(gets(upstream)) == 3


def test_an_unknown_model_404_names_the_patterns_served(make_app, upstream):
    upstream.default = lists({}, status=404)
    app = make_app([provider(upstream.url, "a", models=["gpt-*", "gpt-test"]),
                    provider(upstream.url, "b", models=["claude-*"])])
    discovered(app)
    response = app.test_client().post("/v1/chat/completions", json={**CHAT, "model": "llama"})
    assert response.status_code == 404
    message = response.json["error"]["message"]
    assert "Available models: gpt-test" in message
    assert "served by pattern: gpt-*, claude-*" in message


def test_one_model_is_retrieved_in_openais_shape(make_app, upstream):
    upstream.default = lists(OPENAI_MODELS)
    app = make_app([provider(upstream.url, "openai", models=["gpt-*", "gpt-test"],
                             aliases={"fast": "gpt-4o-mini"})])
    discovered(app)
    client = app.test_client()
    assert client.get("/v1/models/gpt-test").json == {
        "id": "gpt-test", "object": "model", "created": 0, "owned_by": "openai"}
    assert client.get("/models/fast").json["id"] == "fast"
    assert client.get("/v1/models/gpt-4o").json["created"] == 1715367049


@pytest.mark.parametrize("model", ["nope", "gpt-4.5-preview", "dall-e-3"])
def test_a_model_not_served_is_an_openai_style_404(make_app, upstream, model):
    upstream.default = lists(OPENAI_MODELS)
    app = make_app([provider(upstream.url, models=["gpt-*", "gpt-test"])])
    discovered(app)
    response = app.test_client().get(f"/v1/models/{model}")
    assert response.status_code == 404
    error = response.json["error"]
    assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error"
    assert model in error["message"]


def test_a_pattern_model_is_served_while_its_providers_list_is_unknown(make_app, upstream):
    upstream.default = lists({}, status=500)
    app = make_app([provider(upstream.url, "a", models=["gpt-*"])])
    discovered(app)
    assert app.test_client().get("/v1/models/gpt-anything").json == {
        "id": "gpt-anything", "object": "model", "created": 0, "owned_by": "a"}


def test_a_model_id_with_a_slash_is_retrieved(make_app, upstream):
    app = make_app([provider(upstream.url, "router", models=["meta-llama/llama-3-8b"])])
    assert app.test_client().get("/v1/models/meta-llama/llama-3-8b").json["id"] == \
        "meta-llama/llama-3-8b"


def test_the_discovery_thread_starts_with_the_app_and_stops_with_it(make_app, upstream):
    upstream.default = lists(OPENAI_MODELS)
    app = make_app([provider(upstream.url, models=["gpt-*"])])
    discovery = discovered(app)
    thread = discovery._thread
    assert thread.name == "llm-proxy-model-discovery" and thread.daemon and thread.is_alive()
    app.extensions["llm_proxy"].close()
    assert not thread.is_alive()


def test_azure_deployments_are_never_listed(make_app, upstream):
    app = make_app([{"name": "az", "type": "azure_openai", "base_url": upstream.url,
                     "models": ["gpt-*"]}])
    assert app.extensions["llm_proxy"].discovery._thread is None
    assert model_ids(app) == [] and upstream.calls == 0


def test_a_refresh_interval_of_0_never_asks_the_upstream(make_app, upstream):
    app = make_app([provider(upstream.url, models=["gpt-*"])],
                   routing={"model_refresh_interval": 0})
    assert app.test_client().get("/v1/models").status_code == 200
    assert not [r for r in upstream.requests if r.method == "GET"]
