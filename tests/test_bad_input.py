"""Bad input gets the right status and an OpenAI-style error naming what is wrong."""

import pytest

from tests.conftest import provider

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def client(make_app, upstream):
    app = make_app([provider(upstream.url, models=["gpt-test", "emb"])],
                   server={"max_request_body_mb": 0.01})
    return app.test_client()


def assert_error(response, status, param=None, code=None):
    assert response.status_code == status
    assert response.mimetype == "application/json"
    error = response.json["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert "Traceback" not in response.get_data(as_text=True)
    return error


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_legacy_client_without_json_content_type_is_served(client, content_type, upstream):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/v1/chat/completions", data=b'{"model":"gpt-test","messages":'
                           b'[{"role":"user","content":"hi"}]}', headers=headers)
    assert response.status_code == 200
    assert upstream.calls == 1


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions"])
def test_both_prefixes_are_served(client, path):
    assert client.post(path, json=CHAT).status_code == 200


@pytest.mark.parametrize("raw", [b"", b"{", b"[1,2]", b"null", b"\xff\xfe"])
def test_a_body_that_is_not_a_json_object_is_a_400(client, raw, upstream):
    assert_error(client.post("/v1/chat/completions", data=raw), 400)
    assert upstream.calls == 0


@pytest.mark.parametrize("field,value", [
    ("messages", "hi"), ("model", 3), ("temperature", "hot"), ("stream", "yes"),
    ("max_tokens", 1.5), ("n", True), ("stop", 5), ("tools", {}),
])
def test_a_known_field_of_the_wrong_type_is_named(client, field, value):
    error = assert_error(client.post("/v1/chat/completions", json={**CHAT, field: value}), 400,
                         param=field, code="invalid_type")
    assert field in error["message"]


@pytest.mark.parametrize("missing", ["model", "messages"])
def test_a_missing_required_field_is_named(client, missing):
    body = {k: v for k, v in CHAT.items() if k != missing}
    assert_error(client.post("/v1/chat/completions", json=body), 400, param=missing)


def test_a_message_without_a_role_is_named(client):
    body = {**CHAT, "messages": [{"content": "hi"}]}
    assert_error(client.post("/v1/chat/completions", json=body), 400, param="messages[0].role")


def test_an_empty_message_list_is_refused(client):
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "messages": []}), 400,
                 param="messages")


def test_unknown_fields_are_passed_through(client, upstream):
    response = client.post("/v1/chat/completions", json={**CHAT, "brand_new_param": {"x": 1}})
    assert response.status_code == 200
    assert upstream.requests[0].json()["brand_new_param"] == {"x": 1}


def test_null_optional_fields_are_accepted(client):
    assert client.post("/v1/chat/completions", json={**CHAT, "temperature": None}).status_code == 200


def test_embeddings_need_an_input(client):
    assert_error(client.post("/v1/embeddings", json={"model": "emb"}), 400, param="input")


def test_unknown_model_is_a_404(client):
    error = assert_error(client.post("/v1/chat/completions", json={**CHAT, "model": "x"}), 404,
                         param="model", code="model_not_found")
    assert "gpt-test" in error["message"]


def test_a_body_past_the_limit_is_a_413(client, upstream):
    body = {**CHAT, "messages": [{"role": "user", "content": "x" * 20000}]}
    assert_error(client.post("/v1/chat/completions", json=body), 413, code="payload_too_large")
    assert upstream.calls == 0


def test_wrong_method_is_a_405(client):
    response = client.get("/v1/chat/completions")
    assert_error(response, 405)
    assert "POST" in response.headers["Allow"]


def test_unknown_path_is_a_404(client):
    assert_error(client.post("/v1/nothing-here", json=CHAT), 404)


def test_providers_lists_each_provider(make_app, upstream):
    app = make_app([provider(upstream.url, "a", priority=3, aliases={"f": "gpt-test"}),
                    {"name": "m", "type": "mock", "models": ["mock-model"], "enabled": False}])
    data = app.test_client().get("/providers").json["providers"]
    keys = ("name", "type", "models", "aliases", "enabled", "priority")
    assert [{k: p[k] for k in keys} for p in data] == [
        {"name": "a", "type": "openai", "models": ["gpt-test"], "aliases": {"f": "gpt-test"},
         "enabled": True, "priority": 3},
        {"name": "m", "type": "mock", "models": ["mock-model"], "aliases": {}, "enabled": False,
         "priority": 100}]


def test_models_leave_out_disabled_providers(make_app, upstream):
    app = make_app([provider(upstream.url, "a"),
                    {"name": "m", "type": "mock", "models": ["hidden"], "enabled": False}])
    ids = [m["id"] for m in app.test_client().get("/models").json["data"]]
    assert ids == ["gpt-test"]
