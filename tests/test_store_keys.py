"""Keys made over HTTP and from the command line (issue 18), on real SQLite and real PostgreSQL
(the ``database`` fixture): their life cycle as clients see it, a second app on the same
database, the audit trail, bad input to every admin endpoint, and ``python -m app.keys``."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from urllib.parse import quote

import orjson
import pytest
import redis
import sqlalchemy as sa
from hypothesis import HealthCheck, event, given, settings as hsettings, strategies as st

from app.store import schema
from app.store.database import head, migrate, revision
from app.store.request_log import MAX_PAGE
from app.store.spend import iso
from tests.conftest import FakeClock
from tests.store_helpers import (ADMIN, CONFIG_KEY, CONFIG_SECRET, MODEL, OTHER_MODEL, START,
                                 Apps, admin, chat, create_key, engine_of, error_code, run_cli,
                                 sha256, store_of, wait_until)

# How much later than one refresh interval a second app may see a change: its writer thread
# reloads every refresh_interval, plus the reload itself, on a machine that may be busy.
SLACK = 2.0


@pytest.fixture
def apps(database):
    # on the database: its apps are closed before it is dropped
    with Apps() as made:
        yield made


@pytest.fixture
def wall():
    """The wall clock of the app under test: key expiry and rotation grace follow it."""
    return FakeClock(START)


@pytest.fixture
def app(apps, database, wall):
    return apps(database, wall=wall)


@pytest.fixture
def client(app):
    return app.test_client()


def at(seconds: float) -> str:
    """UNIX seconds as ISO 8601 with its zone, as a client would write them."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


def refused(response, status: int, code: str) -> bool:
    return response.status_code == status and error_code(response) == code


# -- the life cycle of a key, on one app ---------------------------------------------------------

def test_a_new_key_is_shown_once_and_stored_as_its_digest(app, client):
    secret, key = create_key(client, {
        "id": "team-a", "owner": "alice", "team": "search", "models": [MODEL],
        "requests_per_minute": 100, "budget": {"daily_usd": 5}, "metadata": {"ticket": "OPS-1"}})
    assert secret.startswith("sk-proxy-") and len(secret) > 40
    assert (key["id"], key["source"], key["owner"], key["team"], key["models"]) == \
        ("team-a", "database", "alice", "search", [MODEL])
    assert key["budget"]["daily_usd"] == 5.0 and key["metadata"] == {"ticket": "OPS-1"}
    assert key["created_at"] == iso(START) and key["enabled"] is True

    # never again: neither the secret nor its digest in what the API shows
    for path in ("/admin/keys", "/admin/keys/team-a", "/admin/keys?revoked=true"):
        response = admin(client, "GET", path)
        assert response.status_code == 200
        text = response.get_data(as_text=True)
        assert secret not in text and sha256(secret) not in text
    assert "key" not in admin(client, "GET", "/admin/keys/team-a").get_json()

    # the row holds the SHA-256, and the secret nowhere
    with store_of(app).engine.connect() as connection:
        row = connection.execute(sa.select(schema.keys).where(schema.keys.c.id == "team-a")).one()
    assert row.sha256 == sha256(secret)
    assert not any(secret in str(value) for value in row)


def test_a_new_key_answers_and_is_listed_beside_the_configuration_keys(client):
    secret, _ = create_key(client, {"id": "made"})
    assert chat(client, secret) == (200, None)
    assert chat(client, CONFIG_SECRET) == (200, None)
    assert chat(client, secret + "x") == (401, "invalid_api_key")

    listed = admin(client, "GET", "/admin/keys").get_json()["data"]
    assert [(k["id"], k["source"]) for k in listed] == [(CONFIG_KEY, "config"),
                                                         ("made", "database")]
    shown = admin(client, "GET", "/admin/keys/made")
    assert shown.status_code == 200
    assert shown.get_json()["id"] == "made" and shown.get_json()["revoked_at"] is None


def test_the_configuration_keys_are_read_only(client):
    path = f"/admin/keys/{CONFIG_KEY}"
    for method, url, body in [("PATCH", path, {"enabled": False}), ("DELETE", path, None),
                              ("POST", path + "/rotate", {"grace_seconds": 0})]:
        assert refused(admin(client, method, url, body), 409, "key_read_only"), (method, url)
    assert refused(admin(client, "POST", "/admin/keys", {"id": CONFIG_KEY}), 409, "key_exists")
    assert chat(client, CONFIG_SECRET) == (200, None)  # untouched by all of that
    shown = admin(client, "GET", path)  # shown as the list shows it
    assert shown.status_code == 200
    assert shown.get_json()["id"] == CONFIG_KEY and shown.get_json()["source"] == "config"


