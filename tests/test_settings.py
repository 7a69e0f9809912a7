"""Settings: the seed's defaults, the production profile, the YAML file, env overrides, clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from settings import SettingsError, build_settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_carry_the_seeds_numbers(tmp_path):
    s = load_settings({"PROXY_CONFIG": ""})
    http = s.http_client
    assert (http.max_keepalive_connections, http.max_connections, http.keepalive_expiry,
            http.timeout, http.connect_timeout, http.retry_attempts) == (200, 2000, 30, 30, 10, 3)


def test_no_config_and_no_keys_serves_the_mock(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings({})
    assert [(p.name, p.type) for p in s.providers] == [("mock", "mock")]


def test_provider_keys_in_the_environment_select_real_providers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings({"OPENAI_API_KEY": "sk-1", "ANTHROPIC_API_KEY": "sk-2"})
    assert [(p.name, p.type) for p in s.providers] == [("openai", "openai"),
                                                       ("anthropic", "anthropic")]


def test_the_production_profile_applies_and_the_file_and_env_override_it(tmp_path):
    path = write(tmp_path, "server:\n  threads: 48\nproviders:\n  - {name: m, type: mock, models: [x]}\n")
    s = load_settings({"ENVIRONMENT": "production", "PROXY_CONFIG": path,
                       "HTTP_MAX_CONNECTIONS": "7000"})
    assert s.environment == "production"
    assert s.server.connection_limit == 2000  # profile
    assert s.server.threads == 48  # file beats profile
    assert s.http_client.max_connections == 7000  # env beats both


def test_the_example_config_loads(monkeypatch):
    s = load_settings({"PROXY_CONFIG": str(ROOT / "config.example.yaml")})
    assert {p.type for p in s.providers} == {"openai", "azure_openai", "anthropic", "mock"}


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


def test_a_bad_env_value_names_the_field():
    with pytest.raises(SettingsError, match="server.threads: expected an integer, got 'many'"):
        load_settings({"THREADS": "many", "PROXY_CONFIG": ""})


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
                            env={"PROXY_CONFIG": path, "PATH": "/usr/bin:/bin"}, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == ("llm-proxy: bad configuration: server.port: "
                                     "expected an integer, got 'nope'")
    assert "Traceback" not in result.stdout + result.stderr
