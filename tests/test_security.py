"""Security through HTTP: client keys, the admin key, rate limits per key, hardened input."""

import concurrent.futures
import hashlib
import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from app.validation import MAX_DEPTH
from tests.anthropic_upstream import anthropic_answer
from tests.conftest import FakeClock, live_server, provider, wait_for_calls
from tests.upstream import FakeUpstream, Hang, Reply, chat_completion

KEY_A, KEY_B, ADMIN = "sk-alpha-0123456789abcdef", "sk-bravo-0123456789abcdef", "admin-key-xyz-123"
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


def sha(key):
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def app(make_app, upstream, clock):
    return make_app(
        [provider(upstream.url, models=["gpt-test", "gpt-other", "emb"])], clock=clock,
        admin_api_key=ADMIN,
        auth={"api_keys_required": True, "requests_per_minute": 3,
              "api_keys": [{"id": "alpha", "sha256": sha(KEY_A)},
                           {"id": "bravo", "sha256": sha(KEY_B), "models": ["gpt-test"],
                            "requests_per_minute": 0, "tokens_per_minute": 10}]})


def post(app, body=CHAT, headers=None, path="/v1/chat/completions"):
    response = app.test_client().post(path, json=body, headers=headers or {})
    response.close()
    return response


@pytest.mark.parametrize("method,path", [("POST", "/v1/chat/completions"),
                                         ("POST", "/v1/embeddings"), ("GET", "/v1/models"),
                                         ("GET", "/models"), ("GET", "/providers")])
def test_client_routes_need_a_valid_key(app, method, path):
    client = app.test_client()
    body = {"model": "emb", "input": "x"} if "embeddings" in path else CHAT
    kwargs = {"json": body} if method == "POST" else {}
    missing = client.open(path, method=method, **kwargs)
    assert missing.status_code == 401 and missing.json["error"]["code"] == "missing_api_key"
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = client.open(path, method=method, headers=bearer("sk-wrong-0000000000"), **kwargs)
    assert wrong.status_code == 401 and wrong.json["error"]["code"] == "invalid_api_key"
    assert client.open(path, method=method, headers=bearer(KEY_A), **kwargs).status_code == 200
    assert client.open(path, method=method, headers={"X-API-Key": KEY_A},
                       **kwargs).status_code == 200


def test_probes_never_need_a_key_and_debug_needs_the_admin_key(app):
    client = app.test_client()
    assert client.get("/health/live").status_code == 200
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200  # scrapers work by default
    reset = "/debug/circuit-breakers/reset"
    assert client.post(reset, headers=bearer(KEY_A)).status_code == 401  # a client key is not it
    assert client.post(reset, headers=bearer(ADMIN)).status_code == 200
    assert client.post("/v1/chat/completions", json=CHAT, headers=bearer(ADMIN)).status_code == 401


def test_metrics_can_require_a_key(make_app, upstream):
    app = make_app([provider(upstream.url)], admin_api_key=ADMIN,
                   auth={"metrics_require_key": True,
                         "api_keys": [{"id": "alpha", "sha256": sha(KEY_A)}]})
    client = app.test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=bearer(KEY_A)).status_code == 200
    assert client.get("/metrics", headers=bearer(ADMIN)).status_code == 200
    assert client.get("/health/live").status_code == 200


def test_without_required_keys_a_request_without_a_key_is_anonymous(make_app, upstream):
    app = make_app([provider(upstream.url)],
                   auth={"api_keys": [{"id": "alpha", "sha256": sha(KEY_A)}]})
    assert post(app).status_code == 200
    assert post(app, headers=bearer("sk-unknown-000000000")).status_code == 401


def test_a_key_may_be_limited_to_some_models(app):
    assert post(app, {**CHAT, "model": "gpt-other"}, bearer(KEY_A)).status_code == 200
    response = post(app, {**CHAT, "model": "gpt-other"}, bearer(KEY_B))
    assert response.status_code == 403
    assert response.json["error"]["code"] == "model_not_allowed"
    assert "gpt-other" in response.json["error"]["message"]


def test_keys_from_the_environment_are_hashed_at_load(make_app, upstream):
    app = make_app([provider(upstream.url)],
                   auth={"api_keys_required": True, "env_keys": f"ci:{KEY_A}"})
    assert post(app, headers=bearer(KEY_A)).status_code == 200
    assert KEY_A not in repr(app.extensions["llm_proxy"].settings)


