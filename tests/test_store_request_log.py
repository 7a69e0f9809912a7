"""The request log (issue 18), on SQLite and PostgreSQL: one row per proxied request that
says what its client saw (request id, status, cache, attempts, provider, cost, error code),
the filters, paging and NDJSON export of GET /admin/requests, bodies kept only when asked
(truncated, secrets and patterns redacted), and retention."""

from __future__ import annotations

import hashlib
import time
import json

import pytest

from app.store.writer import RETENTION_INTERVAL
from tests.conftest import FakeClock, provider
from tests.store_helpers import store_of, wait_until
from tests.store_support import (MODEL, PRICE, Apps, Wall, admin, all_rows, answer_with,
                                 bearer, chat, create_key, post, stream_with, usage, utc,
                                 wait_written)
from tests.upstream import Reply

OTHER = "gpt-other"
CONFIG_KEY = "sk-config-key-0123456789abcdef"
AUTH = {"api_keys_required": True,
        "api_keys": [{"id": "config-key", "sha256": hashlib.sha256(CONFIG_KEY.encode())
                      .hexdigest()}]}


@pytest.fixture
def apps(database):
    """Closed before the database is dropped (it is set up first)."""
    built = Apps()
    yield built
    built.close()


def log_app(apps, section, upstream, **sections):
    sections.setdefault("http_client", {"retry_attempts": 0})
    return apps.make(section, [provider(upstream.url, models=[MODEL, OTHER])],
                     pricing={"models": [PRICE]}, auth=AUTH, **sections)


def row_of(client, request_id):
    response = client.get(f"/admin/requests/{request_id}", headers=admin())
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.json


def seen(response) -> dict:
    """What a client saw of its answer, in the request log's terms."""
    h = response.headers
    try:
        error = json.loads(response.get_data())["error"]["code"]
    except (ValueError, KeyError, TypeError):
        error = None
    return {"request_id": h["X-Request-ID"], "status": response.status_code,
            "cache": h.get("X-Cache", ""), "attempts": int(h["X-Proxy-Attempts"]),
            "provider": h.get("X-Proxy-Provider", ""), "error_code": error,
            "overhead_ms": float(h["X-Proxy-Overhead-Ms"]),
            "cost": h.get("X-Proxy-Cost-USD")}