def test_a_models_allow_list_refuses_other_models(client):
    secret, _ = create_key(client, {"id": "models"})
    assert chat(client, secret, OTHER_MODEL) == (200, None)  # [] allows every model

    assert admin(client, "PATCH", "/admin/keys/models", {"models": [MODEL]}).status_code == 200
    assert chat(client, secret, OTHER_MODEL) == (403, "model_not_allowed")
    assert chat(client, secret, MODEL) == (200, None)

    assert admin(client, "PATCH", "/admin/keys/models", {"models": ["other-*"]}).status_code \
        == 200
    assert chat(client, secret, MODEL) == (403, "model_not_allowed")
    assert chat(client, secret, OTHER_MODEL) == (200, None)


def test_a_requests_per_minute_limit_refuses_past_it(client):
    secret, _ = create_key(client, {"id": "limited"})
    assert [chat(client, secret)[0] for _ in range(3)] == [200] * 3  # the default: no limit

    response = admin(client, "PATCH", "/admin/keys/limited", {"requests_per_minute": 2})
    assert response.status_code == 200 and response.get_json()["requests_per_minute"] == 2
    assert [chat(client, secret) for _ in range(3)] == \
        [(200, None), (200, None), (429, "rate_limit_exceeded")]


def test_a_disabled_key_is_refused_until_enabled_again(client):
    secret, _ = create_key(client, {"id": "paused"})
    assert admin(client, "PATCH", "/admin/keys/paused", {"enabled": False}).status_code == 200
    assert chat(client, secret) == (401, "disabled_api_key")
    assert admin(client, "PATCH", "/admin/keys/paused", {"enabled": True}).status_code == 200
    assert chat(client, secret) == (200, None)


def test_a_key_expires_by_the_wall_clock(client, wall):
    secret, key = create_key(client, {"id": "brief", "expires_at": at(START + 60)})
    assert key["expires_at"] == iso(START + 60)
    wall.advance(59)
    assert chat(client, secret) == (200, None)
    wall.advance(1)
    assert chat(client, secret) == (401, "expired_api_key")

    assert admin(client, "PATCH", "/admin/keys/brief", {"expires_at": None}).status_code == 200
    assert chat(client, secret) == (200, None)
    # in the past (UNIX seconds this time): refused at once
    past = wall() - 1
    assert admin(client, "PATCH", "/admin/keys/brief", {"expires_at": past}).status_code == 200
    assert chat(client, secret) == (401, "expired_api_key")


def test_a_rotated_key_keeps_its_old_secret_for_the_grace_period(client, wall):
    first, _ = create_key(client, {"id": "rotating"})
    response = admin(client, "POST", "/admin/keys/rotating/rotate", {"grace_seconds": 600})
    assert response.status_code == 200
    second = response.get_json()["key"]
    assert second != first and response.get_json()["previous_secret_valid_until"] == \
        iso(START + 600)
    assert chat(client, first) == (200, None) and chat(client, second) == (200, None)

    wall.advance(599)
    assert chat(client, first) == (200, None)
    wall.advance(1)
    assert chat(client, first) == (401, "invalid_api_key")
    assert chat(client, second) == (200, None)

    # the default grace is database.rotation_grace (a day); only the last secret has one
    third = admin(client, "POST", "/admin/keys/rotating/rotate").get_json()
    assert third["previous_secret_valid_until"] == iso(wall() + 86400)
    assert chat(client, second) == (200, None) and chat(client, third["key"]) == (200, None)
    assert chat(client, first) == (401, "invalid_api_key")


def test_a_rotation_without_grace_refuses_the_old_secret_at_once(client):
    old, _ = create_key(client, {"id": "now"})
    response = admin(client, "POST", "/admin/keys/now/rotate", {"grace_seconds": 0})
    assert response.status_code == 200
    assert response.get_json()["previous_secret_valid_until"] is None
    assert chat(client, old) == (401, "invalid_api_key")
    assert chat(client, response.get_json()["key"]) == (200, None)


