"""Spend and budgets (issue 18), on SQLite and PostgreSQL: what the keys made over HTTP spend
matches the price table, header by header and in GET /admin/spend; budgets refuse with the
OpenAI error shape and reset when their period does; the soft limit warns; and concurrent
requests overshoot a budget by no more than the bound app/store/spend.py documents."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import threading
import time
from collections import defaultdict

import pytest
import requests

from app.providers import Call
from tests.conftest import live_server, provider, wait_for_calls
from tests.store_helpers import store_of
from tests.store_support import (MODEL, PRICE, Apps, Wall, admin, answer_with, bearer, chat,
                                 create_key, post, priced, sample, stream_with, usage, utc,
                                 wait_written)

CHEAP = "gpt-cheap"
CHEAP_PRICE = {"model": CHEAP, "input": 0.25, "output": 1.0, "cached_input": 0.125}
PRICES = {"defaults": False, "models": [PRICE, CHEAP_PRICE]}
ONE = usage(100, 50, cached=40)  # 60 x 2 + 40 x 0.5 + 50 x 8 = 540 USD per million: 0.00054
ONE_COST = 0.00054


@pytest.fixture
def apps(database):
    """Closed before the database is dropped (it is set up first)."""
    built = Apps()
    yield built
    built.close()


def chat_app(apps, database, upstream, wall, **sections):
    return apps.make(database, [provider(upstream.url, models=[MODEL, CHEAP])], wall=wall,
                     pricing=PRICES, **sections)


def ask(client, key, body):
    return post(client, "/v1/chat/completions", body, bearer(key))


# -- spend matches the price table ------------------------------------------------------------

def expected_report(done, group_by, key_id=None, model=None, start=None, end=None):
    """What /admin/spend should say, summed here from the requests made."""
    name = {"day": "day", "model": "model", "key": "key_id"}[group_by]
    groups = defaultdict(lambda: {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                  "cached_tokens": 0, "cost_usd": 0.0})
    for row in done:
        if ((key_id and row["key_id"] != key_id) or (model and row["model"] != model)
                or (start and row["day"] < start) or (end and row["day"] > end)):
            continue
        sums = groups[row[name]]
        sums["requests"] += 1
        used = row["usage"]
        sums["prompt_tokens"] += used["prompt_tokens"]
        sums["completion_tokens"] += used["completion_tokens"]
        sums["cached_tokens"] += used.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        sums["cost_usd"] += row["cost"]
    return [{name: group, **sums} for group, sums in sorted(groups.items())]


def same_report(got, want):
    assert [{k: v for k, v in r.items() if k != "cost_usd"} for r in got] == \
        [{k: v for k, v in r.items() if k != "cost_usd"} for r in want]
    for g, w in zip(got, want):
        assert g["cost_usd"] == pytest.approx(w["cost_usd"], rel=1e-9, abs=1e-12)


def test_spend_matches_the_price_table_per_answer_and_in_the_report(apps, database, upstream):
    """Two keys made through POST /admin/keys, two priced models, answers with known usage
    (cached prompt tokens among them) over two UTC days, streams among them: each whole
    answer's X-Proxy-Cost-USD is its usage at the price table, and every grouping and filter
    of GET /admin/spend sums to what the price table gives for the requests it covers."""
    wall = Wall(utc("2027-03-10T12:00:00"))
    app = chat_app(apps, database, upstream, wall)
    client = app.test_client()
    key_ids, secrets = {}, {}
    for name in ("a", "b"):
        key_ids[name], secrets[name] = create_key(client, id=f"spender-{name}")
    plan = [  # (day, key, model, usage, stream)
        ("2027-03-10", "a", MODEL, ONE, False),
        ("2027-03-10", "a", MODEL, usage(300, 20), False),
        ("2027-03-10", "b", CHEAP, usage(1000, 200, cached=500), False),
        ("2027-03-10", "a", MODEL, usage(60, 30, cached=10), True),
        ("2027-03-11", "b", MODEL, usage(80, 40), False),
        ("2027-03-11", "a", CHEAP, usage(500, 100), True),
        ("2027-03-11", "b", CHEAP, usage(10, 10, cached=5), False),
    ]
    done = []
    for day, key, model, used, stream in plan:
        if day == "2027-03-11" and wall() < utc("2027-03-11T00:00:00"):
            wall.advance(86400)
        upstream.script(stream_with(used, model) if stream else answer_with(used, model))
        response = ask(client, secrets[key], chat(model=model, stream=stream))
        assert response.status_code == 200
        cost = priced(used, PRICE if model == MODEL else CHEAP_PRICE)
        if stream:  # a stream's usage comes after its headers: no cost header, a row's cost
            assert "X-Proxy-Cost-USD" not in response.headers
        else:
            assert response.headers["X-Proxy-Cost-USD"] == f"{cost:.8f}"
        done.append({"day": day, "key_id": key_ids[key], "model": model, "usage": used,
                     "cost": cost, "request_id": response.headers["X-Request-ID"]})
    assert done[0]["cost"] == pytest.approx(ONE_COST)
    wait_written(app, len(done))

    for row in done:  # the streams' costs too, as the request log has them
        logged = client.get(f"/admin/requests/{row['request_id']}", headers=admin()).json
        assert logged["cost_usd"] == pytest.approx(row["cost"], rel=1e-9)

    queries = [{"group_by": "day"}, {"group_by": "model"}, {"group_by": "key"}, {},
               {"group_by": "model", "key_id": key_ids["a"]},
               {"group_by": "key", "model": CHEAP},
               {"group_by": "day", "from": "2027-03-11"},
               {"group_by": "model", "to": "2027-03-10"},
               {"group_by": "key", "from": "2027-03-10", "to": "2027-03-10",
                "key_id": key_ids["b"], "model": CHEAP},
               {"group_by": "day", "from": "2027-03-12"}]
    for query in queries:
        response = client.get("/admin/spend", query_string=query, headers=admin())
        assert response.status_code == 200, response.get_data(as_text=True)
        report = response.json
        want = expected_report(done, query.get("group_by", "day"), query.get("key_id"),
                               query.get("model"), query.get("from"), query.get("to"))
        same_report(report["data"], want)
        total = report["total"]
        assert total["requests"] == sum(r["requests"] for r in want)
        assert total["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in want),
                                                  rel=1e-9, abs=1e-12)
    everything = client.get("/admin/spend", headers=admin()).json
    assert [r["day"] for r in everything["data"]] == ["2027-03-10", "2027-03-11"]
    assert everything["total"]["cost_usd"] == pytest.approx(sum(r["cost"] for r in done))


# -- budgets --------------------------------------------------------------------------------

def budget_app(apps, database, upstream, wall):
    """Every answer costs ONE_COST."""
    upstream.default = lambda recorded: answer_with(ONE)
    return chat_app(apps, database, upstream, wall)


def spend_until_refused(client, key, most=20):
    """Requests until the first refusal; (answers admitted, the refusal)."""
    for admitted in range(most):
        response = ask(client, key, chat())
        if response.status_code != 200:
            return admitted, response
    pytest.fail(f"{most} requests were all admitted")


def assert_budget_refusal(response, period, reset_iso=None):
    assert response.status_code == 429
    error = response.json["error"]
    assert error["type"] == "insufficient_quota"
    assert error["code"] == "budget_exceeded"
    assert f"{period} budget" in error["message"]
    if reset_iso is None:
        assert "does not reset" in error["message"]
        assert "Retry-After" not in response.headers
        assert "X-Budget-Reset" not in response.headers
    else:
        assert reset_iso in error["message"]
        assert response.headers["X-Budget-Reset"] == reset_iso


def test_a_daily_budget_refuses_until_the_next_utc_midnight(apps, database, upstream):
    """A daily budget of 0.0015 USD at 0.00054 an answer: the third answer (spent 0.00108 <
    0.0015 when admitted) passes, the fourth is refused without reaching the upstream, with
    Retry-After the seconds to midnight UTC and X-Budget-Reset that midnight; a minute past
    midnight the key is admitted again."""
    wall = Wall(utc("2027-03-15T23:59:00"))
    app = budget_app(apps, database, upstream, wall)
    client = app.test_client()
    _, key = create_key(client, budget={"daily_usd": 0.0015})
    admitted, refusal = spend_until_refused(client, key)
    assert admitted == 3
    assert upstream.calls == 3
    assert_budget_refusal(refusal, "daily", "2027-03-16T00:00:00Z")
    assert refusal.headers["Retry-After"] == "60"
    assert ask(client, key, chat()).status_code == 429  # still the same day
    wall.advance(120)
    assert ask(client, key, chat()).status_code == 200
    assert upstream.calls == 4


def test_a_monthly_budget_sums_the_month_and_resets_on_the_first(apps, database, upstream):
    """A monthly budget of 0.001 USD: one answer on 29 April, one on 30 April (each day's spend
    alone is under the budget, the month's is not), then refused until 1 May, 00:00 UTC."""
    wall = Wall(utc("2027-04-29T12:00:00"))
    app = budget_app(apps, database, upstream, wall)
    client = app.test_client()
    _, key = create_key(client, budget={"monthly_usd": 0.001})
    assert ask(client, key, chat()).status_code == 200
    wait_written(app, 1)  # the first day's spend read back from the database as well
    wall.set(utc("2027-04-30T22:00:00"))
    admitted, refusal = spend_until_refused(client, key)
    assert admitted == 1
    assert_budget_refusal(refusal, "monthly", "2027-05-01T00:00:00Z")
    assert refusal.headers["Retry-After"] == "7200"
    wall.set(utc("2027-05-01T00:00:01"))
    assert ask(client, key, chat()).status_code == 200


def test_a_total_budget_never_resets_and_raising_it_readmits_at_once(apps, database, upstream):
    """A total budget: refused with no reset time (no Retry-After, no X-Budget-Reset), still
    refused 40 days later; a PATCH that raises it admits the key's next request at once."""
    wall = Wall(utc("2027-06-01T08:00:00"))
    app = budget_app(apps, database, upstream, wall)
    client = app.test_client()
    key_id, key = create_key(client, budget={"total_usd": 0.001})
    admitted, refusal = spend_until_refused(client, key)
    assert admitted == 2
    assert_budget_refusal(refusal, "total")
    wait_written(app, 2)
    wall.advance(40 * 86400)
    assert ask(client, key, chat()).status_code == 429
    raised = client.patch(f"/admin/keys/{key_id}", json={"budget": {"total_usd": 0.002}},
                          headers=admin())
    assert raised.status_code == 200 and raised.json["budget"]["total_usd"] == 0.002
    assert ask(client, key, chat()).status_code == 200
    spent = client.get(f"/admin/keys/{key_id}", headers=admin()).json["spend"]
    assert spent["total"] == pytest.approx(3 * ONE_COST)


def test_the_soft_limit_warns_once_and_refusals_are_counted(apps, database, upstream, caplog):
    """A daily budget of 0.002 USD with a soft limit at 50%: the second answer takes the day's
    spend past 0.001, which logs one warning and counts one crossing in /metrics (later
    answers do not again); the fifth and sixth requests are refused, counted by key and
    period."""
    wall = Wall(utc("2027-03-15T10:00:00"))
    app = budget_app(apps, database, upstream, wall)
    client = app.test_client()
    key_id, key = create_key(client, budget={"daily_usd": 0.002, "soft_limit_percent": 50})
    crossings = "llm_proxy_budget_soft_limit_crossings_total"
    refusals = "llm_proxy_budget_refused_requests_total"
    with caplog.at_level(logging.WARNING, logger="llm_proxy.store"):
        assert ask(client, key, chat()).status_code == 200
        assert sample(app, crossings, key_id=key_id, period="daily") == 0
        assert not [r for r in caplog.records if "budget" in r.getMessage()]
        statuses = [ask(client, key, chat()).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    warnings = [r for r in caplog.records if "of its daily budget" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert key_id in warnings[0].getMessage() and "50%" in warnings[0].getMessage()
    assert sample(app, crossings, key_id=key_id, period="daily") == 1
    assert sample(app, refusals, key_id=key_id, period="daily") == 2


# -- the bound, with 50 concurrent requests -----------------------------------------------------

def test_fifty_concurrent_requests_overshoot_the_budget_by_at_most_one_estimate(
        apps, database, upstream):
    """The bound (app/store/spend.py): a request is admitted while the key's spend plus the
    reservations of its requests in flight is under the budget, and it reserves its estimate
    ``e`` (PriceTable.estimate of its reservation: prompt estimate plus max_tokens, at the
    dearer rate). So what one process admits costs at most B + e, plus whatever answers
    cost beyond their estimates (nothing here: the upstream reports exactly the reserved
    tokens, at one rate for input and output, so each answer costs c = e).

    50 requests at once on a live server; the upstream holds every answer until all 50 have
    been decided (reached it or been refused), so no answer settles while the others are
    admitted. With B = 10.5 e: 11 admitted (the 11th sees 10 e < B in flight), 39 refused, and
    the spend recorded, 11 e, is at most B + e. Without the reservation nothing would stop
    them: no cost is settled before the gate opens, so all 50 would pass and spend 50 e,
    nearly five times the budget."""
    price = {"model": MODEL, "input": 4.0, "output": 4.0}
    gate = threading.Event()
    app = apps.make(database, [provider(upstream.url)], pricing={"models": [price]},
                    routing={"max_in_flight": 200, "provider_max_in_flight": 200},
                    http_client={"retry_attempts": 0})
    llm_proxy = app.extensions["llm_proxy"]
    body = chat("How much is too much?", max_tokens=40)
    raw = json.dumps(body).encode()
    tokens = llm_proxy.limiter.reservation(Call("chat", body, raw, False),
                                           llm_proxy.condensation.condenser.estimate_tokens)
    estimate = llm_proxy.prices.estimate(MODEL, tokens)
    used = usage(tokens - 40, 40)
    cost = priced(used, {**price, "cached_input": 4.0})
    assert cost == pytest.approx(estimate) and estimate > 0
    budget = 10.5 * estimate

    def held(recorded):
        gate.wait(5)
        return answer_with(used)
    upstream.default = held
    client = app.test_client()
    key_id, key = create_key(client, budget={"daily_usd": budget}, max_in_flight=0)

    refused = []
    lock = threading.Lock()

    def one(url):
        response = requests.post(f"{url}/v1/chat/completions", data=raw, timeout=10,
                                 headers={**bearer(key), "Content-Type": "application/json"})
        if response.status_code != 200:
            with lock:
                refused.append(response)
        return response.status_code

    with live_server(app, threads=64) as url:
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            futures = [pool.submit(one, url) for _ in range(50)]
            wait_for_calls(upstream, 1)
            try:
                deadline_ok = _wait_decided(upstream, refused, 50)
            finally:
                gate.set()
            statuses = [f.result(timeout=10) for f in futures]
    assert deadline_ok, f"{upstream.calls} reached the upstream, {len(refused)} refused"
    admitted = statuses.count(200)
    assert admitted == math.ceil(budget / estimate) == 11
    assert upstream.calls == admitted
    assert statuses.count(429) == 50 - admitted
    assert all(r.json()["error"]["code"] == "budget_exceeded" for r in refused)
    wait_written(app, 50)  # the refusals leave rows in the log too, but spend nothing
    report = client.get("/admin/spend", query_string={"key_id": key_id}, headers=admin()).json
    spent = report["total"]["cost_usd"]
    assert report["total"]["requests"] == admitted
    assert spent == pytest.approx(admitted * cost)
    assert spent <= budget + estimate + 1e-12
    assert spent > budget  # the last one admitted did overshoot: the bound is not slack
    assert store_of(app).ledger.spent(key_id)["daily"] == pytest.approx(spent)


def _wait_decided(upstream, refused, count, timeout=5.0):
    """Until ``count`` requests have reached the upstream or been refused (bounded)."""
    deadline = time.monotonic() + timeout
    while upstream.calls + len(refused) < count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