def test_the_request_limit_is_exact_at_its_edge(app, clock):
    for i in range(3):
        response = post(app, headers=bearer(KEY_A))
        assert response.status_code == 200
        assert response.headers["X-RateLimit-Limit"] == "3"
        assert response.headers["X-RateLimit-Remaining"] == str(2 - i)
    refused = post(app, headers=bearer(KEY_A))
    assert refused.status_code == 429
    assert refused.json["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["Retry-After"] == "20"  # 3 a minute: one every 20 s
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert post(app, headers=bearer(KEY_B)).status_code == 200  # another key, its own budget
    clock.advance(19.9)
    assert post(app, headers=bearer(KEY_A)).status_code == 429
    clock.advance(0.1)
    assert post(app, headers=bearer(KEY_A)).status_code == 200


def test_tokens_are_charged_from_the_upstreams_usage(app, upstream):
    # bravo: 10 tokens a minute; each answer uses 8 (the fake upstream's usage). A request
    # reserves its estimate (at most the whole limit) and is settled to the usage at the end.
    assert post(app, headers=bearer(KEY_B)).status_code == 200  # reserved 10, used 8
    second = post(app, headers=bearer(KEY_B))
    assert second.status_code == 429 and upstream.calls == 1  # 2 left, fewer than it reserves
    assert "and 2 are left" in second.json["error"]["message"]


def test_concurrent_clients_are_never_over_admitted(make_app, upstream, clock):
    app = make_app([provider(upstream.url)], clock=clock,
                   auth={"api_keys_required": True, "requests_per_minute": 10,
                         "api_keys": [{"id": "alpha", "sha256": sha(KEY_A)}]})
    with live_server(app, threads=16) as url:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(lambda _: requests.post(
                url + "/v1/chat/completions", json=CHAT, headers=bearer(KEY_A), timeout=10
            ).status_code, range(40)))
    assert codes.count(200) == 10 and codes.count(429) == 30


def test_requests_in_flight_per_key_are_limited(make_app, upstream):
    upstream.default = lambda r: Hang(10.0)
    app = make_app([provider(upstream.url)], http_client={"timeout": 15},
                   auth={"api_keys": [{"id": "alpha", "sha256": sha(KEY_A), "max_in_flight": 1}]})
    with live_server(app, threads=8) as url:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            parked = pool.submit(requests.post, url + "/v1/chat/completions", json=CHAT,
                                 headers=bearer(KEY_A), timeout=20)
            wait_for_calls(upstream, 1)
            second = requests.post(url + "/v1/chat/completions", json=CHAT, headers=bearer(KEY_A),
                                   timeout=5)
            upstream.stopping.set()
            parked.result()
    assert second.status_code == 429
    assert second.json()["error"]["code"] == "too_many_concurrent_requests"


def test_secrets_never_reach_responses_logs_or_metrics(app, upstream, capsys, monkeypatch):
    monkeypatch.setenv("UP_KEY", "sk-provider-secret-42")
    post(app, headers=bearer(KEY_A))
    post(app, headers=bearer("sk-wrong-key-000000"))
    client = app.test_client()
    seen = [client.get("/metrics").get_data(as_text=True),
            client.get("/metrics?format=json").get_data(as_text=True),
            client.get("/providers", headers=bearer(KEY_A)).get_data(as_text=True),
            client.get("/health").get_data(as_text=True),
            post(app, headers=bearer("sk-wrong-key-000000")).get_data(as_text=True),
            capsys.readouterr().out]
    for text in seen:
        for secret in (KEY_A, KEY_B, ADMIN, "sk-wrong-key-000000", "sk-provider-secret-42"):
            assert secret not in text
    assert '"key_id":"alpha"' in seen[-1]


def test_client_credentials_cookies_and_hop_by_hop_headers_are_not_forwarded(make_app, upstream):
    app = make_app([provider(upstream.url)])
    post(app, headers={"Authorization": "Bearer client-secret", "Cookie": "s=1",
                       "Connection": "keep-alive, X-Private", "X-Private": "1",
                       "Proxy-Authorization": "Basic x", "Host": "evil.example"})
    sent = {k.lower() for k in upstream.requests[0].headers}
    assert not sent & {"cookie", "proxy-authorization", "x-private"}
    assert upstream.requests[0].headers.get("Host", "").startswith("127.0.0.1")
    assert "client-secret" not in json.dumps(upstream.requests[0].headers)


def test_upstream_cookies_never_reach_the_client(make_app, upstream):
    upstream.script(Reply(200, chat_completion("gpt-test", "x"),
                          headers={"Set-Cookie": "tracker=1", "X-Upstream-Internal": "1"}))
    app = make_app([provider(upstream.url)])
    response = post(app)
    assert "Set-Cookie" not in response.headers and "X-Upstream-Internal" not in response.headers