def test_a_revoked_key_is_refused_at_once_and_kept_on_record(client):
    secret, _ = create_key(client, {"id": "gone"})
    rotated = admin(client, "POST", "/admin/keys/gone/rotate", {"grace_seconds": 600})
    newer = rotated.get_json()["key"]
    assert chat(client, secret) == (200, None) and chat(client, newer) == (200, None)

    response = admin(client, "DELETE", "/admin/keys/gone")
    assert response.status_code == 200 and response.get_json()["revoked_at"] == iso(START)
    # both secrets: the grace of a rotated-out one ends with its key
    assert chat(client, newer) == (401, "invalid_api_key")
    assert chat(client, secret) == (401, "invalid_api_key")

    assert "gone" not in [k["id"] for k in admin(client, "GET", "/admin/keys").get_json()["data"]]
    everything = admin(client, "GET", "/admin/keys?revoked=true").get_json()["data"]
    assert [k["revoked_at"] for k in everything if k["id"] == "gone"] == [iso(START)]
    assert admin(client, "GET", "/admin/keys/gone").get_json()["enabled"] is False
    for method, path, body in [("PATCH", "/admin/keys/gone", {"enabled": True}),
                               ("POST", "/admin/keys/gone/rotate", {}),
                               ("DELETE", "/admin/keys/gone", None)]:
        assert refused(admin(client, method, path, body), 409, "key_revoked"), (method, path)
    # its id is not given out again (its spend and audit trail refer to it)
    assert refused(admin(client, "POST", "/admin/keys", {"id": "gone"}), 409, "key_exists")
    assert chat(client, newer) == (401, "invalid_api_key")


# -- a second app on the same database -----------------------------------------------------------

def test_a_second_app_sees_keys_made_changed_and_revoked_within_a_refresh(apps, database):
    first, second = apps(database).test_client(), apps(database).test_client()
    bound = database["refresh_interval"] + SLACK

    secret, _ = create_key(first, {"id": "shared"})
    took = wait_until(lambda: chat(second, secret)[0] == 200, what="the new key on app 2")
    assert took < bound

    assert admin(first, "PATCH", "/admin/keys/shared", {"models": [OTHER_MODEL]}).status_code \
        == 200
    took = wait_until(lambda: chat(second, secret) == (403, "model_not_allowed"),
                      what="the changed key on app 2")
    assert took < bound

    assert admin(first, "DELETE", "/admin/keys/shared").status_code == 200
    took = wait_until(lambda: chat(second, secret, OTHER_MODEL) == (401, "invalid_api_key"),
                      what="the revocation on app 2")
    assert took < bound


def test_with_redis_a_change_reaches_the_other_app_by_its_announcement(apps, database,
                                                                       redis_url, prefix):
    # Reloads every 30 s: only the announcement can explain a change seen within seconds.
    slow = {**database, "refresh_interval": 30.0}
    shared = {"redis": {"url": redis_url, "prefix": prefix}}
    first, second = (apps(slow, **shared).test_client() for _ in range(2))
    channel = f"{prefix}store:keys-changed"
    listening = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: listening.pubsub_numsub(channel)[0][1] >= 2,
                   what="both apps listening for key changes")
    finally:
        listening.close()

    secret, _ = create_key(first, {"id": "announced"})
    wait_until(lambda: chat(second, secret)[0] == 200, timeout=3.0,
               what="the new key on app 2")
    assert admin(first, "DELETE", "/admin/keys/announced").status_code == 200
    wait_until(lambda: chat(second, secret) == (401, "invalid_api_key"), timeout=3.0,
               what="the revocation on app 2")


# -- the audit trail -----------------------------------------------------------------------------

