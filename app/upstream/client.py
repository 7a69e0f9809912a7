"""Pooled HTTP to one provider: a requests Session's pools, timeouts, retry with backoff, stats.

The Session owns the connection pools (its HTTPAdapter's urllib3 PoolManager, sized to the
threads); each call goes to the pool directly. requests' own layer on top (a PreparedRequest,
the adapter's TLS context and URL handling, a Response with its cookie jar) cost about a tenth
of a pass-through's CPU for nothing this proxy uses (docs/performance.md).
``post`` answers with the proxy's own ``UpstreamResponse`` (app/upstream, where every urllib3
exception becomes the proxy's error): adapters never see a urllib3 type.
When the request is traced, every try carries the attempt's W3C ``traceparent``, and each retry
is an event of the attempt's span (app/observability/tracing.py).
Retries happen only where the upstream cannot have started generating: a connection that was
never made, or an answer of 429/502/503/504 (the upstream refused; nothing is being billed);
and only on a request's last candidate provider: with another one left, the gateway falls back
at once instead of sleeping in a worker thread to retry.
"""

from __future__ import annotations

import functools
import random
import threading
import time

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.utils import DEFAULT_CA_BUNDLE_PATH

from app.errors import UpstreamError, UpstreamTimeout
from app.observability.tracing import note_retry, trace_headers
from app.upstream import TRANSPORT_ERRORS, UpstreamResponse, failed_request, retry_after_seconds
from app.upstream.secrets import Secrets
from settings import StreamingSettings

RETRY_STATUSES = frozenset((429, 502, 503, 504))
HEADERS = {"User-Agent": "llm-proxy", "Accept": "*/*", "Accept-Encoding": "gzip, deflate"}
# What requests gave every https pool: certificates checked against certifi's bundle.
VERIFIED = {"cert_reqs": "CERT_REQUIRED", "ca_certs": DEFAULT_CA_BUNDLE_PATH}
TICK = 1.0  # the longest a quiet stream's thread waits before it looks up