def test_each_row_says_what_its_client_saw(apps, database, upstream):
    """A mix of answers: 200 (a cache MISS, then the same request a HIT), 400 bad body, 401
    without a key and with an unknown one (logged, as key_id "unauthenticated": no key was
    identified), 403 model not allowed, 429 rate limit, 502 upstream failure, a stream, and a
    request id chosen by the client. Each row has the X-Request-ID the client got, its status,
    X-Cache, X-Proxy-Attempts, X-Proxy-Provider, X-Proxy-Cost-USD, the JSON error's code, the
    overhead header's milliseconds, the tokens of the usage it was answered with (none for a
    cache hit, which cost nothing), and latency >= overhead >= 0."""
    app = log_app(apps, database, upstream, cache={"enabled": True})
    client = app.test_client()
    key_id, key = create_key(client, id="logged")
    limited_id, limited = create_key(client, id="limited", models=[MODEL],
                                     requests_per_minute=1)
    used = usage(120, 30, cached=20)
    # The upstream's answers, in the order the cases below reach it.
    upstream.script(answer_with(used), stream_with(usage(7, 2)), answer_with(usage(5, 3)),
                    answer_with(usage(5, 3)),
                    Reply(status=500, body={"error": {"message": "upstream broke"}}))
    cases = [  # (what, key, body, extra headers)
        ("miss", key, chat("cache me"), {}),
        ("hit", key, chat("cache me"), {}),
        ("stream", key, chat("stream me", stream=True), {}),
        ("client id", key, chat("my id"), {"X-Request-ID": "client-chosen-id-1"}),
        ("bad body", key, {"model": MODEL, "messages": "not a list"}, {}),
        ("no key", None, chat(), {}),
        ("unknown key", "sk-not-a-key-of-this-proxy", chat(), {}),
        ("forbidden", limited, chat(model=OTHER), {}),
        ("limited 1", limited, chat("one"), {}),  # the upstream's third answer
        ("limited 2", limited, chat("two"), {}),
        ("upstream down", key, chat("fail"), {}),
    ]
    saw = {}
    for what, k, body, extra in cases:
        headers = {**(bearer(k) if k else {}), **extra}
        response = post(client, "/v1/chat/completions", body, headers)
        saw[what] = {**seen(response), "key": k, "body": response.get_data()}
    assert [saw[w]["status"] for w, *_ in cases] == \
        [200, 200, 200, 200, 400, 401, 401, 403, 200, 429, 502]
    assert saw["hit"]["cache"] == "HIT" and saw["miss"]["cache"] == "MISS"
    assert saw["client id"]["request_id"] == "client-chosen-id-1"
    wait_written(app, len(cases))

    owners = {key: key_id, limited: limited_id, None: "unauthenticated",
              "sk-not-a-key-of-this-proxy": "unauthenticated"}
    for what, k, body, _ in cases:
        client_saw = saw[what]
        row = row_of(client, client_saw["request_id"])
        assert row["request_id"] == client_saw["request_id"], what
        assert row["key_id"] == owners[k], what
        assert row["status"] == client_saw["status"], what
        assert row["cache"] == client_saw["cache"], what
        assert row["attempts"] == client_saw["attempts"], what
        assert row["provider"] == client_saw["provider"], what
        assert row["error_code"] == client_saw["error_code"], what
        assert row["stream"] is (what == "stream"), what
        assert row["endpoint"] == "/v1/chat/completions"
        assert row["latency_ms"] >= row["overhead_ms"] >= 0, what
        assert row["overhead_ms"] == pytest.approx(client_saw["overhead_ms"], abs=0.0011), what
        if client_saw["cost"] is not None:
            assert f"{row['cost_usd']:.8f}" == client_saw["cost"], what
        if client_saw["status"] == 200 and client_saw["cache"] != "HIT" and what != "stream":
            answered = json.loads(client_saw["body"])["usage"]
            assert (row["prompt_tokens"], row["completion_tokens"]) == (
                answered["prompt_tokens"], answered["completion_tokens"]), what
            assert row["model"] == row["served_model"] == body["model"], what
    miss, hit = row_of(client, saw["miss"]["request_id"]), row_of(client, saw["hit"]["request_id"])
    assert (miss["prompt_tokens"], miss["completion_tokens"], miss["cached_tokens"]) == \
        (120, 30, 20)
    assert miss["cost_usd"] == pytest.approx((100 * 2.0 + 20 * 0.5 + 30 * 8.0) / 1e6)
    assert (hit["prompt_tokens"], hit["cost_usd"], hit["attempts"]) == (0, 0.0, 0)
    streamed = row_of(client, saw["stream"]["request_id"])
    assert (streamed["prompt_tokens"], streamed["completion_tokens"]) == (7, 2)
    assert streamed["cost_usd"] == pytest.approx((7 * 2.0 + 2 * 8.0) / 1e6)
    assert saw["stream"]["cost"] is None  # a stream's cost is known after its headers
    errors = {w: row_of(client, saw[w]["request_id"])["error_code"] for w in (
        "bad body", "no key", "unknown key", "forbidden", "limited 2", "upstream down")}
    assert errors == {"bad body": "invalid_type", "no key": "missing_api_key",
                      "unknown key": "invalid_api_key", "forbidden": "model_not_allowed",
                      "limited 2": "rate_limit_exceeded", "upstream down": "upstream_error"}
    # The list says the same, newest first, without bodies.
    page = client.get("/admin/requests", headers=admin()).json
    assert [r["request_id"] for r in page["data"]] == \
        [saw[w]["request_id"] for w, *_ in reversed(cases)]
    assert all("request_body" not in r for r in page["data"])
    missing = client.get("/admin/requests/no-such-request", headers=admin())
    assert missing.status_code == 404 and missing.json["error"]["code"] == "request_not_found"


