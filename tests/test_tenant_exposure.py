"""What a tenant sees: no secret echoed by an upstream, only its own models, the providers and
/metrics behind keys in production, metric labels the proxy chose, log lines nobody can forge
(issue 16, defects 9, 10, 11)."""

from __future__ import annotations

import json
import logging
import re
import shlex

import pytest

from app import create_app
from settings import load_settings
from tests.anthropic_upstream import error_event, message, stream_events
from tests.conftest import provider
from tests.upstream import Reply, Stream, chat_chunks, chat_completion

UP_KEY = "sk-upstream-a-0123456789"  # the echoing provider's own key
OTHER_KEY = "sk-upstream-b-9876543210"  # another provider's key
ADMIN = "admin-key-0123456789"
TEAM_A, TEAM_B = "sk-team-a-0123456789abcdef", "sk-team-b-0123456789abcdef"
SECRETS = (UP_KEY, OTHER_KEY, ADMIN, TEAM_A, TEAM_B)
REDACTED = "[redacted]"


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def chat(content="hi", model="gpt-test", **extra):
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def echoed(recorded) -> str:
    """What an upstream that quotes its request puts in its answer: headers and body."""
    return f"you sent headers={recorded.headers} body={recorded.body.decode()}"


def escaped(text: str) -> str:
    """``text`` as a JSON string's inside with every character a \\u escape."""
    return "".join(f"\\u{ord(c):04x}" for c in text)


def echo_error(recorded):
    return Reply(status=400, body={"error": {"message": echoed(recorded),
                                             "type": "invalid_request_error"}})


def echo_answer(recorded):
    return Reply(body=chat_completion("gpt-test", echoed(recorded)))


def echo_stream(recorded):
    return Stream(chat_chunks("gpt-test", ["echo: ", echoed(recorded)]))


def echo_error_escaped(recorded):
    return Reply(status=400, raw=(
        '{"error": {"message": "' + escaped(echoed(recorded)) + '", '
        '"type": "invalid_request_error"}}').encode())


def echo_answer_escaped(recorded):
    answer = json.dumps(chat_completion("gpt-test", "PLACEHOLDER"))
    return Reply(raw=answer.replace("PLACEHOLDER", escaped(echoed(recorded))).encode())


def echo_stream_escaped(recorded):
    chunk = json.dumps(chat_chunks("gpt-test", ["PLACEHOLDER"])[0])
    return Stream([chunk.replace("PLACEHOLDER", escaped(echoed(recorded))).encode(),
                   *chat_chunks("gpt-test", [])])


@pytest.fixture
def shared_app(make_app, upstream, upstream_b, monkeypatch):
    """Two providers with keys, an admin key and two client keys from PROXY_API_KEYS."""
    monkeypatch.setenv("UP_KEY", UP_KEY)
    monkeypatch.setenv("OTHER_KEY", OTHER_KEY)
    return make_app([provider(upstream.url, api_key_env="UP_KEY"),
                     provider(upstream_b.url, "other", models=["other-model"],
                              api_key_env="OTHER_KEY")],
                    admin_api_key=ADMIN, http_client={"retry_attempts": 0},
                    auth={"api_keys_required": True,
                          "env_keys": f"team-a:{TEAM_A},team-b:{TEAM_B}"})


def assert_scrubbed(text):
    for secret in SECRETS:
        assert secret not in text, f"{secret} reached the client or a log"


# --- defect 9: every secret scrubbed from whatever an upstream sends back ------------------

