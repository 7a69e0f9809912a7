"""config.example.yaml: every field of every settings section, loadable as it is."""

import dataclasses
import re
import typing
from pathlib import Path

import yaml

from settings import ENTRY_FIELDS
from settings import ENV_VARS, NOT_IN_FILE, PRODUCTION_PROFILE, Settings, load_settings

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"
CLIENT_KEYS = "ops:test-client-key-0123456789"


def example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def sections():
    """(path, dataclass, the field names the example sets for it, what the profile sets in it)
    for Settings and each section; for providers, the names any of its entries sets."""
    data = example()
    yield "settings", Settings, set(data), PRODUCTION_PROFILE
    hints = typing.get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield f.name, kind, set(data.get(f.name) or {}), PRODUCTION_PROFILE.get(f.name, {})
        elif typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            yield f.name, item, set().union(*(data.get(f.name) or [{}])), {}


def shown_as_comment(text, name, saying):
    return re.search(rf"^\s*#\s*(- )?{name}:.*{re.escape(saying)}", text, re.M)


def test_the_example_shows_every_field_of_every_settings_section():
    """Each field is set, or, where the file may not set it or setting it would override the
    production profile, shown as a comment saying so."""
    text = EXAMPLE.read_text()
    missing, misplaced = [], []
    for path, tp, shown, profile in sections():
        for f in dataclasses.fields(tp):
            if NOT_IN_FILE in f.metadata:
                saying = "never here"
            elif f.name in profile and not isinstance(profile[f.name], dict):
                saying = f"production: {yaml.safe_dump(profile[f.name]).splitlines()[0]}"
            else:
                if f.name not in shown:
                    missing.append(f"{path}.{f.name}")
                continue
            if f.name in shown:
                misplaced.append(f"{path}.{f.name}")
            if not shown_as_comment(text, f.name, saying):
                missing.append(f"{path}.{f.name} (as a comment saying {saying!r})")
    assert not missing, f"not in config.example.yaml: {missing}"
    assert not misplaced, f"set in config.example.yaml, though it should be a comment: {misplaced}"


def test_the_example_shows_every_field_of_a_client_key_entry():
    entries = example()["auth"]["api_keys"]
    assert entries and set().union(*entries) == ENTRY_FIELDS


def test_the_example_sections_hold_the_defaults():
    """The example tells what leaving a field out means: its values are the defaults."""
    data, defaults = example(), Settings()
    assert data["environment"] == defaults.environment
    hints = typing.get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        if dataclasses.is_dataclass(hints[f.name]):
            default = dataclasses.asdict(getattr(defaults, f.name))
            differ = {k: (v, default[k]) for k, v in data[f.name].items()
                      if v != default[k] and (f.name, k) != ("auth", "api_keys")}
            assert not differ, f"{f.name}: (example, default) {differ}"


def test_every_environment_variable_is_named_beside_its_field():
    lines = EXAMPLE.read_text().splitlines()
    unnamed = [var for var, (_, name) in ENV_VARS.items()
               if not any(re.match(rf"\s*#?\s*{name}:", line) and var in line for line in lines)]
    assert not unnamed, f"config.example.yaml does not name {unnamed} beside their fields"


def test_the_example_loads_as_it_is():
    s = load_settings(environ={"OPENAI_API_KEY": "sk-openai-test"}, config_path=str(EXAMPLE))
    assert {p.type for p in s.providers} == {"openai", "azure_openai", "anthropic", "mock"}
    keys = {p.name: p.api_key for p in s.providers}
    assert keys["openai"] == "sk-openai-test" and keys["azure"] == ""
    assert s.config_path == str(EXAMPLE) and s.environment == "development"


def test_the_example_in_production_leaves_the_production_profile_in_force():
    s = load_settings(environ={"ENVIRONMENT": "production", "PROXY_API_KEYS": CLIENT_KEYS},
                      config_path=str(EXAMPLE))
    assert s.environment == "production" and "ops" in s.auth.client_keys().ids
    profile = PRODUCTION_PROFILE
    assert s.log_level == profile["log_level"]
    assert (s.server.host, s.server.threads, s.server.connection_limit) == (
        profile["server"]["host"], profile["server"]["threads"],
        profile["server"]["connection_limit"])
    assert s.cache.max_memory_mb == profile["cache"]["max_memory_mb"]
    assert (s.auth.api_keys_required, s.auth.requests_per_minute) == (
        profile["auth"]["api_keys_required"], profile["auth"]["requests_per_minute"])
