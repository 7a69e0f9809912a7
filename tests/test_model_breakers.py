"""One upstream serving many models behind one URL (LiteLLM-like): one model's trouble opens
that model's breaker, never the provider's, so its other models are still served; trouble
reaching the provider opens the provider's."""

import pytest

from tests.conftest import FakeClock, provider
from tests.processes import free_port
from tests.upstream import Reply, chat_completion, openai_answer

ADMIN = {"Authorization": "Bearer admin-secret"}
TWO_STRIKES = {"failure_threshold": 2, "adaptive_thresholds": False}


def by_model(recorded):
    """The LiteLLM-like upstream: ll-429 is rate limited, ll-500 is broken, the rest answer."""
    model = recorded.json().get("model")
    if model == "ll-429":
        return Reply(429, {"error": {"message": "rate limited"}})
    if model == "ll-500":
        return Reply(500, {"error": {"message": "model crashed"}})
    if model in ("ll-401", "ll-403"):  # LiteLLM: the virtual key may not use this model
        return Reply(int(model[3:]), {"error": {"message": "key not allowed to access model"}})
    return openai_answer(recorded)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def litellm(make_app, upstream, clock):
    """Provider ll: every ll-* model behind the one URL; a breaker opens after 2 failures."""
    upstream.default = by_model

    def build(**sections):
        sections.setdefault("circuit_breaker", TWO_STRIKES)
        return make_app([provider(upstream.url, "ll", models=["ll-*"])], clock=clock,
                        http_client={"retry_attempts": 0}, admin_api_key="admin-secret",
                        **sections)
    return build


def post(app, model, **kw):
    response = app.test_client().post(
        "/v1/chat/completions", json={"model": model, "messages": [{"role": "user",
                                                                     "content": "hi"}]}, **kw)
    response.close()
    return response


def ll(app):
    return app.test_client().get("/providers").json["providers"][0]


def test_rate_limits_for_one_model_never_shut_off_the_providers_other_models(litellm, upstream):
    app = litellm()
    for _ in range(5):
        assert post(app, "ll-429").status_code == 429
    response = post(app, "ll-chat")
    assert response.status_code == 200, response.json
    assert ll(app)["circuit_breaker"]["state"] == "closed"
    assert ll(app)["circuit_breaker"]["failures"] == 0


def test_failures_of_one_model_open_that_models_breaker_only(litellm, upstream):
    app = litellm()
    for _ in range(2):
        assert post(app, "ll-500").status_code == 502
    calls = upstream.calls
    refused = post(app, "ll-500")
    assert refused.status_code == 503 and "circuit open" in refused.json["error"]["message"]
    assert refused.headers["Retry-After"] == "60"
    assert upstream.calls == calls  # skipped without a call
    assert post(app, "ll-chat").status_code == 200
    shown = ll(app)
    assert shown["circuit_breaker"]["state"] == "closed"
    assert shown["model_breakers"]["ll-500"]["state"] == "open"
    assert set(shown["model_breakers"]) == {"ll-500"}


@pytest.mark.parametrize("model", ["ll-401", "ll-403"])
def test_a_refusal_of_one_model_never_shuts_off_the_providers_other_models(litellm, model):
    """A multi-model upstream refuses our key for one model only (LiteLLM's per-model access,
    OpenRouter's moderation): a tenant can cause that at will, so it opens that model's breaker,
    not the provider's."""
    app = litellm()
    for _ in range(3):
        assert post(app, model).status_code in (502, 503)
    assert post(app, "ll-chat").status_code == 200
    shown = ll(app)
    assert shown["circuit_breaker"]["state"] == "closed"
    assert shown["model_breakers"][model]["state"] == "open"


def test_an_open_model_breaker_shows_in_health_and_metrics(litellm):
    app = litellm()
    for _ in range(2):
        post(app, "ll-500")
    check = app.test_client().get("/health").json["checks"]["circuit_breakers"]
    assert check["status"] == "warning" and check["open"] == 0
    assert check["open_models"] == {"ll": 1}  # counted, not named: /health needs no key
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    # ll-500 is no name the proxy serves (only its pattern takes it): labelled by the pattern
    assert 'llm_proxy_model_breaker_state{model="ll-*",provider="ll"} 2.0' in metrics
    assert 'llm_proxy_breaker_state{provider="ll"} 0.0' in metrics