@pytest.mark.parametrize("behaviours", [
    (echo_error, echo_answer, echo_stream),
    (echo_error_escaped, echo_answer_escaped, echo_stream_escaped),
], ids=["plain", "json-escaped"])
def test_an_upstream_echoing_its_request_shows_the_client_no_secret(
        shared_app, upstream, capsys, caplog, behaviours):
    """The upstream quotes its request's headers (its own key) and body, into which the client
    put every other secret it could know: each is [redacted] in the error, the answer and the
    stream, also where the upstream wrote it with JSON escapes; none is in a log line."""
    caplog.set_level(logging.DEBUG)
    upstream.script(*behaviours)
    leaked = f"other {OTHER_KEY}, admin {ADMIN}, mine {TEAM_A}, theirs {TEAM_B}"
    client = shared_app.test_client()
    answers = [client.post("/v1/chat/completions", json=chat(leaked), headers=bearer(TEAM_A)),
               client.post("/v1/chat/completions", json=chat(leaked), headers=bearer(TEAM_A)),
               client.post("/v1/chat/completions", json=chat(leaked, stream=True),
                           headers=bearer(TEAM_A))]
    assert [a.status_code for a in answers] == [400, 200, 200]
    assert upstream.requests[0].headers["Authorization"] == f"Bearer {UP_KEY}"
    for answer in answers:
        text = answer.get_data(as_text=True)
        answer.close()
        assert_scrubbed(text)
        assert text.count(REDACTED) >= len(SECRETS), text
    assert "other [redacted], admin [redacted], mine [redacted]" in answers[0].json["error"][
        "message"]
    assert_scrubbed(capsys.readouterr().out + caplog.text)