def test_the_filters_select_by_key_model_status_and_time(apps, database, upstream):
    """Rows at known wall-clock times: key_id, model, status (one status and a class),
    since (inclusive) and until (exclusive), as ISO times or UNIX seconds, and combinations."""
    t0 = utc("2027-02-01T09:00:00")
    wall = Wall(t0)
    app = log_app(apps, database, upstream, wall=wall)
    client = app.test_client()
    a_id, a = create_key(client, id="key-a")
    b_id, b = create_key(client, id="key-b", requests_per_minute=1)
    made = []  # (request id, key id, model, status, at)

    def send(key, key_id, body, status):
        response = post(client, "/v1/chat/completions", body, bearer(key))
        assert response.status_code == status
        made.append((response.headers["X-Request-ID"], key_id, body.get("model"), status,
                     wall()))

    for _ in range(3):
        send(a, a_id, chat(), 200)
    wall.set(t0 + 60)
    send(b, b_id, chat(), 200)
    send(b, b_id, chat(), 429)
    send(b, b_id, chat(), 429)
    wall.set(t0 + 120)
    send(a, a_id, {"model": MODEL, "messages": []}, 400)
    wall.set(t0 + 180)
    send(a, a_id, chat(model=OTHER), 200)
    wait_written(app, len(made))

    def ids(**query):
        response = client.get("/admin/requests", query_string=query, headers=admin())
        assert response.status_code == 200, response.get_data(as_text=True)
        return sorted(r["request_id"] for r in response.json["data"])

    def want(test):
        return sorted(m[0] for m in made if test(*m[1:]))

    iso = "2027-02-01T09:0{}:00Z".format
    assert ids(key_id=a_id) == want(lambda k, m, s, at: k == a_id)
    assert ids(key_id=b_id) == want(lambda k, m, s, at: k == b_id)
    assert ids(model=OTHER) == want(lambda k, m, s, at: m == OTHER)
    assert len(ids(status="429")) == 2
    assert ids(status="429") == want(lambda k, m, s, at: s == 429)
    assert ids(status="4xx") == want(lambda k, m, s, at: 400 <= s < 500)
    assert ids(status="2xx") == want(lambda k, m, s, at: s == 200)
    assert ids(since=iso(1)) == want(lambda k, m, s, at: at >= t0 + 60)
    assert ids(until=iso(2)) == want(lambda k, m, s, at: at < t0 + 120)
    assert ids(since=iso(1), until=iso(2)) == want(lambda k, m, s, at: t0 + 60 <= at < t0 + 120)
    assert ids(since=str(t0 + 120)) == want(lambda k, m, s, at: at >= t0 + 120)
    assert ids(key_id=b_id, status="429", since=iso(1)) == \
        want(lambda k, m, s, at: k == b_id and s == 429)
    assert ids(key_id=a_id, status="5xx") == []
    export = all_rows(client, key_id=a_id, status="2xx")
    assert sorted(r["request_id"] for r in export) == \
        want(lambda k, m, s, at: k == a_id and s == 200)


def test_paging_visits_every_row_once_and_the_export_has_them_all(apps, database, upstream):
    """23 rows, 5 a page: following next_cursor visits each once, newest first, and ends
    with next_cursor null; the NDJSON export has every row, one JSON object a line, oldest
    first; a filter pages the same way."""
    app = log_app(apps, database, upstream)
    client = app.test_client()
    _, key = create_key(client, id="pager")
    _, other = create_key(client, id="pager-b")
    sent = []
    for i in range(23):
        response = post(client, "/v1/chat/completions", chat(f"number {i}"),
                        bearer(other if i % 4 == 0 else key))
        sent.append(response.headers["X-Request-ID"])
    wait_written(app, len(sent))

    def pages(**query):
        visited, cursor, sizes = [], None, []
        for _ in range(30):  # bounded: more pages than rows would be a loop
            params = {"limit": 5, **query, **({"cursor": cursor} if cursor else {})}
            body = client.get("/admin/requests", query_string=params, headers=admin()).json
            sizes.append(len(body["data"]))
            visited += [r["request_id"] for r in body["data"]]
            cursor = body["next_cursor"]
            if cursor is None:
                return visited, sizes
        pytest.fail("paging did not end")

    visited, sizes = pages()
    assert visited == list(reversed(sent))
    assert sizes == [5, 5, 5, 5, 3]
    pager_b = [rid for i, rid in enumerate(sent) if i % 4 == 0]
    visited_b, sizes_b = pages(key_id="pager-b")
    assert visited_b == list(reversed(pager_b)) and sizes_b == [5, 1]

    response = client.get("/admin/requests", query_string={"format": "ndjson"},
                          headers=admin())
    assert response.status_code == 200
    assert response.mimetype == "application/x-ndjson"
    lines = response.get_data(as_text=True).splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["request_id"] for r in rows] == sent
    assert [int(r["cursor"]) for r in rows] == sorted(int(r["cursor"]) for r in rows)
    assert [r["request_id"] for r in all_rows(client, key_id="pager-b")] == pager_b


# -- bodies -----------------------------------------------------------------------------------

def test_bodies_are_not_kept_by_default(apps, database, upstream):
    app = log_app(apps, database, upstream)
    client = app.test_client()
    _, key = create_key(client)
    response = post(client, "/v1/chat/completions", chat("a secret of mine"), bearer(key))
    wait_written(app, 1)
    row = row_of(client, response.headers["X-Request-ID"])
    assert row["request_body"] is None and row["response_body"] is None
    assert row["status"] == 200