def test_the_model_breaker_recovers_like_a_providers(litellm, upstream, clock):
    app = litellm()
    for _ in range(2):
        post(app, "ll-500")
    upstream.default = openai_answer  # the model is back
    clock.advance(60)
    for expected in ("half_open", "half_open", "closed"):
        assert post(app, "ll-500").status_code == 200
        found = ll(app)["model_breakers"]
        assert found.get("ll-500", {"state": "closed"})["state"] == expected


def test_the_admin_reset_closes_the_model_breakers_too(litellm):
    app = litellm()
    for _ in range(2):
        post(app, "ll-500")
    response = app.test_client().post("/debug/circuit-breakers/reset?name=ll", headers=ADMIN)
    assert response.status_code == 200 and response.json["model_breakers"] == {}
    assert ll(app)["model_breakers"] == {}
    assert post(app, "ll-500").status_code == 502  # tried again


def test_a_provider_that_cannot_be_reached_opens_the_providers_breaker(make_app, clock):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    app = make_app([provider(dead, "ll", models=["ll-*"])], clock=clock,
                   http_client={"retry_attempts": 0}, circuit_breaker=TWO_STRIKES)
    assert post(app, "ll-chat").status_code == 502
    assert post(app, "ll-other").status_code == 502  # two models, one provider's trouble
    shown = ll(app)
    assert shown["circuit_breaker"]["state"] == "open" and shown["model_breakers"] == {}
    assert post(app, "ll-third").status_code == 503


def test_a_provider_of_a_single_model_opens_its_own_breaker(make_app, upstream, clock):
    """Nothing else to protect: the model's trouble is the provider's, seen in /providers."""
    app = make_app([provider(upstream.url, "one", models=["gpt-test"])], clock=clock,
                   http_client={"retry_attempts": 0}, circuit_breaker=TWO_STRIKES)
    upstream.script(*[Reply(500, {})] * 2)
    for _ in range(2):
        post(app, "gpt-test")
    assert ll(app)["circuit_breaker"]["state"] == "open"


def test_model_breakers_are_bounded_least_recently_used_dropped(litellm, upstream):
    """Client-chosen model names through a pattern: at most max_model_breakers are kept."""
    upstream.default = lambda r: Reply(500, {"error": {"message": "no"}})
    app = litellm(circuit_breaker={"failure_threshold": 1, "adaptive_thresholds": False,
                                   "max_model_breakers": 3})
    for i in range(6):
        assert post(app, f"ll-made-up-{i}").status_code == 502
    board = app.extensions["llm_proxy"].breakers
    assert set(ll(app)["model_breakers"]) == {"ll-made-up-3", "ll-made-up-4", "ll-made-up-5"}
    assert board.model("ll", "ll-made-up-0") is None
    assert ll(app)["circuit_breaker"]["state"] == "closed"


def test_a_long_model_name_is_kept_under_its_hash(litellm, upstream):
    upstream.default = lambda r: Reply(500, {"error": {"message": "no"}})
    app = litellm(circuit_breaker={"failure_threshold": 1, "adaptive_thresholds": False})
    post(app, "ll-" + "x" * 5000)
    [name] = ll(app)["model_breakers"]
    assert name.startswith("sha256:") and len(name) < 50


def test_model_breakers_are_shared_through_redis(make_app, upstream, redis_url, prefix):
    upstream.default = by_model
    clock = FakeClock()
    one, two = (make_app([provider(upstream.url, "ll", models=["ll-*"])], clock=clock,
                         http_client={"retry_attempts": 0}, circuit_breaker=TWO_STRIKES,
                         redis={"url": redis_url, "prefix": prefix, "timeout": 0.5})
                for _ in range(2))
    for _ in range(2):
        assert post(one, "ll-500").status_code == 502
    clock.advance(1)  # past the half second a process reuses what it read of shared state
    calls = upstream.calls
    assert post(two, "ll-500").status_code == 503
    assert upstream.calls == calls
    assert post(two, "ll-chat").status_code == 200
    assert ll(two)["circuit_breaker"]["state"] == "closed"


def test_a_success_of_the_model_answers_as_usual(litellm, upstream):
    upstream.default = lambda r: Reply(200, chat_completion(r.json()["model"], "fine"))
    app = litellm()
    assert post(app, "ll-chat").json["choices"][0]["message"]["content"] == "fine"
    assert ll(app)["model_breakers"] == {}