def test_an_anthropic_upstream_echoing_into_its_errors_shows_no_secret(
        make_app, upstream, monkeypatch, caplog):
    """An error built from upstream text, whole (400) and mid-stream (the SSE error event, and
    the log line that quotes it): the provider's x-api-key and the body's secrets scrubbed."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("UP_KEY", UP_KEY)

    def error_reply(recorded):
        return Reply(status=400, body={"type": "error", "error": {
            "type": "invalid_request_error", "message": echoed(recorded)}})

    def failing_stream(recorded):
        events = stream_events(message("partial"))[:3]
        error = error_event("overloaded_error", "PLACEHOLDER")  # the echo written \u-escaped
        return Stream([*events, error.replace(b"PLACEHOLDER", escaped(echoed(recorded)).encode())])

    upstream.script(error_reply, failing_stream)
    app = make_app([{"name": "claude", "type": "anthropic", "base_url": upstream.url,
                     "api_key_env": "UP_KEY", "models": ["claude-test"]}],
                   admin_api_key=ADMIN, auth={"env_keys": f"team-a:{TEAM_A}"})
    body = chat(f"admin {ADMIN} mine {TEAM_A}", model="claude-test")
    client = app.test_client()
    whole = client.post("/v1/chat/completions", json=body, headers=bearer(TEAM_A))
    stream = client.post("/v1/chat/completions", json={**body, "stream": True},
                         headers=bearer(TEAM_A))
    streamed = stream.get_data(as_text=True)
    stream.close()
    assert upstream.requests[0].headers["x-api-key"] == UP_KEY
    assert whole.status_code == 400 and REDACTED in whole.json["error"]["message"]
    assert "failed mid-stream" in streamed and REDACTED in streamed
    for text in (whole.get_data(as_text=True), streamed, caplog.text):
        assert UP_KEY not in text and ADMIN not in text and TEAM_A not in text


def test_the_key_a_client_presented_is_scrubbed_with_keys_off(make_app, upstream, capsys):
    """No client keys configured: the key an SDK sent (often a provider's own) is still
    scrubbed when the upstream echoes it back (the client put it in its prompt)."""
    own = "sk-client-own-provider-key-123456"
    upstream.script(echo_answer)
    app = make_app([provider(upstream.url)])
    response = app.test_client().post("/v1/chat/completions", json=chat(f"my key is {own}"),
                                      headers=bearer(own))
    assert response.status_code == 200
    assert own not in response.get_data(as_text=True)
    assert f"my key is {REDACTED}" in response.json["choices"][0]["message"]["content"]


def test_a_key_configured_by_its_hash_is_scrubbed_from_its_own_answers(tenants_app, upstream):
    """A key in auth.api_keys is known to the proxy only while a client presents it."""
    upstream.script(echo_answer, echo_answer)
    client = tenants_app.test_client()
    for _ in range(2):  # the second time from the scrubber kept for the key
        response = client.post("/v1/chat/completions", json=chat(f"mine {TEAM_A}"),
                               headers=bearer(TEAM_A))
        assert response.status_code == 200
        assert f"mine {REDACTED}" in response.json["choices"][0]["message"]["content"]
        assert TEAM_A not in response.get_data(as_text=True)


def test_text_that_only_looks_like_a_secret_is_left_alone(shared_app, upstream):
    """Nothing to scrub: the answer is relayed byte for byte (shorter prefixes of a key, the
    other keys' ids, escapes of other characters)."""
    content = f"sk-upstream-a- and team-a, caf\\u00e9 {UP_KEY[:-1]}"
    raw = json.dumps(chat_completion("gpt-test", "X")).replace('"X"', f'"{content}"').encode()
    upstream.script(Reply(raw=raw))
    response = shared_app.test_client().post("/v1/chat/completions", json=chat(),
                                             headers=bearer(TEAM_A))
    assert response.status_code == 200 and response.get_data() == raw


# --- defect 10: models, providers and metrics -----------------------------------------------

@pytest.fixture
def tenants_app(make_app, upstream):
    return make_app([provider(upstream.url, models=["gpt-test", "gpt-other", "claude-x"])],
                    admin_api_key=ADMIN,
                    auth={"api_keys_required": True,
                          "api_keys": [{"id": "team-a", "sha256": _sha(TEAM_A),
                                        "models": ["gpt-*"]},
                                       {"id": "team-b", "sha256": _sha(TEAM_B)}]})


def _sha(key):
    import hashlib
    return hashlib.sha256(key.encode()).hexdigest()


def test_a_key_lists_only_the_models_it_may_use(tenants_app):
    client = tenants_app.test_client()
    for path in ("/v1/models", "/models"):
        a = [m["id"] for m in client.get(path, headers=bearer(TEAM_A)).json["data"]]
        b = [m["id"] for m in client.get(path, headers=bearer(TEAM_B)).json["data"]]
        assert a == ["gpt-other", "gpt-test"]
        assert b == ["claude-x", "gpt-other", "gpt-test"]  # no allow-list: every model
    hidden = client.get("/v1/models/claude-x", headers=bearer(TEAM_A))
    absent = client.get("/v1/models/claude-nothing", headers=bearer(TEAM_A))
    assert hidden.status_code == absent.status_code == 404
    assert hidden.json["error"]["message"].replace("claude-x", "M") == \
        absent.json["error"]["message"].replace("claude-nothing", "M")
    assert client.get("/v1/models/claude-x", headers=bearer(TEAM_B)).status_code == 200
    assert client.get("/v1/models/gpt-test", headers=bearer(TEAM_A)).status_code == 200


def test_an_unknown_model_names_no_model_the_key_may_not_use(tenants_app):
    client = tenants_app.test_client()
    a = client.post("/v1/chat/completions", json=chat(model="gpt-nothing"),
                    headers=bearer(TEAM_A))
    assert a.status_code == 404 and a.json["error"]["code"] == "model_not_found"
    assert "claude-x" not in a.json["error"]["message"]
    assert "/v1/models" in a.json["error"]["message"]
    b = client.post("/v1/chat/completions", json=chat(model="gpt-nothing", stream=True),
                    headers=bearer(TEAM_A))
    assert b.status_code == 404 and "claude-x" not in b.get_data(as_text=True)
    # a key allowed every model is told every model, as before
    c = client.post("/v1/chat/completions", json=chat(model="gpt-nothing"),
                    headers=bearer(TEAM_B))
    assert c.status_code == 404 and "claude-x" in c.json["error"]["message"]


def test_the_anonymous_tenant_lists_only_the_default_allow_list(make_app, upstream):
    app = make_app([provider(upstream.url, models=["gpt-test", "claude-x"])],
                   auth={"models": ["claude-*"]})
    data = app.test_client().get("/v1/models").json["data"]
    assert [m["id"] for m in data] == ["claude-x"]


def production(tmp_path, monkeypatch, **environ):
    """An app built as a production deployment is: the profile, from the environment only."""
    monkeypatch.chdir(tmp_path)  # no config.yaml of the checkout's
    settings = load_settings({"ENVIRONMENT": "production", "DATABASE_ENABLED": "false",
                              "PROXY_API_KEYS": f"team-a:{TEAM_A}", **environ})
    app = create_app(settings)
    app.testing = True
    return app


@pytest.fixture
def production_app(tmp_path, monkeypatch):
    app = production(tmp_path, monkeypatch, ADMIN_API_KEY=ADMIN)
    yield app
    app.extensions["llm_proxy"].close()


def test_production_shows_providers_to_the_admin_key_only(production_app):
    settings = production_app.extensions["llm_proxy"].settings
    assert settings.auth.providers_require_admin and settings.auth.metrics_require_key
    client = production_app.test_client()
    assert client.get("/providers").status_code == 401
    refused = client.get("/providers", headers=bearer(TEAM_A))
    assert refused.status_code == 401 and refused.json["error"]["code"] == "invalid_admin_key"
    assert "mock-model" not in refused.get_data(as_text=True)
    answer = client.get("/providers", headers=bearer(ADMIN))
    assert answer.status_code == 200 and answer.json["providers"][0]["name"] == "mock"


def test_production_without_an_admin_key_shows_the_providers_to_nobody(tmp_path, monkeypatch):
    app = production(tmp_path, monkeypatch)
    try:
        refused = app.test_client().get("/providers", headers=bearer(TEAM_A))
        assert refused.status_code == 403 and refused.json["error"]["code"] == "admin_disabled"
    finally:
        app.extensions["llm_proxy"].close()


def test_production_metrics_need_a_key(production_app):
    client = production_app.test_client()
    client.post("/v1/chat/completions", json=chat(model="mock-model"), headers=bearer(TEAM_A))
    missing = client.get("/metrics")
    assert missing.status_code == 401 and "llm_proxy" not in missing.get_data(as_text=True)
    assert client.get("/metrics?format=json").status_code == 401
    for key in (TEAM_A, ADMIN):
        scraped = client.get("/metrics", headers=bearer(key))
        assert scraped.status_code == 200 and b"llm_proxy_breaker_state" in scraped.data


def test_development_keeps_providers_and_metrics_open_to_clients(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = create_app(load_settings({"PROXY_API_KEYS": f"team-a:{TEAM_A}",
                                    "ADMIN_API_KEY": ADMIN, "DATABASE_ENABLED": "false"}))
    try:
        client = app.test_client()
        # as the OpenAI routes: a client key (or none, keys not being required), not a wrong one
        assert client.get("/providers", headers=bearer("sk-wrong-0123456789")).status_code == 401
        assert client.get("/providers", headers=bearer(TEAM_A)).status_code == 200
        assert client.get("/providers", headers=bearer(ADMIN)).status_code == 200
        assert client.get("/metrics").status_code == 200
    finally:
        app.extensions["llm_proxy"].close()


def test_metric_model_labels_carry_only_names_the_proxy_serves(make_app, upstream):
    """A pattern provider answers any name a client makes up: its tokens are labelled by the
    pattern that took it, never by the made-up name."""
    app = make_app([provider(upstream.url, models=["gpt-test", "gpt-*"])],
                   routing={"model_refresh_interval": 0})
    client = app.test_client()
    made_up = "gpt-made-up-by-a-client"
    for model in ("gpt-test", made_up):
        response = client.post("/v1/chat/completions", json=chat(model=model))
        response.close()  # the metrics are counted once the answer is done
        assert response.status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    tokens = [line for line in text.splitlines() if line.startswith("llm_proxy_tokens_total")]
    assert any('model="gpt-test"' in line for line in tokens)
    assert any('model="gpt-*"' in line for line in tokens)
    assert made_up not in text


def test_a_made_up_model_name_whose_breaker_opened_is_named_nowhere_others_read(make_app,
                                                                             upstream):
    """A pattern provider whose upstream fails any name opens a breaker for each name a client
    makes up: /health (read without a key) counts them without naming them, /metrics labels
    them by the pattern that took them, as its other model labels."""
    upstream.default = lambda recorded: Reply(500, {"error": {"message": "down"}})
    app = make_app([provider(upstream.url, models=["gpt-test", "gpt-*"])],
                   routing={"model_refresh_interval": 0}, http_client={"retry_attempts": 0},
                   circuit_breaker={"failure_threshold": 2, "adaptive_thresholds": False})
    client = app.test_client()
    made_up = ("gpt-acme-merger-finetune", "gpt-acme-layoffs")
    for model in made_up:
        for _ in range(2):
            client.post("/v1/chat/completions", json=chat(model=model)).close()
    health = client.get("/health")
    assert health.json["checks"]["circuit_breakers"]["open_models"] == {"up": 2}
    text = client.get("/metrics").get_data(as_text=True)
    views = (health.get_data(as_text=True), text,
             client.get("/metrics?format=json").get_data(as_text=True))
    assert not [model for model in made_up for view in views if model in view]
    series = [line for line in text.splitlines()
              if line.startswith("llm_proxy_model_breaker_state{")]
    assert series == ['llm_proxy_model_breaker_state{model="gpt-*",provider="up"} 2.0']
    assert client.get("/providers").json["providers"][0]["model_breakers"].keys() == set(made_up)


def test_a_model_no_pattern_takes_is_labelled_other(make_app):
    app = make_app([{"name": "m", "type": "mock", "models": ["mock-model"]}])
    metrics = app.extensions["llm_proxy"].metrics
    assert metrics._model_label("mock-model") == "mock-model"
    assert metrics._model_label("x\ny") == "other"


# --- defect 11: the text access log cannot be forged -----------------------------------------

FORGED = " key_id=team-a path=/debug/cache/clear status=200"


@pytest.mark.parametrize("model", [
    "m\n" + FORGED.strip(), "m\r\n" + FORGED.strip(), "m\x1b[2K\r" + FORGED.strip(),
    "m" + FORGED, "m=1 key_id=team-a", 'm" key_id="team-a', "m\\\" key_id=team-a",
    "m\u2028" + FORGED.strip(), "m\x85" + FORGED.strip(),
])
def test_a_model_name_cannot_forge_a_text_access_log_line(tenants_app_text, capsys, model):
    capsys.readouterr()
    response = tenants_app_text.test_client().post("/v1/chat/completions", json=chat(model=model),
                                                   headers=bearer(TEAM_B))
    response.close()  # the line is written once the answer is done
    assert response.status_code == 404
    out = capsys.readouterr().out
    lines = out.split("\n")
    assert lines[-1] == "" and len(lines) == 2, out  # one line, ended by its own newline
    (line,) = lines[:-1]
    assert not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", line), line
    fields = parse(line)
    assert fields["key_id"] == "team-b" and fields["path"] == "/v1/chat/completions"
    assert fields["status"] == "404"
    assert decoded(fields["model"]) == model


def test_a_path_cannot_forge_a_text_access_log_line(tenants_app_text, capsys):
    capsys.readouterr()
    tenants_app_text.test_client().get("/v1/nothing%0A" + FORGED.replace(" ", "%20")).close()
    (line,) = capsys.readouterr().out.splitlines()
    fields = parse(line)
    assert fields["status"] == "404" and fields["key_id"] == "anonymous"
    assert fields["path"].startswith("/v1/nothing\\n")


def test_the_json_access_log_is_one_line_whatever_the_model(tenants_app, capsys):
    """JSON escapes control characters by itself; the line breaks of some readers (U+2028,
    U+2029, NEL) that JSON may hold unescaped are escaped too."""
    model = "m\n\r\x1b\x9b2J\u2028\u2029\x85 =" + FORGED
    capsys.readouterr()
    tenants_app.test_client().post("/v1/chat/completions", json=chat(model=model),
                                   headers=bearer(TEAM_B)).close()
    (line,) = capsys.readouterr().out.splitlines()  # splitlines: every kind of line break
    assert not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", line), line
    entry = json.loads(line)
    assert entry["model"] == model and entry["key_id"] == "team-b"


@pytest.fixture
def tenants_app_text(make_app, upstream):
    return make_app([provider(upstream.url)], observability={"access_log_format": "text"},
                    auth={"api_keys": [{"id": "team-b", "sha256": _sha(TEAM_B)}]})


def parse(line: str) -> dict:
    """The text format's pairs, read as a shell reads words (quotes group, backslash escapes);
    each key once."""
    fields = {}
    for word in shlex.split(line, posix=True):
        key, sep, value = word.partition("=")
        assert sep and key not in fields, (word, line)
        fields[key] = value
    return fields


def decoded(value: str) -> str:
    """A quoted value's escapes undone (shlex kept \\n, \\xNN and \\uNNNN as written)."""
    return re.sub(r"\\(n|r|t|x[0-9a-f]{2}|u[0-9a-f]{4})",
                  lambda m: {"n": "\n", "r": "\r", "t": "\t"}.get(m.group(1))
                  or chr(int(m.group(1)[1:], 16)), value)