def test_every_change_is_in_the_audit_trail_without_its_secrets(client, wall):
    old, _ = create_key(client, {"id": "audited", "owner": "alice"}, actor="alice")
    wall.advance(10)
    assert admin(client, "PATCH", "/admin/keys/audited",
                 {"requests_per_minute": 5, "budget": {"daily_usd": 2}},
                 actor="alice").status_code == 200
    wall.advance(10)
    rotated = admin(client, "POST", "/admin/keys/audited/rotate", {"grace_seconds": 60},
                    actor="bob")
    new = rotated.get_json()["key"]
    wall.advance(10)
    assert admin(client, "DELETE", "/admin/keys/audited", actor="bob").status_code == 200
    create_key(client, {"id": "someone-else"})  # no X-Audit-Actor

    response = admin(client, "GET", "/admin/audit?key_id=audited")
    assert response.status_code == 200
    rows = response.get_json()["data"]  # newest first
    assert [(r["action"], r["at"], r["key_id"]) for r in rows] == [
        ("revoke", iso(START + 30), "audited"), ("rotate", iso(START + 20), "audited"),
        ("update", iso(START + 10), "audited"), ("create", iso(START), "audited")]
    assert [r["actor"] for r in rows] == [
        "admin-api 127.0.0.1 (bob)", "admin-api 127.0.0.1 (bob)",
        "admin-api 127.0.0.1 (alice)", "admin-api 127.0.0.1 (alice)"]
    assert rows[0]["detail"] == {} and rows[1]["detail"] == {"grace_seconds": 60.0}
    assert rows[2]["detail"] == {"requests_per_minute": 5, "budget_daily_usd": 2.0}
    assert rows[3]["detail"]["owner"] == "alice"

    everything = admin(client, "GET", "/admin/audit")
    assert [(r["action"], r["key_id"], r["actor"]) for r in everything.get_json()["data"]][0] \
        == ("create", "someone-else", "admin-api 127.0.0.1")
    text = everything.get_data(as_text=True)
    for secret in (old, new):
        assert secret not in text and sha256(secret) not in text
    assert len(admin(client, "GET", "/admin/audit?limit=2").get_json()["data"]) == 2


# -- bad input to every admin endpoint -----------------------------------------------------------

def nested(depth: int):
    """A JSON object ``depth`` levels deep: orjson reads 1024, but writes only 254."""
    value: object = 1
    for _ in range(depth):
        value = {"a": value}
    return value


# Bodies POST /admin/keys and PATCH /admin/keys/{id} both refuse: (body, status, code); a body
# given as bytes is sent as it is.
FIELD_CASES = [
    (b"{not json", 400, "invalid_json"),
    (b'{"owner": "\xff"}', 400, "invalid_json"),  # not UTF-8
    (b'{"budget": {"daily_usd": NaN}}', 400, "invalid_json"),
    (b'{"budget": {"daily_usd": Infinity}}', 400, "invalid_json"),
    (b'{"budget": {"daily_usd": 1e400}}', 400, "invalid_json"),
    (b"[" * 2000 + b"]" * 2000, 400, "invalid_json"),
    (b'[{"id": "k"}]', 400, "invalid_request"),
    (b'"a key"', 400, "invalid_request"),
    (b"null", 400, "invalid_request"),
    ({"secret": "sk-mine"}, 400, "unknown_field"),
    ({"sha256": "0" * 64}, 400, "unknown_field"),
    ({"models": "mock-model"}, 400, "invalid_value"),
    ({"models": [1]}, 400, "invalid_value"),
    ({"models": [" "]}, 400, "invalid_value"),
    ({"models": None}, 400, "invalid_value"),
    ({"models": ["m"] * 257}, 400, "invalid_value"),
    ({"requests_per_minute": -1}, 400, "invalid_value"),
    ({"requests_per_minute": "10"}, 400, "invalid_value"),
    ({"requests_per_minute": 2**31}, 400, "invalid_value"),
    ({"tokens_per_minute": 1.5}, 400, "invalid_value"),
    ({"max_in_flight": True}, 400, "invalid_value"),
    ({"budget": "10"}, 400, "invalid_value"),
    ({"budget": [10]}, 400, "invalid_value"),
    ({"budget": {"daily_usd": "10"}}, 400, "invalid_value"),
    ({"budget": {"monthly_usd": -1}}, 400, "invalid_value"),
    ({"budget": {"total_usd": True}}, 400, "invalid_value"),
    ({"budget": {"weekly_usd": 1}}, 400, "invalid_value"),
    ({"budget": {"soft_limit_percent": 0}}, 400, "invalid_value"),
    ({"budget": {"soft_limit_percent": 150}}, 400, "invalid_value"),
    ({"expires_at": "tomorrow"}, 400, "invalid_value"),
    ({"expires_at": "2031-01-01T00:00:00"}, 400, "invalid_value"),  # no zone
    ({"expires_at": True}, 400, "invalid_value"),
    ({"expires_at": [2031]}, 400, "invalid_value"),
    ({"expires_at": 1e300}, 400, "invalid_value"),  # no date
    ({"expires_at": -1e300}, 400, "invalid_value"),
    ({"metadata": "a note"}, 400, "invalid_value"),
    ({"metadata": [1]}, 400, "invalid_value"),
    ({"metadata": {"blob": "x" * 16 * 1024}}, 400, "invalid_value"),
    ({"metadata": nested(300)}, 400, "invalid_value"),
    ({"enabled": "yes"}, 400, "invalid_value"),
    ({"enabled": 1}, 400, "invalid_value"),
    ({"owner": 5}, 400, "invalid_value"),
    ({"owner": "x" * 201}, 400, "invalid_value"),
    ({"team": None}, 400, "invalid_value"),
    ({"owner": "a\x00b"}, 400, "invalid_value"),  # PostgreSQL text holds no NUL
]

