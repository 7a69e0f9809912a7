"""What the store's key and migration tests share: an app on a test database (the ``database``
fixture's section) with the mock provider, the admin key and one key from the configuration,
and the calls those tests repeat."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
from app import create_app
from app.store.database import engine_for
from settings import build_settings

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "admin-key-of-the-store-tests"
CONFIG_KEY, CONFIG_SECRET = "config-key", "sk-config-key-0123456789abcdef"
MODEL, OTHER_MODEL = "mock-model", "other-model"
MOCK = {"name": "mock", "type": "mock", "models": [MODEL, OTHER_MODEL]}
# Where a test's wall clock starts when it moves it (2030-03-17, UTC): far from today, so a
# time taken from the real clock by mistake shows.
START = 1_900_000_000.0


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def settings_for(database: dict, **sections):
    """Settings with the database section ``database`` (the fixture's), the mock provider, the
    admin key, one configured key, no response cache (every answer costs) and no access log."""
    data = {"providers": [MOCK], "admin_api_key": ADMIN, "cache": {"enabled": False},
            "observability": {"access_log": False},
            "auth": {"api_keys": [{"id": CONFIG_KEY, "sha256": sha256(CONFIG_SECRET)}]},
            "database": database, **sections}
    return build_settings(data)


def engine_of(database: dict):
    """An engine on the test database, built as the app builds its own (dispose it after)."""
    return engine_for(settings_for(database).database)


class Apps:
    """Builds apps (``apps(database, wall=..., **sections)``) and closes them all at the end."""

    def __init__(self):
        self.made = []

    def __call__(self, database: dict, *, wall=time.time, admin_api_key=ADMIN, **sections):
        settings = settings_for(database, **sections)
        settings.admin_api_key = admin_api_key
        app = create_app(settings, wall=wall)
        app.testing = True
        self.made.append(app)
        return app

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for app in self.made:
            app.extensions["llm_proxy"].close()


def store_of(app):
    return app.extensions["llm_proxy"].store


def admin(client, method: str, path: str, body=None, *, raw: bytes | None = None,
          actor: str | None = None, key: str | None = ADMIN):
    """An admin API call: ``body`` sent as JSON, or ``raw`` bytes as they are. The standard
    library writes the JSON: it writes what orjson will not (integers past 64 bits, objects
    nested past 254 levels), as a client may."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if actor is not None:
        headers["X-Audit-Actor"] = actor
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    return client.open(path, method=method, data=data, headers=headers)


def create_key(client, body=None, **options) -> tuple[str, dict]:
    """A new key through the API: (its secret, the rest of the answer)."""
    response = admin(client, "POST", "/admin/keys", body or {}, **options)
    assert response.status_code == 201, response.get_data(as_text=True)
    key = response.get_json()
    return key.pop("key"), key


def chat(client, secret: str | None, model: str = MODEL):
    """A chat completion with the key ``secret``: (status, error code or None). The response is
    closed, so its request log row is queued."""
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    response = client.post("/v1/chat/completions", headers=headers, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}]})
    try:
        return response.status_code, error_code(response) if response.status_code >= 400 \
            else None
    finally:
        response.close()


def error_code(response) -> str:
    """The code of an error answer, after checking it has the OpenAI error shape."""
    assert response.mimetype == "application/json", response.mimetype
    body = orjson.loads(response.get_data())
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and isinstance(error["code"], str), error
    return error["code"]


def wait_until(check, *, timeout: float = 5.0, what: str = "the condition") -> float:
    """Poll ``check`` until it is true; the seconds it took. Fails past ``timeout``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - started


def cli_environ(database: dict) -> dict:
    """The environment of ``python -m app.keys`` on the test database ``database``: the repo
    importable, no config file, and the database from DATABASE_URL or DATABASE_PATH only."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("DATABASE_", "REDIS_", "PROXY_", "ENVIRONMENT"))}
    environ["PYTHONPATH"] = str(ROOT)
    if database.get("url"):
        environ["DATABASE_URL"] = database["url"]
    else:
        environ["DATABASE_PATH"] = database["path"]
    return environ


def run_cli(database: dict, cwd, *args: str, timeout: float = 60.0):
    """``python -m app.keys ARGS`` as a process of its own."""
    return subprocess.run([sys.executable, "-m", "app.keys", *args], cwd=cwd,
                          env=cli_environ(database), capture_output=True, text=True,
                          timeout=timeout)