def test_a_client_cannot_choose_the_upstream(make_app, upstream, upstream_b):
    app = make_app([provider(upstream.url)])
    body = {**CHAT, "base_url": upstream_b.url, "api_base": upstream_b.url}
    assert post(app, body).status_code == 200
    assert upstream.calls == 1 and upstream_b.calls == 0


def test_deeply_nested_json_is_a_400(make_app, upstream):
    app = make_app([provider(upstream.url)])
    raw = b'{"model": "gpt-test", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    response = app.test_client().post("/v1/chat/completions", data=raw)
    assert response.status_code == 400 and upstream.calls == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["model", "messages", "prompt", "input", "stream",
                                       "role", "content", "temperature", "tools", "n", "x"]),
                      children, max_size=5),
    max_leaves=20)


@pytest.fixture(scope="module")
def fuzz_app():
    from app import create_app
    from tests.conftest import settings_of
    app = create_app(settings_of({"providers": [
        {"name": "m", "type": "mock", "models": ["gpt-test", "m"]}]}))
    yield app
    app.extensions["llm_proxy"].close()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200)))
def test_arbitrary_bodies_never_cause_a_500_or_a_non_json_error(fuzz_app, path, body):
    response = fuzz_app.test_client().post(path, data=body)
    data = response.get_data()
    response.close()
    assert response.status_code < 500, data
    if response.status_code >= 400:
        error = json.loads(data)["error"]
        assert set(error) == {"message", "type", "param", "code"}


def nested_chat(depth, model="gpt-test"):
    """A chat body whose one message's content is ``depth`` arrays deep (the body: depth + 3)."""
    content = b"[" * depth + b"]" * depth
    return b'{"model": "%s", "messages": [{"role": "user", "content": %s}]}' % (
        model.encode(), content)


NESTING_SETUPS = {  # each re-serialises the body: a cache key, an alias rewrite
    "plain": ({}, "gpt-test"),
    "cache": ({"cache": {"enabled": True}}, "gpt-test"),
    "alias": ({}, "alias-x"),
}


@pytest.mark.parametrize("setup", NESTING_SETUPS)
@pytest.mark.parametrize("depth", [200, 252, 300, 1021])
def test_json_nested_deeper_than_the_proxy_can_reserialise_is_a_400(make_app, upstream, setup,
                                                                   depth):
    """orjson parses 1024 levels but writes only about 254: such bodies are refused at once."""
    sections, model = NESTING_SETUPS[setup]
    app = make_app([provider(upstream.url, aliases={"alias-x": "gpt-test"})], **sections)
    response = app.test_client().post("/v1/chat/completions", data=nested_chat(depth, model))
    assert response.status_code == 400, response.data
    error = response.json["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_json" and str(MAX_DEPTH) in error["message"]
    assert upstream.calls == 0


@pytest.mark.parametrize("setup", NESTING_SETUPS)
def test_the_nesting_limit_is_exact_at_its_edge(make_app, upstream, setup):
    """A body MAX_DEPTH levels deep is served; one level more is refused."""
    sections, model = NESTING_SETUPS[setup]
    app = make_app([provider(upstream.url, aliases={"alias-x": "gpt-test"})], **sections)
    client = app.test_client()
    served = client.post("/v1/chat/completions", data=nested_chat(MAX_DEPTH - 3, model))
    assert served.status_code == 200, served.data
    refused = client.post("/v1/chat/completions", data=nested_chat(MAX_DEPTH - 2, model))
    assert refused.status_code == 400 and refused.json["error"]["code"] == "invalid_json"
    assert upstream.calls == 1


def test_tool_arguments_nested_too_deep_for_anthropic_are_a_400(make_app):
    """The Anthropic translation parses a tool call's arguments string into the new body."""
    with FakeUpstream(default=anthropic_answer) as fake:
        app = make_app([{"name": "claude", "type": "anthropic", "base_url": fake.url,
                         "models": ["claude-test"]}])
        arguments = '{"a": ' * 300 + "1" + "}" * 300
        body = {"model": "claude-test", "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "t1", "type": "function",
                 "function": {"name": "f", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "t1", "content": "ok"}]}
        response = app.test_client().post("/v1/chat/completions", json=body)
        assert response.status_code == 400, response.data
        assert set(response.json["error"]) == {"message", "type", "param", "code"}
        assert fake.calls == 0