# Only POST /admin/keys: the id ("taken" exists, made by the test first).
ID_CASES = [
    ({"id": "bad id!"}, 400, "invalid_value"),
    ({"id": "x" * 65}, 400, "invalid_value"),
    ({"id": "-dash"}, 400, "invalid_value"),
    ({"id": ""}, 400, "invalid_value"),
    ({"id": 5}, 400, "invalid_value"),
    ({"id": ["k"]}, 400, "invalid_value"),
    ({"id": "a\x00b"}, 400, "invalid_value"),
    ({"id": "anonymous"}, 409, "key_exists"),
    ({"id": CONFIG_KEY}, 409, "key_exists"),
    ({"id": "taken"}, 409, "key_exists"),
]

ROTATE_CASES = [
    (b"{nope", 400, "invalid_json"),
    (b"[]", 400, "invalid_request"),
    ({"grace": 60}, 400, "unknown_field"),
    ({"grace_seconds": -1}, 400, "invalid_value"),
    ({"grace_seconds": 365 * 86400 + 1}, 400, "invalid_value"),
    ({"grace_seconds": 1e300}, 400, "invalid_value"),
    ({"grace_seconds": "60"}, 400, "invalid_value"),
    ({"grace_seconds": True}, 400, "invalid_value"),
    ({"grace_seconds": None}, 400, "invalid_value"),
    ({"grace_seconds": [60]}, 400, "invalid_value"),
]

NUL = quote("a\x00b")
# (method, path, status, code). Status None: a value SQLite holds and PostgreSQL cannot (a NUL
# character): an answer that found nothing, or any 4xx error, never a 5xx; code None: any.
QUERY_CASES = [
    ("GET", "/admin/keys/nobody", 404, "key_not_found"),
    ("PATCH", "/admin/keys/nobody", 404, "key_not_found"),
    ("POST", "/admin/keys/nobody/rotate", 404, "key_not_found"),
    ("DELETE", "/admin/keys/nobody", 404, "key_not_found"),
    ("GET", "/admin/keys/" + "x" * 1000, 404, "key_not_found"),
    ("PUT", "/admin/keys/taken", 405, "method_not_allowed"),
    ("GET", "/admin/keys/taken/rotate", 405, "method_not_allowed"),
    ("GET", "/admin/audit?limit=0", 400, "invalid_value"),
    ("GET", "/admin/audit?limit=abc", 400, "invalid_value"),
    ("GET", "/admin/audit?limit=1001", 400, "invalid_value"),
    ("GET", "/admin/audit?limit=-1", 400, "invalid_value"),
    ("GET", "/admin/spend?group_by=week", 400, "invalid_value"),
    ("GET", "/admin/spend?group_by=", 400, "invalid_value"),
    ("GET", "/admin/spend?from=yesterday", 400, "invalid_value"),
    ("GET", "/admin/spend?to=2030-13-01", 400, "invalid_value"),
    ("GET", "/admin/spend?from=2030-02-30", 400, "invalid_value"),
    ("GET", "/admin/spend?key=taken", 400, "unknown_parameter"),
    ("GET", "/admin/requests?limit=0", 400, "invalid_value"),
    ("GET", "/admin/requests?limit=abc", 400, "invalid_value"),
    ("GET", "/admin/requests?limit=-5", 400, "invalid_value"),
    ("GET", f"/admin/requests?limit={MAX_PAGE + 1}", 400, "invalid_value"),
    ("GET", "/admin/requests?cursor=abc", 400, "invalid_value"),
    ("GET", "/admin/requests?cursor=-1", 400, "invalid_value"),
    ("GET", "/admin/requests?cursor=1.5", 400, "invalid_value"),
    ("GET", "/admin/requests?cursor=" + "9" * 30, 400, "invalid_value"),
    ("GET", "/admin/requests?status=abc", 400, "invalid_value"),
    ("GET", "/admin/requests?status=99", 400, "invalid_value"),
    ("GET", "/admin/requests?status=600", 400, "invalid_value"),
    ("GET", "/admin/requests?status=6xx", 400, "invalid_value"),
    ("GET", "/admin/requests?status=20x", 400, "invalid_value"),
    ("GET", "/admin/requests?since=yesterday", 400, "invalid_value"),
    ("GET", "/admin/requests?since=nan", 400, "invalid_value"),
    ("GET", "/admin/requests?since=inf", 400, "invalid_value"),
    ("GET", "/admin/requests?until=2031-01-01T00:00:00", 400, "invalid_value"),
    ("GET", "/admin/requests?format=csv", 400, "invalid_value"),
    ("GET", "/admin/requests?format=ndjson&limit=5", 400, "invalid_value"),
    ("GET", "/admin/requests?format=ndjson&cursor=1", 400, "invalid_value"),
    ("GET", "/admin/requests?user=taken", 400, "unknown_parameter"),
    ("GET", "/admin/requests/nothing-like-it", 404, "request_not_found"),
    ("GET", f"/admin/keys/{NUL}", None, None),
    ("PATCH", f"/admin/keys/{NUL}", None, None),
    ("GET", f"/admin/audit?key_id={NUL}", None, None),
    ("GET", f"/admin/spend?key_id={NUL}", None, None),
    ("GET", f"/admin/spend?model={NUL}", None, None),
    ("GET", f"/admin/requests?key_id={NUL}", None, None),
    ("GET", f"/admin/requests?format=ndjson&model={NUL}", None, None),
    ("GET", f"/admin/requests/{NUL}", None, None),
]