def test_kept_bodies_are_truncated_with_secrets_and_patterns_redacted(apps, database, upstream):
    """With log_bodies: the request body is kept, the client's key, the provider's key and
    every redact_patterns match replaced by "[redacted]", then cut to log_body_max_kb; a whole
    answer is kept as the client got it; a stream's answer is not kept, its request is."""
    provider_key = "sk-upstream-provider-secret-42"
    app = apps.make(database, [provider(upstream.url, api_key_env="STORE_TEST_UPSTREAM_KEY")],
                    environ={"STORE_TEST_UPSTREAM_KEY": provider_key},
                    database={"log_bodies": True, "log_body_max_kb": 1,
                              "redact_patterns": [r"ssn-\d{3}-\d{4}"]},
                    http_client={"retry_attempts": 0})
    client = app.test_client()
    _, key = create_key(client)
    text = (f"my key is {key}, the upstream's is {provider_key}, my number ssn-123-4567; "
            + "padding " * 400)
    response = post(client, "/v1/chat/completions", chat(text), bearer(key))
    assert response.status_code == 200
    assert upstream.requests[-1].headers["Authorization"] == f"Bearer {provider_key}"
    streamed = post(client, "/v1/chat/completions", chat(f"again {key}", stream=True),
                    bearer(key))
    assert streamed.status_code == 200
    wait_written(app, 2)

    row = row_of(client, response.headers["X-Request-ID"])
    kept = row["request_body"]
    for secret in (key, provider_key, "ssn-123-4567"):
        assert secret not in kept
    assert kept.count("[redacted]") == 3
    assert kept.startswith('{"model": "gpt-test"')
    assert kept.endswith("...[truncated]")
    assert len(kept.encode()) == 1024 + len("...[truncated]")
    assert row["response_body"] == response.get_data(as_text=True)
    stream_row = row_of(client, streamed.headers["X-Request-ID"])
    assert stream_row["response_body"] is None
    assert key not in stream_row["request_body"] and "[redacted]" in stream_row["request_body"]


# -- retention --------------------------------------------------------------------------------

def test_rows_older_than_the_retention_are_deleted_by_the_writer(apps, database, upstream):
    """retention_days 1: two rows made on 1 March, one on 3 March. The writer deletes old
    rows once per RETENTION_INTERVAL of its clock: until that interval has passed the old
    rows stay; once the clock has moved past it and the writer is woken, they go (bounded
    wait), the new one stays, and the spend they recorded is kept."""
    wall = Wall(utc("2027-03-01T12:00:00"))
    clock = FakeClock()
    app = log_app(apps, database, upstream, wall=wall, clock=clock,
                  database={"retention_days": 1})
    client = app.test_client()
    key_id, key = create_key(client, id="retained")
    old = [post(client, "/v1/chat/completions", chat(f"old {i}"), bearer(key))
           .headers["X-Request-ID"] for i in range(2)]
    wait_written(app, 2)
    wall.set(utc("2027-03-03T12:00:00"))
    new = post(client, "/v1/chat/completions", chat("new"), bearer(key)).headers["X-Request-ID"]
    wait_written(app, 3)
    writer = store_of(app).writer
    writer.last_refresh = None  # set again once the writer has been round its loop
    writer.wake()
    wait_until(lambda: writer.last_refresh is not None, what="a writer loop")
    assert [r["request_id"] for r in all_rows(client)] == old + [new]  # not yet: no interval

    clock.advance(RETENTION_INTERVAL + 1)
    writer.wake()
    wait_until(lambda: [r["request_id"] for r in all_rows(client)] == [new],
               what="the old rows' deletion")
    spend = client.get("/admin/spend", query_string={"key_id": key_id}, headers=admin()).json
    assert spend["total"]["requests"] == 3


def test_a_nul_in_a_clients_text_costs_no_row(apps, database, upstream):
    """PostgreSQL takes no NUL in text: a model name holding one is logged without it, and the
    rows written in the same batch (this one's and its neighbours') are all written."""
    app = log_app(apps, database, upstream)
    client = app.test_client()
    _, key = create_key(client)
    odd = post(client, "/v1/chat/completions", chat(model="gpt\x00odd"), bearer(key))
    fine = post(client, "/v1/chat/completions", chat(), bearer(key))
    assert (odd.status_code, fine.status_code) == (404, 200)
    wait_written(app, 2)
    assert store_of(app).writer.stats()["dropped"] == 0
    assert row_of(client, odd.headers["X-Request-ID"])["model"] == "gptodd"
    assert row_of(client, fine.headers["X-Request-ID"])["status"] == 200


def test_the_admin_api_reads_its_own_writes_at_once(apps, database, upstream):
    """A request answered, then looked up at once: the admin reads have this process's queued
    rows written first, even with a writer that would wait seconds to fill a batch."""
    app = log_app(apps, {**database, "flush_interval": 5.0}, upstream)
    client = app.test_client()
    _, key = create_key(client)
    answered = post(client, "/v1/chat/completions", chat(), bearer(key))
    started = time.monotonic()
    assert row_of(client, answered.headers["X-Request-ID"])["status"] == 200
    spent = client.get("/admin/spend", query_string={"group_by": "key"}, headers=admin()).json
    assert [r["requests"] for r in spent["data"]] == [1]
    assert time.monotonic() - started < 2.0  # not the 5 s batch wait
