"""Client API keys: headers, hashed and plain keys, anonymous access, model allow-lists, config
errors, the new-key command, and secrets kept out of messages."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from flask import Flask, jsonify, request

from app.api import error_response
from app.auth import KeyRecord, KeyStore, Tenant, hash_key
from app.errors import AuthError, ModelForbidden, ProxyError
from settings import parse_client_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY_A = "sk-proxy-aaaaaaaaaaaaaaaaaaaaaaaaaaaa"
KEY_B = "sk-proxy-bbbbbbbbbbbbbbbbbbbbbbbbbbbb"
ENV_KEY = "sk-proxy-from-the-environment-0001"


def entry(key_id="team-a", key=KEY_A, **fields):
    return {"id": key_id, "sha256": hashlib.sha256(key.encode()).hexdigest(), **fields}


def store(entries=(), env=None, *, required=True, defaults=None):
    return KeyStore.from_keys(parse_client_keys(list(entries), env, required=required,
                                                defaults=defaults))


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def refused(keys, headers) -> AuthError:
    with pytest.raises(AuthError) as caught:
        keys.authenticate(headers)
    return caught.value


@pytest.fixture
def client():
    """A Flask app that authenticates each request the way the proxy will, and answers its id."""
    keys = store([entry(models=["gpt-4o*"])], required=False,
                 defaults={"requests_per_minute": 5})
    app = Flask(__name__)
    app.register_error_handler(ProxyError, error_response)

    @app.post("/v1/chat/completions")
    def chat():
        tenant = keys.authenticate(request.headers)
        tenant.check_model(request.json["model"])
        return jsonify(id=tenant.id, rpm=tenant.requests_per_minute)

    return app.test_client()


# -- headers over HTTP --------------------------------------------------------------------------

def test_bearer_key_over_http_identifies_the_tenant(client):
    response = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini"},
                           headers=bearer(KEY_A))
    assert response.status_code == 200
    assert response.json == {"id": "team-a", "rpm": 5}


def test_x_api_key_header_over_http_is_case_insensitive(client):
    response = client.post("/v1/chat/completions", json={"model": "gpt-4o"},
                           headers={"x-api-key": KEY_A})
    assert response.json["id"] == "team-a"


def test_unknown_key_over_http_is_401_with_a_bearer_challenge(client):
    response = client.post("/v1/chat/completions", json={"model": "gpt-4o"},
                           headers=bearer("sk-proxy-not-a-configured-key-000"))
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    error = response.json["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
    assert "sk-proxy-not" not in response.get_data(as_text=True)


def test_forbidden_model_over_http_is_403_naming_the_model(client):
    response = client.post("/v1/chat/completions", json={"model": "claude-3-opus"},
                           headers=bearer(KEY_A))
    assert response.status_code == 403
    error = response.json["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "permission_error", "model_not_allowed", "model")
    assert "claude-3-opus" in error["message"]
    assert KEY_A not in response.get_data(as_text=True)


def test_no_key_over_http_is_anonymous_with_the_default_limits_when_not_required(client):
    response = client.post("/v1/chat/completions", json={"model": "anything"})
    assert response.json == {"id": "anonymous", "rpm": 5}


# -- which header -------------------------------------------------------------------------------

def test_bearer_scheme_is_case_insensitive_and_spaces_are_trimmed():
    keys = store([entry()])
    assert keys.authenticate({"Authorization": f"bearer   {KEY_A} "}).id == "team-a"


def test_both_headers_with_the_same_key_are_accepted():
    keys = store([entry()])
    assert keys.authenticate({**bearer(KEY_A), "X-API-Key": KEY_A}).id == "team-a"


def test_both_headers_with_different_keys_are_refused():
    keys = store([entry(), entry("team-b", KEY_B)])
    error = refused(keys, {**bearer(KEY_A), "X-API-Key": KEY_B})
    assert error.code == "invalid_api_key"


def test_another_authorization_scheme_is_refused_without_echoing_it():
    keys = store([entry()], required=False)
    error = refused(keys, {"Authorization": "Basic dXNlcjpzZWNyZXQ="})
    assert error.code == "invalid_api_key"
    assert "dXNlcjpzZWNyZXQ" not in str(error)


# -- required or not ----------------------------------------------------------------------------

def test_missing_key_is_401_missing_api_key_when_required():
    keys = store([entry()])
    for headers in ({}, {"Authorization": "Bearer "}, {"X-API-Key": "  "}):
        error = refused(keys, headers)
        assert (error.status, error.type, error.code) == (
            401, "authentication_error", "missing_api_key")
        assert error.headers == {"WWW-Authenticate": "Bearer"}


def test_unknown_key_is_401_even_when_keys_are_not_required():
    keys = store([entry()], required=False)
    assert refused(keys, bearer(KEY_B)).code == "invalid_api_key"
    assert refused(keys, {"X-API-Key": KEY_B}).code == "invalid_api_key"


def test_anonymous_tenant_gets_the_defaults_including_the_model_list():
    keys = store([entry()], required=False,
                 defaults={"models": ["mock-*"], "tokens_per_minute": 1000, "max_in_flight": 2})
    tenant = keys.authenticate({})
    assert tenant == Tenant("anonymous", ("mock-*",), None, 1000, 2, anonymous=True)
    tenant.check_model("mock-model")
    with pytest.raises(ModelForbidden):
        tenant.check_model("gpt-4o")


def test_with_no_keys_configured_and_not_required_any_key_is_ignored():
    """Deployments without keys keep working: OpenAI SDKs always send some key."""
    keys = store([], required=False)
    assert not keys.enabled
    assert keys.authenticate(bearer("sk-some-provider-key")).anonymous


def test_required_with_no_keys_configured_is_a_config_error():
    with pytest.raises(ValueError, match="required but none is configured"):
        store([], "", required=True)


# -- where keys come from -----------------------------------------------------------------------

def test_hashed_key_from_config_carries_its_own_limits_and_inherits_the_rest():
    keys = store([entry(requests_per_minute=10, max_in_flight=0)],
                 defaults={"requests_per_minute": 60, "tokens_per_minute": 5000,
                           "max_in_flight": 4})
    tenant = keys.authenticate(bearer(KEY_A))
    assert tenant == Tenant("team-a", (), 10, 5000, 0)  # max_in_flight 0: unlimited


def test_uppercase_hex_digest_is_accepted():
    keys = store([{"id": "a", "sha256": hash_key(KEY_A).upper()}])
    assert keys.authenticate(bearer(KEY_A)).id == "a"


def test_plain_keys_from_the_env_string_are_hashed_and_get_the_defaults():
    keys = store([entry()], f" ci : {ENV_KEY} , batch:{KEY_B}:with:colons ,",
                 defaults={"requests_per_minute": 30})
    assert keys.authenticate(bearer(ENV_KEY)) == Tenant("ci", (), 30)
    assert keys.authenticate({"X-API-Key": f"{KEY_B}:with:colons"}).id == "batch"
    assert keys.authenticate(bearer(KEY_A)).id == "team-a"
    assert [r.sha256 for r in keys.records[1:]] == [
        hash_key(ENV_KEY), hash_key(f"{KEY_B}:with:colons")]
    assert ENV_KEY not in repr(keys.records) + repr(vars(keys))


def test_model_allow_list_matches_names_and_globs():
    tenant = store([entry(models=["gpt-4o-mini", "claude-*", "o?-mini"])]).authenticate(
        bearer(KEY_A))
    for allowed in ("gpt-4o-mini", "claude-3-5-sonnet", "o3-mini"):
        tenant.check_model(allowed)
    for forbidden in ("gpt-4o", "GPT-4O-MINI", "o3-mini-high", "xclaude-3"):
        assert not tenant.allows_model(forbidden)
    with pytest.raises(ModelForbidden, match="'gpt-4o'") as caught:
        tenant.check_model("gpt-4o")
    assert (caught.value.status, caught.value.type) == (403, "permission_error")


def test_empty_model_list_allows_every_model():
    tenant = store([entry(models=[])], defaults={"models": ["mock-*"]}).authenticate(
        bearer(KEY_A))
    assert tenant.allows_model("anything-at-all")


# -- bad configuration --------------------------------------------------------------------------

@pytest.mark.parametrize("entries, message", [
    ([{"sha256": hash_key(KEY_A)}], r"api_keys\[0\]: id must be"),
    ([entry(), {"id": "b", "sha256": "abc123"}],
     r"api_keys\[1\] \(id 'b'\): sha256 must be 64 hex"),
    ([{"id": "b", "sha256": "z" * 64}], r"api_keys\[0\] \(id 'b'\): sha256 must be 64 hex"),
    ([{"id": "b"}], r"api_keys\[0\] \(id 'b'\): sha256 must be"),
    ([entry(requests_per_minute=-1)], r"\(id 'team-a'\): requests_per_minute must be a whole"),
    ([entry(tokens_per_minute="lots")], r"\(id 'team-a'\): tokens_per_minute must be"),
    ([entry(max_in_flight=True)], r"\(id 'team-a'\): max_in_flight must be"),
    ([entry(models="gpt-*")], r"\(id 'team-a'\): models must be a list"),
    ([entry(rpm=5)], r"\(id 'team-a'\): unknown field 'rpm'"),
    ([entry(), entry(key=KEY_B)], r"API key 'team-a': the id is used twice"),
    ([entry(), entry("team-b")], r"API key 'team-b': the same key is also configured as 'team-a'"),
    ([entry("anonymous")], r"'anonymous' is reserved"),
    (["just-a-string"], r"api_keys\[0\]: must be a mapping"),
    ([{"id": "has space", "sha256": hash_key(KEY_A)}], r"api_keys\[0\]: id must be"),
])
def test_bad_config_entry_raises_value_error_naming_it(entries, message):
    with pytest.raises(ValueError, match=message):
        store(entries)


def test_a_plain_key_in_the_yaml_is_refused_without_repeating_it():
    with pytest.raises(ValueError) as caught:
        store([{"id": "a", "key": KEY_A}])
    assert "unknown field 'key'" in str(caught.value)
    assert "sha256" in str(caught.value)
    assert KEY_A not in str(caught.value)


@pytest.mark.parametrize("env, message", [
    (f"no-colon-{ENV_KEY}", r"PROXY_API_KEYS item 1: must be id:key"),
    (f"ci:{ENV_KEY},ci2:short", r"PROXY_API_KEYS item 2 \(id 'ci2'\): the key must be at least"),
    (f"bad id:{ENV_KEY}", r"PROXY_API_KEYS item 1: id must be"),
    (f":{ENV_KEY}", r"PROXY_API_KEYS item 1: id must be"),
    (f"ci:{ENV_KEY},ci:{KEY_B}", r"API key 'ci': the id is used twice"),
])
def test_bad_env_item_raises_value_error_naming_it_but_not_its_key(env, message):
    with pytest.raises(ValueError, match=message) as caught:
        store([], env)
    for secret in (ENV_KEY, KEY_B, "short"):
        assert secret not in str(caught.value)


def test_bad_default_limits_raise_value_error():
    with pytest.raises(ValueError, match="default limits: unknown field 'rpm'"):
        store([entry()], defaults={"rpm": 3})
    with pytest.raises(ValueError, match="default limits: requests_per_minute"):
        store([entry()], defaults={"requests_per_minute": -2})


# -- secrets stay out ---------------------------------------------------------------------------

def test_secrets_never_appear_in_reprs_or_error_messages():
    keys = store([entry()], f"ci:{ENV_KEY}", required=True)
    record = keys.records[0]
    assert repr(record) == "KeyRecord(id='team-a', models=(), requests_per_minute=None, " \
                           "tokens_per_minute=None, max_in_flight=None)"
    texts = [repr(record), repr(keys.records[1]), repr(keys.authenticate(bearer(KEY_A)))]
    mixed = {**bearer(KEY_A), "X-API-Key": KEY_B}
    for headers in (bearer(KEY_B), {"X-API-Key": KEY_B}, {}, mixed):
        error = refused(keys, headers)
        texts += [str(error), repr(error), error.body().decode()]
    for text in texts:
        for secret in (KEY_A, KEY_B, ENV_KEY, hash_key(KEY_A), hash_key(ENV_KEY)):
            assert secret not in text


def test_key_record_built_directly_works_in_a_store():
    keys = KeyStore([KeyRecord("direct", hash_key(KEY_A), ("gpt-*",))], required=True)
    assert keys.authenticate(bearer(KEY_A)) == Tenant("direct", ("gpt-*",))
    assert keys.ids == ["direct"]


# -- the new-key command ------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "app.auth", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


def test_new_key_command_prints_a_key_whose_sha256_matches_and_a_yaml_entry():
    done = run_cli("new-key", "--id", "x")
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(":", 1) for line in done.stdout.splitlines()
                 if line.startswith(("key:", "sha256:")))
    key, digest = lines["key"].strip(), lines["sha256"].strip()
    assert key.startswith("sk-proxy-") and len(key) >= 40
    assert hashlib.sha256(key.encode()).hexdigest() == digest
    assert f"    - id: x\n      sha256: {digest}\n" in done.stdout
    assert done.stdout.count(key) == 1
    # The printed entry, pasted into the config, lets the key in.
    keys = store([{"id": "x", "sha256": digest}])
    assert keys.authenticate(bearer(key)).id == "x"


def test_new_key_command_makes_a_different_key_each_time_and_checks_the_id():
    first, second = run_cli("new-key"), run_cli("new-key")
    assert first.stdout.splitlines()[0] != second.stdout.splitlines()[0]
    assert "- id: key-" in first.stdout
    bad = run_cli("new-key", "--id", "no spaces")
    assert bad.returncode == 2 and "id must be" in bad.stderr