# Every admin endpoint with a request it would accept.
ENDPOINTS = [
    ("GET", "/admin/keys", None), ("POST", "/admin/keys", {}), ("GET", "/admin/keys/taken", None),
    ("PATCH", "/admin/keys/taken", {}), ("POST", "/admin/keys/taken/rotate", {}),
    ("DELETE", "/admin/keys/taken", None), ("GET", "/admin/audit", None),
    ("GET", "/admin/spend", None), ("GET", "/admin/requests", None),
    ("GET", "/admin/requests?format=ndjson", None), ("GET", "/admin/requests/some-id", None),
]


def assert_answers(client, cases):
    """Every case (method, path, body, status, code) is answered as it says, with an
    OpenAI-shaped 4xx error; the failure lists every case that is not."""
    wrong = []
    for method, path, body, status, code in cases:
        raw = body if isinstance(body, bytes) else None
        response = admin(client, method, path, None if raw else body, raw=raw)
        case = f"{method} {path[:80]} {str(body)[:80]}"
        if status is None and response.status_code < 400:
            continue  # a value one database holds and the other cannot: found nothing
        try:
            got = (response.status_code, error_code(response))
        except AssertionError as e:
            wrong.append(f"{case}: {response.status_code}, not an OpenAI error ({e})")
            continue
        status_ok = got[0] == status if status else 400 <= got[0] < 500
        if not status_ok or code not in (None, got[1]):
            wrong.append(f"{case}: got {got}, expected {(status or '4xx', code or 'any')}")
    assert not wrong, f"{len(wrong)} of {len(cases)} wrong:\n" + "\n".join(wrong)


def test_bad_key_fields_get_openai_errors(client):
    create_key(client, {"id": "taken"})
    cases = ([("POST", "/admin/keys", body, status, code)
              for body, status, code in FIELD_CASES + ID_CASES]
             + [("PATCH", "/admin/keys/taken", body, status, code)
                for body, status, code in FIELD_CASES]
             + [("PATCH", "/admin/keys/taken", {"id": "other"}, 400, "unknown_field")]
             + [("POST", "/admin/keys/taken/rotate", body, status, code)
                for body, status, code in ROTATE_CASES])
    assert_answers(client, cases)
    # and nothing was made or changed by them
    keys = admin(client, "GET", "/admin/keys").get_json()["data"]
    assert [k["id"] for k in keys] == [CONFIG_KEY, "taken"]
    assert keys[1]["updated_at"] == keys[1]["created_at"]


def test_bad_paths_and_queries_get_openai_errors(client):
    create_key(client, {"id": "taken"})
    cases = [(method, path, {} if method in ("PATCH", "POST") else None, status, code)
             for method, path, status, code in QUERY_CASES]
    assert_answers(client, cases)


