"""The pooled HTTP client: retries exactly where nothing can have been generated, backoff, stats."""

import time

import pytest

from app.errors import UpstreamError, UpstreamTimeout
from app.pipeline import Attempts, Request
from app.upstream.client import HttpClient
from app.upstream import retry_after_seconds
from settings import HttpClientSettings
from tests.conftest import provider
from tests.upstream import Hang, Reply, Reset

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


def make_client(**overrides):
    sleeps = []
    settings = HttpClientSettings(**{"connect_timeout": 1.0, "timeout": 0.5, **overrides})
    client = HttpClient("up", settings, pool_size=4, sleep=sleeps.append, jitter=lambda: 1.0)
    return client, sleeps


def request(seconds=30.0):
    now = time.monotonic()
    return Request(id="r1", started=now, deadline=now + seconds)


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_refusals_are_retried_up_to_retry_attempts_with_exponential_backoff(upstream, status):
    upstream.script(*[Reply(status, {})] * 5)
    client, sleeps = make_client(retry_attempts=3, backoff_base=0.1)
    attempts = Attempts()
    response = client.post(upstream.url + "/v1/chat/completions", b"{}", {}, request(), attempts)
    assert response.status == status  # the last answer, for the adapter to judge
    assert upstream.calls == 4 and attempts.count == 4
    assert sleeps == pytest.approx([0.1, 0.2, 0.4])


def test_a_retry_succeeds_when_the_provider_recovers(upstream):
    upstream.script(Reply(503, {}))
    client, _ = make_client()
    response = client.post(upstream.url + "/v1/chat/completions", b'{"model":"m"}', {},
                           request(), Attempts())
    assert response.status == 200 and upstream.calls == 2


def test_retry_after_is_honoured_up_to_its_cap(upstream):
    upstream.script(Reply(429, {}, headers={"Retry-After": "2"}),
                    Reply(429, {}, headers={"Retry-After": "60"}))
    client, sleeps = make_client(backoff_base=0.01, retry_after_max=5)
    response = client.post(upstream.url + "/v1/x", b"{}", {}, request(), Attempts())
    assert sleeps == [2.0]  # the second asks for longer than the cap: no wait, hand back
    assert response.status == 429 and upstream.calls == 2


@pytest.mark.parametrize("status", [500, 400, 401])
def test_other_statuses_are_not_retried(upstream, status):
    upstream.script(Reply(status, {}))
    client, sleeps = make_client()
    assert client.post(upstream.url + "/v1/x", b"{}", {}, request(), Attempts()).status == status
    assert upstream.calls == 1 and sleeps == []


def test_a_refused_connection_is_retried():
    client, sleeps = make_client(retry_attempts=2, backoff_base=0.05)
    attempts = Attempts()
    with pytest.raises(UpstreamError) as raised:
        client.post("http://127.0.0.1:9/v1/x", b"{}", {}, request(), attempts)
    assert raised.value.kind == "connect"
    assert attempts.count == 3 and len(sleeps) == 2


@pytest.mark.parametrize("behaviour,kind", [(Hang(2), "timeout"), (Reset(), "connection")])
def test_a_request_that_reached_the_upstream_is_never_retried(upstream, behaviour, kind):
    upstream.script(behaviour)
    client, sleeps = make_client()
    with pytest.raises(UpstreamError) as raised:
        client.post(upstream.url + "/v1/x", b"{}", {}, request(), Attempts())
    assert raised.value.kind == kind
    assert upstream.calls == 1 and sleeps == []


def test_a_read_timeout_is_an_upstream_timeout(upstream):
    upstream.script(Hang(2))
    client, _ = make_client()
    with pytest.raises(UpstreamTimeout):
        client.post(upstream.url + "/v1/x", b"{}", {}, request(), Attempts())


def test_no_retry_is_started_that_would_end_past_the_deadline(upstream):
    upstream.script(*[Reply(503, {})] * 4)
    client, sleeps = make_client(backoff_base=1.0)
    client.post(upstream.url + "/v1/x", b"{}", {}, request(seconds=1.5), Attempts())
    assert upstream.calls == 2 and sleeps == [1.0]


def test_cookies_from_an_upstream_are_never_sent_back(upstream):
    upstream.script(Reply(200, {}, headers={"Set-Cookie": "track=1; Path=/"}))
    client, _ = make_client()
    client.post(upstream.url + "/v1/x", b"{}", {}, request(), Attempts())
    client.post(upstream.url + "/v1/x", b"{}", {}, request(), Attempts())
    assert "Cookie" not in upstream.requests[1].headers
    assert len(client.session.cookies) == 0


def test_connections_are_kept_alive_and_reused(upstream):
    client, _ = make_client()
    for _ in range(5):
        client.post(upstream.url + "/v1/chat/completions", b'{"model":"m"}', {}, request(),
                    Attempts()).body()
    assert len({r.client_port for r in upstream.requests}) == 1


def test_stats_count_requests_errors_and_time(upstream):
    upstream.script(Reply(500, {}))
    client, _ = make_client()
    client.post(upstream.url + "/v1/x", b"{}", {}, request(), Attempts())
    client.post(upstream.url + "/v1/chat/completions", b'{"model":"m"}', {}, request(),
                Attempts())
    stats = client.stats.snapshot()
    assert stats["requests_total"] == 2 and stats["errors_total"] == 1
    assert stats["error_rate"] == 0.5 and stats["avg_response_time_ms"] > 0


def test_the_pool_is_sized_to_at_least_the_waitress_threads(make_app, upstream):
    app = make_app([provider(upstream.url)], server={"threads": 300})
    adapter = app.extensions["llm_proxy"].providers[0].http.session.get_adapter(upstream.url)
    assert adapter._pool_maxsize == 300


@pytest.mark.parametrize("value,seconds", [("3", 3.0), ("0.5", 0.5), ("junk", None), (None, None),
                                           ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)])
def test_retry_after_parsing(value, seconds):
    assert retry_after_seconds(value) == seconds


def test_a_retry_after_date_is_read_against_the_wall_clock_given():
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    assert retry_after_seconds(date, now=lambda: 1445412480.0 - 30) == 30.0


def test_connections_idle_past_keepalive_expiry_are_replaced(upstream):
    now = [0.0]
    client = HttpClient("up", HttpClientSettings(keepalive_expiry=30), pool_size=4,
                        clock=lambda: now[0])
    forever = Request(id="r", started=0.0, deadline=1e9)
    for step in (0, 10, 31):  # idle 10 s: kept; then idle 31 s: dropped
        now[0] += step
        client.post(upstream.url + "/v1/chat/completions", b'{"model":"m"}', {}, forever,
                    Attempts()).body()
    ports = [r.client_port for r in upstream.requests]
    assert ports[0] == ports[1] != ports[2]
