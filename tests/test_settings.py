"""Settings: the defaults, the production profile, the YAML file, env overrides, clear errors."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest

import settings as settings_module
from app import create_app
from app.runtime.memory import MemoryManager
from settings import MemorySettings, SettingsError, build_settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
CLIENT_KEY = "test-client-key-0123456789"
CLIENT_KEYS = f"ops:{CLIENT_KEY}"  # PROXY_API_KEYS, as an operator passes it
MOCK = "providers:\n  - {name: m, type: mock, models: [mock-model]}\n"
CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_the_defaults_apply_without_a_file_or_variables(tmp_path):
    s = load_settings(environ={}, config_path=write(tmp_path, MOCK))
    http = s.http_client
    assert (http.max_keepalive_connections, http.keepalive_expiry, http.timeout,
            http.connect_timeout, http.retry_attempts) == (200, 30, 30, 10, 3)
    assert (s.environment, s.server.host, s.server.threads) == ("development", "127.0.0.1", 64)


def test_no_config_and_no_keys_serves_the_mock(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings({})
    assert [(p.name, p.type) for p in s.providers] == [("mock", "mock")]


def test_provider_keys_in_the_environment_select_real_providers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings({"OPENAI_API_KEY": "sk-1", "ANTHROPIC_API_KEY": "sk-2"})
    assert [(p.name, p.type, p.api_key) for p in s.providers] == [
        ("openai", "openai", "sk-1"), ("anthropic", "anthropic", "sk-2")]


def test_the_production_profile_applies_and_the_file_and_env_override_it(tmp_path):
    path = write(tmp_path, "server:\n  threads: 48\n" + MOCK)
    s = load_settings({"ENVIRONMENT": "production", "PROXY_CONFIG": path,
                       "PROXY_API_KEYS": CLIENT_KEYS, "CONNECTION_LIMIT": "3000"})
    assert s.environment == "production"
    assert s.server.host == "0.0.0.0"  # profile
    assert s.server.threads == 48  # file beats profile
    assert s.server.connection_limit == 3000  # env beats both


# --- defect 1: `environment: production` in the file applies the production profile -------

def test_environment_production_in_the_file_applies_the_production_profile(tmp_path):
    path = write(tmp_path, "environment: production\n" + MOCK)
    s = load_settings(environ={"PROXY_API_KEYS": CLIENT_KEYS}, config_path=path)
    assert s.environment == "production"
    assert (s.server.host, s.server.threads, s.server.connection_limit) == ("0.0.0.0", 256, 2000)
    assert s.auth.api_keys_required is True
    assert (s.log_level, s.cache.max_memory_mb) == ("WARNING", 1024)


def test_the_file_still_overrides_the_profile_its_environment_chose(tmp_path):
    path = write(tmp_path, "environment: production\nserver:\n  threads: 48\n" + MOCK)
    s = load_settings(environ={"PROXY_API_KEYS": CLIENT_KEYS}, config_path=path)
    assert (s.server.threads, s.server.connection_limit) == (48, 2000)


def test_the_environment_variable_chooses_the_profile_over_the_file(tmp_path):
    path = write(tmp_path, "environment: production\n" + MOCK)
    s = load_settings(environ={"ENVIRONMENT": "development"}, config_path=path)
    assert (s.environment, s.server.host, s.auth.api_keys_required) == (
        "development", "127.0.0.1", False)
    path = write(tmp_path, "environment: development\n" + MOCK)
    s = load_settings(environ={"ENVIRONMENT": "production", "PROXY_API_KEYS": CLIENT_KEYS},
                      config_path=path)
    assert (s.environment, s.server.host, s.auth.api_keys_required) == (
        "production", "0.0.0.0", True)


def test_a_production_file_without_client_keys_refuses_to_load(tmp_path):
    path = write(tmp_path, "environment: production\n" + MOCK)
    with pytest.raises(SettingsError, match="API keys are required but none is configured"):
        load_settings(environ={}, config_path=path)


def test_an_app_from_a_production_file_refuses_requests_without_a_key(tmp_path):
    path = write(tmp_path, "environment: production\n" + MOCK)
    app = create_app(load_settings(environ={"PROXY_API_KEYS": CLIENT_KEYS,
                                            "DATABASE_ENABLED": "false"}, config_path=path))
    try:
        client = app.test_client()
        missing = client.post("/v1/chat/completions", json=CHAT)
        assert missing.status_code == 401
        assert missing.json["error"]["code"] == "missing_api_key"
        allowed = client.post("/v1/chat/completions", json=CHAT,
                              headers={"Authorization": f"Bearer {CLIENT_KEY}"})
        assert allowed.status_code == 200
    finally:
        app.extensions["llm_proxy"].close()


# --- defect 5: settings are a pure function of the defaults, profile, file and environ -----

def test_a_load_leaves_nothing_behind_for_the_next_one(tmp_path):
    profile = copy.deepcopy(settings_module.PRODUCTION_PROFILE)
    path = write(tmp_path, MOCK)
    base = {"ENVIRONMENT": "production", "PROXY_API_KEYS": CLIENT_KEYS}
    first = load_settings(environ={**base, "PORT": "9001", "THREADS": "8",
                                   "CACHE_MAX_MEMORY_MB": "64"}, config_path=path)
    assert (first.server.port, first.server.threads, first.cache.max_memory_mb) == (9001, 8, 64)
    second = load_settings(environ=base, config_path=path)
    assert (second.server.port, second.server.threads, second.cache.max_memory_mb) == (
        8000, 256, 1024)
    assert settings_module.PRODUCTION_PROFILE == profile


def test_a_given_environ_is_the_only_environment_read(tmp_path, monkeypatch):
    for var, value in {"PORT": "9999", "ENVIRONMENT": "production", "UP_KEY": "sk-process",
                       "ADMIN_API_KEY": "admin-from-process"}.items():
        monkeypatch.setenv(var, value)
    path = write(tmp_path, "providers:\n  - {name: up, type: openai, base_url: 'http://up', "
                           "api_key_env: UP_KEY, models: [m]}\n")
    s = load_settings(environ={}, config_path=path)
    assert (s.server.port, s.environment, s.admin_api_key) == (8000, "development", "")
    assert s.providers[0].api_key == ""
    s = load_settings(environ={"UP_KEY": "sk-given"}, config_path=path)
    assert s.providers[0].api_key == "sk-given"


def test_a_provider_key_is_resolved_at_load_and_kept_out_of_repr(tmp_path, monkeypatch):
    path = write(tmp_path, "providers:\n  - {name: up, type: openai, base_url: 'http://up', "
                           "api_key_env: UP_KEY, models: [m]}\n")
    s = load_settings(environ={"UP_KEY": "sk-secret-at-load", "ADMIN_API_KEY": "admin-secret",
                               "PROXY_API_KEYS": CLIENT_KEYS}, config_path=path)
    monkeypatch.setenv("UP_KEY", "sk-changed-later")
    assert s.providers[0].api_key == "sk-secret-at-load"
    for secret in ("sk-secret-at-load", "admin-secret", CLIENT_KEY):
        assert secret not in repr(s)


def test_build_settings_resolves_provider_keys_from_the_environ_it_is_given(monkeypatch):
    monkeypatch.setenv("UP_KEY", "sk-process")
    entry = {"name": "up", "type": "openai", "base_url": "http://up", "api_key_env": "UP_KEY",
             "models": ["m"]}
    assert build_settings({"providers": [dict(entry)]}).providers[0].api_key == "sk-process"
    assert build_settings({"providers": [dict(entry)]},
                          environ={"UP_KEY": "sk-given"}).providers[0].api_key == "sk-given"


@pytest.mark.parametrize("text,field", [
    ("admin_api_key: hunter2\n", "admin_api_key"),
    ("auth:\n  env_keys: 'ops:test-client-key-0123456789'\n", "auth.env_keys"),
    ("providers:\n  - {name: up, type: openai, base_url: 'http://up', api_key: sk-1, "
     "models: [m]}\n", "providers[0].api_key"),
    ("version: 9.9.9\n", "version"),
    ("config_path: /elsewhere.yaml\n", "config_path"),
])
def test_keys_and_what_the_loader_fills_in_cannot_sit_in_the_file(tmp_path, text, field):
    with pytest.raises(SettingsError, match=rf"^{re.escape(field)}: not in the config file"):
        load_settings(environ={}, config_path=write(tmp_path, text))


def test_the_unused_http_max_connections_is_gone(tmp_path):
    with pytest.raises(SettingsError, match="http_client.max_connections: unknown setting"):
        load_settings(environ={}, config_path=write(tmp_path, "http_client:\n"
                                                              "  max_connections: 10\n" + MOCK))
    assert "HTTP_MAX_CONNECTIONS" not in settings_module.ENV_VARS


def test_leak_snapshots_has_one_lower_bound_for_the_file_and_the_memory_manager(tmp_path):
    def text(n):
        return f"memory_manager:\n  leak_snapshots: {n}\n" + MOCK

    with pytest.raises(SettingsError, match="memory_manager.leak_snapshots: must be at least 2"):
        load_settings(environ={}, config_path=write(tmp_path, text(1)))
    with pytest.raises(ValueError, match="leak_snapshots: must be at least 2"):
        MemoryManager(None, MemorySettings(leak_snapshots=1), rss_reader=lambda: 0,
                      system_reader=lambda: None)
    s = load_settings(environ={}, config_path=write(tmp_path, text(2)))
    MemoryManager(None, s.memory_manager, rss_reader=lambda: 0, system_reader=lambda: None)


# --- defect 6: errors name what the user typed ---------------------------------------------

@pytest.mark.parametrize("var,value,message", [
    ("PORT", "abc", "PORT (server.port): expected an integer, got 'abc'"),
    ("PORT", "0", "PORT (server.port): must be between 1 and 65535"),
    ("THREADS", "many", "THREADS (server.threads): expected an integer, got 'many'"),
    ("CACHE_ENABLED", "maybe",
     "CACHE_ENABLED (cache.enabled): expected true or false, got 'maybe'"),
    ("MEMORY_CLEANUP_INTERVAL", "0",
     "MEMORY_CLEANUP_INTERVAL (memory_manager.cleanup_interval): must be positive"),
    ("ENVIRONMENT", "staging",
     "ENVIRONMENT (environment): must be development or production, got 'staging'"),
])
def test_a_bad_env_value_names_the_variable_and_its_setting(tmp_path, var, value, message):
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={var: value}, config_path=write(tmp_path, MOCK))
    assert str(raised.value) == message


def test_a_bad_file_value_overridden_by_no_variable_names_only_the_setting(tmp_path):
    path = write(tmp_path, "server:\n  port: abc\n")
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={"THREADS": "8"}, config_path=path)
    assert str(raised.value) == "server.port: expected an integer, got 'abc'"


def test_a_variable_into_a_section_the_file_left_no_mapping_is_an_error(tmp_path):
    path = write(tmp_path, "server: 5\n" + MOCK)
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={"PORT": "9000"}, config_path=path)
    assert str(raised.value) == "server: expected a mapping, got int"


@pytest.mark.parametrize("text,where,problem", [
    ("server:\n  port: 8000\n  host: a: b\n", "line 3, column 10",
     "mapping values are not allowed here"),
    ("server: [\n", "line 2, column 1",
     "expected the node content, but found '<stream end>' (while parsing a flow node)"),
    ('log_level: "INFO\n', "line 2, column 1",
     "found unexpected end of stream (while scanning a quoted scalar)"),
])
def test_invalid_yaml_says_what_the_parser_found_and_where(tmp_path, text, where, problem):
    path = write(tmp_path, text)
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={}, config_path=path)
    assert str(raised.value) == f"config file {path}, {where}: invalid YAML: {problem}"


def test_an_unreadable_config_path_is_a_settings_error(tmp_path):
    with pytest.raises(SettingsError, match="config file .*: Is a directory"):
        load_settings(environ={}, config_path=str(tmp_path))


@pytest.mark.parametrize("text,message", [
    ("providers:\n  - {name: a, type: openai, base_url: http://x, models: [m], priority: high}\n",
     "providers[0].priority: expected an integer, got 'high'"),
    ("providers:\n  - {name: a, type: nope, models: [m]}\n", "providers[0].type: must be one of"),
    ("providers:\n  - {name: a, type: openai, base_url: x, models: [m]}\n",
     "providers[0].base_url: must be an http"),
    ("providers:\n  - {type: mock, models: [m]}\n", "providers[0].name: required"),
    ("providers:\n  - {name: a, type: mock}\n", "providers[0].models: must name at least one"),
    ("server:\n  threds: 4\n", "server.threds: unknown setting"),
    ("server:\n  port: 0\n", "server.port: must be between"),
    ("http_client: 5\n", "http_client: expected a mapping"),
    ("providers:\n  - {name: a, type: mock, models: [m]}\n  - {name: a, type: mock, models: [m]}\n",
     "providers[1].name: duplicate provider name"),
    ("providers:\n  - {name: a, type: mock, models: [m], enabled: maybe}\n",
     "providers[0].enabled: expected true or false"),
    ("server: [\n", "invalid YAML"),
])
def test_a_bad_config_names_the_field(tmp_path, text, message):
    with pytest.raises(SettingsError) as raised:
        load_settings({"PROXY_CONFIG": write(tmp_path, text)})
    assert message in str(raised.value)


def test_a_missing_config_file_named_explicitly_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match="not found"):
        load_settings({"PROXY_CONFIG": str(tmp_path / "absent.yaml")})


def test_no_enabled_provider_is_an_error():
    with pytest.raises(SettingsError, match="no provider is enabled"):
        build_settings({"providers": [{"name": "m", "type": "mock", "models": ["x"],
                                       "enabled": False}]})


def test_start_up_with_a_bad_config_prints_one_line_and_exits(tmp_path):
    path = write(tmp_path, "server:\n  port: nope\n")
    result = subprocess.run([sys.executable, "wsgi.py"], cwd=ROOT, capture_output=True, text=True,
                            env={"PROXY_CONFIG": path, "PATH": "/usr/bin:/bin",
                                 "DATABASE_ENABLED": "false"}, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == ("llm-proxy: bad configuration: server.port: "
                                     "expected an integer, got 'nope'")
    assert "Traceback" not in result.stdout + result.stderr


def test_start_up_with_a_bad_variable_names_it(tmp_path):
    path = write(tmp_path, MOCK)
    result = subprocess.run([sys.executable, "wsgi.py"], cwd=ROOT, capture_output=True, text=True,
                            env={"PROXY_CONFIG": path, "PORT": "abc", "PATH": "/usr/bin:/bin",
                                 "DATABASE_ENABLED": "false"}, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == ("llm-proxy: bad configuration: PORT (server.port): "
                                     "expected an integer, got 'abc'")