def test_the_same_id_made_at_once_is_one_key_and_conflicts(client):
    """Several calls making the same id at the same moment: one 201, the rest 409 (not a
    database error as a 503)."""
    calls, barrier, answers = 8, threading.Barrier(8), []

    def make():
        own = client.application.test_client()
        barrier.wait()
        response = admin(own, "POST", "/admin/keys", {"id": "raced"})
        answers.append((response.status_code,
                        None if response.status_code == 201 else error_code(response)))

    threads = [threading.Thread(target=make) for _ in range(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(answers, key=str) == [(201, None)] + [(409, "key_exists")] * (calls - 1)


def test_every_admin_endpoint_needs_the_admin_key(client):
    create_key(client, {"id": "taken"})
    for method, path, body in ENDPOINTS:
        for key in (None, "not-the-admin-key", CONFIG_SECRET):
            response = admin(client, method, path, body, key=key)
            assert refused(response, 401, "invalid_admin_key"), (method, path, key)
            assert response.headers["WWW-Authenticate"] == "Bearer"
    assert admin(client, "GET", "/admin/keys/taken").status_code == 200  # not revoked


def test_every_admin_endpoint_is_off_without_an_admin_key_configured(apps, database):
    client = apps(database, admin_api_key="").test_client()
    for method, path, body in ENDPOINTS:
        for key in (None, ADMIN, ""):
            response = admin(client, method, path, body, key=key)
            assert refused(response, 403, "admin_disabled"), (method, path, key)


def test_every_admin_endpoint_says_when_the_database_is_off(apps, database):
    client = apps({**database, "enabled": False}).test_client()
    for method, path, body in ENDPOINTS:
        assert refused(admin(client, method, path, body), 404, "database_disabled"), \
            (method, path)
    assert chat(client, CONFIG_SECRET) == (200, None)  # the configuration's keys still work


# Arbitrary JSON, and objects of the fields the endpoints know holding arbitrary JSON.
SCALARS = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
ANY_JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                        max_leaves=12)
FIELDS = st.sampled_from(["id", "owner", "team", "models", "requests_per_minute",
                          "tokens_per_minute", "max_in_flight", "budget", "expires_at",
                          "metadata", "enabled"]) | st.text(max_size=10)
BUDGETS = st.dictionaries(st.sampled_from(["daily_usd", "monthly_usd", "total_usd",
                                           "soft_limit_percent"]) | st.text(max_size=6),
                          SCALARS, max_size=4)
NUMBERS = (st.none() | st.integers(min_value=-5, max_value=2**32)
           | st.floats(allow_nan=False, allow_infinity=False)
           | st.sampled_from([-1, 0, 0.5, 100, 2**31, 2**63, 1e300, -1e300]))
# Bodies of the right shape with values at and past their edges: these reach the database.
PLAUSIBLE = st.fixed_dictionaries({}, optional={
    "id": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,70}", fullmatch=True),
    "owner": st.text(max_size=210), "team": st.text(max_size=10),
    "models": st.lists(st.text(max_size=20), max_size=4),
    "requests_per_minute": NUMBERS, "tokens_per_minute": NUMBERS, "max_in_flight": NUMBERS,
    "budget": st.none() | st.fixed_dictionaries({}, optional={
        name: NUMBERS for name in ("daily_usd", "monthly_usd", "total_usd",
                                   "soft_limit_percent")}),
    "expires_at": NUMBERS | st.datetimes(timezones=st.timezones()).map(datetime.isoformat)
    | st.text(max_size=30),
    "metadata": st.dictionaries(st.text(max_size=8), ANY_JSON, max_size=4),
    "enabled": st.booleans()})
BODIES = PLAUSIBLE | ANY_JSON | st.dictionaries(FIELDS, ANY_JSON | BUDGETS, max_size=5)


def send_json(client, method, path, body):
    # every body as JSON, null too (admin() sends no body for None)
    return admin(client, method, path, raw=json.dumps(body).encode())


