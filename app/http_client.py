"""Pooled HTTP to one provider: a requests Session, timeouts, retry with backoff, client stats.

This module is the boundary where requests/urllib3 exceptions become the proxy's own errors.
Retries happen only where the upstream cannot have started generating: a connection that was
never made, or an answer of 429/502/503/504 (the upstream refused; nothing is being billed);
and only on a request's last candidate provider: with another one left, the gateway falls back
at once instead of sleeping in a worker thread to retry.
"""

from __future__ import annotations

import http.client
import http.cookiejar
import random
import threading
import time
from email.utils import parsedate_to_datetime

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.models import PreparedRequest
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from app.errors import UpstreamError, UpstreamTimeout

RETRY_STATUSES = frozenset((429, 502, 503, 504))
STREAM_ERRORS = (urllib3.exceptions.HTTPError, requests.RequestException, OSError,
                 http.client.HTTPException)


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
                 clock=time.monotonic, sleep=time.sleep, jitter=random.random):
        self.provider = provider
        self.settings = settings
        self.timeout = (settings.connect_timeout, read_timeout or settings.timeout)
        self.stats = ClientStats()
        self._clock, self._sleep, self._jitter = clock, sleep, jitter
        self._last_used = clock()
        self.session = _make_session(pool_size)
        self._adapter = self.session.get_adapter("https://")
        self._headers = dict(self.session.headers)

    def post(self, url, body: bytes, headers: dict, ctx, *, stream=False) -> requests.Response:
        """POST with retries; return the final response (any status) or raise UpstreamError."""
        self._expire_idle_connections()
        if stream:  # relay bytes as they come: no compression to undo
            headers = {**headers, "Accept-Encoding": "identity"}
        # With another provider left to try, falling back beats waiting to retry this one.
        attempts = self.settings.retry_attempts + 1 if ctx.may_retry else 1
        for attempt in range(attempts):
            remaining = ctx.deadline - self._clock()
            if remaining <= 0:
                raise UpstreamTimeout("the request deadline passed before the provider answered",
                                      provider=self.provider, kind="timeout")
            ctx.attempts += 1
            started = self._clock()
            try:
                response = self._adapter.send(
                    self._prepare(url, body, headers), stream=True,
                    timeout=(min(self.timeout[0], remaining), min(self.timeout[1], remaining)))
                if not stream:
                    response.content  # read the whole body here, inside the error boundary
            except requests.RequestException as e:
                error = self._translate(e)
                self._finish(ctx, started, failed=True)
                delay = self._can_retry(attempt, ctx, None) if error.retryable else None
                if delay is None:
                    raise error from None
                self._sleep(delay)
                continue
            failed = response.status_code >= 500 or response.status_code == 429
            self._finish(ctx, started, failed)
            if response.status_code in RETRY_STATUSES:
                delay = self._can_retry(attempt, ctx, response)
                if delay is not None:
                    response.close()
                    self._sleep(delay)
                    continue
            return response
        raise AssertionError("unreachable: the last attempt returns or raises")

    def close(self):
        self.session.close()

    def _prepare(self, url, body: bytes, headers: dict) -> PreparedRequest:
        """The request as requests' transport takes it, built directly: the Session's merging of
        cookies, auth, hooks and environment settings is work this proxy never needs."""
        request = PreparedRequest()
        request.method = "POST"
        request.url = url
        request.headers = CaseInsensitiveDict(self._headers)
        request.headers.update(headers)
        request.headers["Content-Length"] = str(len(body))
        request.body = body
        request.hooks = {"response": []}
        return request

    def _finish(self, ctx, started, failed):
        now = self._clock()
        self._last_used = now
        ctx.upstream_seconds += now - started
        self.stats.record(now - started, failed)

    def _can_retry(self, attempt, ctx, response):
        """The delay before the next attempt, or None when no attempt is left in time."""
        if attempt >= self.settings.retry_attempts or not ctx.may_retry:
            return None
        s = self.settings
        delay = min(s.backoff_max, s.backoff_base * (2 ** attempt)) * (0.5 + self._jitter() / 2)
        if response is not None:
            after = retry_after_seconds(response.headers.get("Retry-After"))
            if after is not None:
                if after > s.retry_after_max:
                    return None  # the provider asks for longer than we wait: let fallback act
                delay = max(delay, after)
        if self._clock() + delay >= ctx.deadline:
            return None
        return delay

    def _translate(self, e: requests.RequestException) -> UpstreamError:
        name = self.provider
        if isinstance(e, requests.ConnectTimeout):
            error = UpstreamTimeout(f"provider {name}: connect timeout", provider=name,
                                    kind="connect", retryable=True)
        elif isinstance(e, requests.ReadTimeout):
            error = UpstreamTimeout(f"provider {name}: no answer within the read timeout",
                                    provider=name, kind="timeout")
        elif isinstance(e, requests.ConnectionError) and _never_connected(e):
            error = UpstreamError(f"provider {name}: connection failed", provider=name,
                                  kind="connect", retryable=True)
        elif isinstance(e, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
            error = UpstreamError(f"provider {name}: connection lost", provider=name, kind="connection")
        else:
            error = UpstreamError(f"provider {name}: request failed", provider=name, kind="protocol")
        return error

    def _expire_idle_connections(self):
        """Drop pooled connections idle past keepalive_expiry (upstreams close them anyway)."""
        if self._clock() - self._last_used > self.settings.keepalive_expiry:
            for adapter in self.session.adapters.values():
                adapter.poolmanager.clear()


def iter_raw(response: requests.Response, provider: str):
    """The body's bytes as they arrive (chunked or not), failures raised as UpstreamError."""
    raw = response.raw
    try:
        while True:
            data = raw.read1(65536)
            if not data:
                return
            yield data
    except STREAM_ERRORS as e:
        timeout = isinstance(e, (urllib3.exceptions.ReadTimeoutError, TimeoutError))
        kind = UpstreamTimeout if timeout else UpstreamError
        raise kind(f"provider {provider}: the stream broke off", provider=provider,
                   kind="timeout" if timeout else "connection") from None


def read_body(response: requests.Response, provider: str) -> bytes:
    """The whole body of a non-streamed response, failures raised as UpstreamError."""
    try:
        return response.content
    except STREAM_ERRORS:
        raise UpstreamError(f"provider {provider}: the answer broke off", provider=provider,
                            kind="connection") from None


def retry_after_seconds(value) -> float | None:
    """Retry-After as seconds: a number or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


def _never_connected(e: requests.ConnectionError) -> bool:
    reason = getattr(e.args[0], "reason", None) if e.args else None
    return isinstance(reason, (NewConnectionError, ConnectTimeoutError))


def _make_session(pool_size: int) -> requests.Session:
    session = requests.Session()
    # No proxy env / .netrc lookups per request, and no cookies kept from any upstream.
    session.trust_env = False
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    session.headers = CaseInsensitiveDict({"User-Agent": "llm-proxy", "Accept": "*/*",
                                           "Accept-Encoding": "gzip, deflate"})
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def combined_stats(clients) -> dict:
    """The stats of several providers' clients added up (for /health and /metrics)."""
    snapshots = [c.stats.snapshot() for c in clients]
    total = sum(s["requests_total"] for s in snapshots)
    errors = sum(s["errors_total"] for s in snapshots)
    weighted = sum(s["avg_response_time_ms"] * s["requests_total"] for s in snapshots)
    return {"requests_total": total, "errors_total": errors,
            "error_rate": round(errors / total, 4) if total else 0.0,
            "avg_response_time_ms": round(weighted / total, 2) if total else 0.0}