class ClientStats:
    """Counters one provider's client keeps: calls, failures, time spent upstream."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests_total = 0
        self.errors_total = 0
        self.seconds_total = 0.0

    def record(self, seconds, failed):
        with self._lock:
            self.requests_total += 1
            self.seconds_total += seconds
            if failed:
                self.errors_total += 1

    def snapshot(self) -> dict:
        with self._lock:
            n, errors, seconds = self.requests_total, self.errors_total, self.seconds_total
        return {
            "requests_total": n,
            "errors_total": errors,
            "error_rate": round(errors / n, 4) if n else 0.0,
            "avg_response_time_ms": round(seconds / n * 1000, 2) if n else 0.0,
        }


class HttpClient:
    """One provider's pooled Session with (connect, read) timeouts and bounded retries."""

    def __init__(self, provider: str, settings, *, pool_size: int, read_timeout: float = 0.0,
                 streaming=None, secrets=(), clock=time.monotonic, sleep=time.sleep,
                 jitter=random.random):
        self.provider = provider
        self.settings = settings
        # What an upstream must not echo to clients (every configured key: app/upstream/
        # secrets.py), replaced in every body and event read; plain values: these only.
        self.secrets = secrets if isinstance(secrets, Secrets) else Secrets(secrets)
        self.streaming = streaming or StreamingSettings()
        # How often a quiet stream wakes its thread: keep-alives, idle checks, client gone.
        self.tick = min(TICK, *(v / 2 for v in (self.streaming.keepalive_interval,
                                                self.streaming.idle_timeout) if v))
        self.timeout = (settings.connect_timeout, read_timeout or settings.timeout)
        self.read_timeout = self.timeout[1]
        self.clock = clock
        self.stats = ClientStats()
        self._clock, self._sleep, self._jitter = clock, sleep, jitter
        self._last_used = clock()
        self.session = _make_session(pool_size)
        self._pools = self.session.get_adapter("https://").poolmanager

    def post(self, url, body: bytes, headers: dict, request, attempts, *, stream=False,
             retry=True) -> UpstreamResponse:
        """POST with retries; the final answer (any status but a redirect) or UpstreamError.
        ``request`` gives the deadline; each attempt and its time count in ``attempts``.

        The body of a whole answer is read here, within ``max_response_mb`` and the request's
        deadline, and so is an error's body and a JSON answer sent where a stream was asked;
        a stream's body is left to ``UpstreamResponse.events``.
        """
        self._expire_idle_connections()
        if stream:  # relay bytes as they come: no compression to undo
            headers = {**headers, "Accept-Encoding": "identity"}
        span = attempts.span  # the attempt's trace span: its context goes on to the provider
        if span is not None:
            headers = {**headers, **trace_headers(span)}
        # With another provider left to try, falling back beats waiting to retry this one.
        tries = self.settings.retry_attempts + 1 if retry else 1
        deadline = request.deadline
        for attempt in range(tries):
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise UpstreamTimeout("the request deadline passed before the provider answered",
                                      provider=self.provider, kind="timeout")
            started = self._clock()
            try:
                response = self._send("POST", url, body, headers,
                                      min(self.timeout[0], remaining),
                                      min(self.timeout[1], remaining))
                status = response.status
                if 300 <= status < 400:  # never followed: the provider is misconfigured or hostile
                    response.close()
                    raise UpstreamError(f"provider {self.provider} answered HTTP {status}, a "
                                        "redirect, which the proxy does not follow",
                                        provider=self.provider, upstream_status=status,
                                        kind="redirect")
                answer = UpstreamResponse(response, self, request.started,
                                          self.secrets.for_key(request.client_key))
                if not stream or not answer.ok or answer.is_json:
                    answer.read(deadline)
            except TRANSPORT_ERRORS as e:
                error = failed_request(e, self.provider)
                self._finish(attempts, started, failed=True)
                delay = self._can_retry(attempt, tries, deadline, None) if error.retryable else None
                if delay is None:
                    raise error from None
                if span is not None:
                    note_retry(span, attempt + 1, error.kind, delay)
                self._sleep(delay)
                continue
            except UpstreamError:
                self._finish(attempts, started, failed=True)
                raise
            failed = status >= 500 or status == 429
            self._finish(attempts, started, failed)
            if status in RETRY_STATUSES:
                delay = self._can_retry(attempt, tries, deadline, answer)
                if delay is not None:
                    answer.close()
                    if span is not None:
                        note_retry(span, attempt + 1, str(status), delay)
                    self._sleep(delay)
                    continue
            return answer
        raise AssertionError("unreachable: the last attempt returns or raises")

    def scrub(self, data: bytes) -> bytes:
        """``data`` with every configured secret replaced by ``[redacted]``."""
        return self.secrets.scrubber.scrub(data)

    def close(self):
        self.session.close()

    def get(self, url, headers: dict, *, timeout: float) -> tuple[int, bytes]:
        """One GET made outside any client's request (a provider's model list): no retries, not
        counted in the stats (it is no client's traffic), the body read whole within
        ``max_response_mb`` and ``timeout``. The status and body, or UpstreamError."""
        deadline = self._clock() + timeout
        try:
            response = self._send("GET", url, None, headers, min(self.timeout[0], timeout),
                                  timeout)
        except TRANSPORT_ERRORS as e:
            raise failed_request(e, self.provider) from None
        answer = UpstreamResponse(response, self, self._clock())
        try:
            answer.read(deadline)
        finally:
            answer.close()
        return answer.status, answer.body()

    def _send(self, method, url, body: bytes | None, headers: dict, connect: float,
              read: float) -> urllib3.BaseHTTPResponse:
        """One request on a pooled connection to ``url``'s host, answered once its headers are
        in: no retry, no redirect followed, the body left unread and undecoded."""
        scheme, host, port, target = _split(url)
        pool = self._pools.connection_from_host(host, port, scheme,
                                                pool_kwargs=VERIFIED if scheme == "https" else None)
        given = {name.lower() for name in headers}
        sent = {name: value for name, value in HEADERS.items() if name.lower() not in given}
        sent.update(headers)
        if body is not None:
            sent["Content-Length"] = str(len(body))
        return pool.urlopen(method, target, body=body, headers=sent, retries=False,
                            redirect=False, assert_same_host=False, preload_content=False,
                            decode_content=False, timeout=urllib3.Timeout(connect=connect,
                                                                           read=read))

    def _finish(self, attempts, started, failed):
        now = self._clock()
        self._last_used = now
        attempts.record(now - started)
        self.stats.record(now - started, failed)

    def _can_retry(self, attempt, tries, deadline, response):
        """The delay before the next attempt, or None when no attempt is left in time."""
        if attempt >= tries - 1:
            return None
        s = self.settings
        delay = min(s.backoff_max, s.backoff_base * (2 ** attempt)) * (0.5 + self._jitter() / 2)
        if response is not None:
            after = retry_after_seconds(response.header("Retry-After"))
            if after is not None:
                if after > s.retry_after_max:
                    return None  # the provider asks for longer than we wait: let fallback act
                delay = max(delay, after)
        if self._clock() + delay >= deadline:
            return None
        return delay

    def _expire_idle_connections(self):
        """Drop pooled connections idle past keepalive_expiry (upstreams close them anyway)."""
        if self._clock() - self._last_used > self.settings.keepalive_expiry:
            for adapter in self.session.adapters.values():
                adapter.poolmanager.clear()


def _make_session(pool_size: int) -> requests.Session:
    """The Session whose adapter holds the pools: one per host (4 hosts kept), each of
    ``pool_size`` connections (the threads). Nothing is sent through the Session itself: no
    cookie jar, proxy variables or .netrc is ever consulted."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@functools.lru_cache(maxsize=1024)
def _split(url: str) -> tuple[str, str, int | None, str]:
    """``url`` as (scheme, host, port, the request target): a provider calls a few URLs again
    and again (its base URL and a few paths)."""
    parts = urllib3.util.parse_url(url)
    return parts.scheme or "http", parts.host, parts.port, parts.request_uri


def combined_stats(clients) -> dict:
    """The stats of several providers' clients added up (for /health and /metrics)."""
    snapshots = [c.stats.snapshot() for c in clients]
    total = sum(s["requests_total"] for s in snapshots)
    errors = sum(s["errors_total"] for s in snapshots)
    weighted = sum(s["avg_response_time_ms"] * s["requests_total"] for s in snapshots)
    return {"requests_total": total, "errors_total": errors,
            "error_rate": round(errors / total, 4) if total else 0.0,
            "avg_response_time_ms": round(weighted / total, 2) if total else 0.0}