@hsettings(max_examples=200, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(create=BODIES, change=BODIES)
def test_arbitrary_json_bodies_get_2xx_or_4xx(client, create, change):
    if admin(client, "GET", "/admin/keys/fuzzed").status_code == 404:  # changed by every example
        create_key(client, {"id": "fuzzed"})
    for method, path, body, ok in [("POST", "/admin/keys", create, 201),
                                    ("PATCH", "/admin/keys/fuzzed", change, 200)]:
        response = send_json(client, method, path, body)
        event(f"{method} {response.status_code}")  # --hypothesis-show-statistics
        assert response.status_code == ok or 400 <= response.status_code < 500, \
            response.get_data()
        if response.status_code >= 400:
            error_code(response)
    # whatever was accepted can be listed and shown, and the keys still load for requests
    assert admin(client, "GET", "/admin/keys").status_code == 200
    assert admin(client, "GET", "/admin/keys/fuzzed").status_code == 200
    assert chat(client, CONFIG_SECRET) == (200, None)


# -- python -m app.keys --------------------------------------------------------------------------

def cli_json(database, cwd, *args):
    done = run_cli(database, cwd, *args)
    assert done.returncode == 0, (args, done.stderr)
    return orjson.loads(done.stdout)


def test_the_cli_manages_keys_an_app_on_the_same_database_serves(apps, database, tmp_path):
    made = cli_json(database, tmp_path, "create", "--id", "ops", "--owner", "ops-team",
                    "--models", f"{MODEL},{OTHER_MODEL}", "--rpm", "50", "--daily-usd", "3",
                    "--metadata", '{"ticket": "OPS-2"}')
    secret = made["key"]
    assert secret.startswith("sk-proxy-") and made["id"] == "ops"
    assert (made["owner"], made["models"], made["requests_per_minute"]) == \
        ("ops-team", [MODEL, OTHER_MODEL], 50)

    app = apps(database)
    client = app.test_client()
    assert chat(client, secret) == (200, None)

    listed = run_cli(database, tmp_path, "list")
    shown = run_cli(database, tmp_path, "show", "ops")
    for done in (listed, shown):
        assert done.returncode == 0 and secret not in done.stdout
        assert sha256(secret) not in done.stdout
    assert [k["id"] for k in orjson.loads(listed.stdout)] == ["ops"]
    assert orjson.loads(shown.stdout)["metadata"] == {"ticket": "OPS-2"}

    changed = cli_json(database, tmp_path, "update", "ops", "--disable", "--rpm", "7")
    assert (changed["enabled"], changed["requests_per_minute"]) == (False, 7)
    wait_until(lambda: chat(client, secret) == (401, "disabled_api_key"),
               what="the app refusing the disabled key")
    cli_json(database, tmp_path, "update", "ops", "--enable")
    wait_until(lambda: chat(client, secret)[0] == 200, what="the app taking the key again")

    rotated = cli_json(database, tmp_path, "rotate", "ops", "--grace", "0")
    wait_until(lambda: chat(client, secret) == (401, "invalid_api_key"),
               what="the app refusing the rotated-out secret")
    assert chat(client, rotated["key"]) == (200, None)

    # its three answered requests (at least) are written: the CLI reports what the API does
    def spend_of_ops():
        return admin(client, "GET", "/admin/spend?key_id=ops&group_by=key").get_json()

    wait_until(lambda: sum(r["requests"] for r in spend_of_ops()["data"]) >= 3,
               what="the key's requests written")
    spend = cli_json(database, tmp_path, "spend", "--key-id", "ops", "--group-by", "key")
    assert spend == spend_of_ops() and [r["key_id"] for r in spend["data"]] == ["ops"]

    cli_json(database, tmp_path, "revoke", "ops")
    wait_until(lambda: chat(client, rotated["key"]) == (401, "invalid_api_key"),
               what="the app refusing the revoked key")

    trail = admin(client, "GET", "/admin/audit?key_id=ops").get_json()["data"]
    assert [r["action"] for r in trail] == ["revoke", "rotate", "update", "update", "create"]
    assert all(r["actor"].startswith("cli ") for r in trail)


def test_the_cli_refuses_an_unknown_key_with_one_line(database, tmp_path):
    engine = engine_of(database)
    try:
        migrate(engine)  # else the CLI migrates first, and logs so
    finally:
        engine.dispose()
    done = run_cli(database, tmp_path, "revoke", "nobody")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("key_not_found: ")


def test_the_cli_migrates_down_and_up(database, tmp_path):
    assert cli_json(database, tmp_path, "migrate") == {"from": None, "to": head(),
                                                       "head": head()}
    assert cli_json(database, tmp_path, "migrate", "--revision", "0001") == \
        {"from": head(), "to": "0001", "head": head()}
    engine = engine_of(database)
    try:
        assert revision(engine) == "0001"
        assert "spend" not in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()
    assert cli_json(database, tmp_path, "migrate") == {"from": "0001", "to": head(),
                                                       "head": head()}
    assert cli_json(database, tmp_path, "migrate") == {"from": head(), "to": head(),
                                                       "head": head()}

