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
import select
import ssl
import threading
import time
from email.utils import parsedate_to_datetime
from types import SimpleNamespace

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.models import PreparedRequest
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from app.errors import UpstreamError, UpstreamTimeout
from app.sse import KEEPALIVE, iter_events
from settings import StreamingSettings

RETRY_STATUSES = frozenset((429, 502, 503, 504))
CHUNK = 65536  # bytes asked of the socket (or the decompressor) per read
TICK = 1.0  # the longest a quiet stream's thread waits before it looks up
REDACTED = b"[redacted]"
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
                 streaming=None, secrets=(), clock=time.monotonic, sleep=time.sleep,
                 jitter=random.random):
        self.provider = provider
        self.settings = settings
        # What an upstream must not echo to clients (our key for it): replaced in every body
        # and event read. Short values are left alone: they would match ordinary text.
        self._secrets = tuple(s.encode() for s in secrets if len(s) >= 8)
        self.streaming = streaming or StreamingSettings()
        # How often a quiet stream wakes its thread: keep-alives, idle checks, client gone.
        self._tick = min(TICK, *(v / 2 for v in (self.streaming.keepalive_interval,
                                                 self.streaming.idle_timeout) if v))
        self.timeout = (settings.connect_timeout, read_timeout or settings.timeout)
        self.stats = ClientStats()
        self._clock, self._sleep, self._jitter = clock, sleep, jitter
        self._last_used = clock()
        self.session = _make_session(pool_size)
        self._adapter = self.session.get_adapter("https://")
        self._headers = dict(self.session.headers)

    def post(self, url, body: bytes, headers: dict, ctx, *, stream=False) -> requests.Response:
        """POST with retries; the final response (any status but a redirect) or UpstreamError.

        The body of a whole answer is read here, within ``max_response_mb`` and the request's
        deadline, and so is an error's body and a JSON answer sent where a stream was asked:
        ``response.content`` is then that body. A stream's body is left to ``events``.
        """
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
                status = response.status_code
                if 300 <= status < 400:  # never followed: the provider is misconfigured or hostile
                    response.close()
                    raise UpstreamError(f"provider {self.provider} answered HTTP {status}, a "
                                        "redirect, which the proxy does not follow",
                                        provider=self.provider, upstream_status=status,
                                        kind="redirect")
                if not stream or not 200 <= status < 300 or is_json(response):
                    self._read_whole(response, ctx)
            except requests.RequestException as e:
                error = self._translate(e)
                self._finish(ctx, started, failed=True)
                delay = self._can_retry(attempt, ctx, None) if error.retryable else None
                if delay is None:
                    raise error from None
                self._sleep(delay)
                continue
            except UpstreamError:
                self._finish(ctx, started, failed=True)
                raise
            failed = status >= 500 or status == 429
            self._finish(ctx, started, failed)
            if status in RETRY_STATUSES:
                delay = self._can_retry(attempt, ctx, response)
                if delay is not None:
                    response.close()
                    self._sleep(delay)
                    continue
            return response
        raise AssertionError("unreachable: the last attempt returns or raises")

    def events(self, response: requests.Response, ctx):
        """The SSE events of a streamed answer as they arrive, and ``KEEPALIVE`` whenever a wait
        for the upstream completed no event (at least every ``tick`` seconds of quiet), so the
        caller can send keep-alives and notice a client that left.

        Bounded: an event past ``streaming.max_event_kb``, no event for
        ``streaming.idle_timeout`` (bytes dripping without an event boundary included), the
        stream running past ``streaming.max_duration`` from the request's start, or no byte for
        the read timeout each raise UpstreamError (UpstreamTimeout for the times).
        """
        limits, name = self.streaming, self.provider
        ends_at = ctx.started + limits.max_duration
        last_event = self._clock()
        for event in iter_events(self._iter_body(response), provider=name,
                                 max_event_bytes=int(limits.max_event_kb * 1024)):
            now = self._clock()
            if event is not KEEPALIVE:
                last_event = now
            elif now - last_event > limits.idle_timeout:
                raise UpstreamTimeout(f"provider {name} sent no event for "
                                      f"{limits.idle_timeout:g} s (streaming.idle_timeout)",
                                      provider=name, kind="idle")
            if now > ends_at:
                raise UpstreamTimeout(f"provider {name}: the stream ran past its maximum of "
                                      f"{limits.max_duration:g} s (streaming.max_duration)",
                                      provider=name, kind="duration")
            yield self._scrub(event) if self._secrets else event

    def _scrub(self, data: bytes) -> bytes:
        """``data`` with every secret of this provider replaced by ``[redacted]``."""
        for secret in self._secrets:
            if secret in data:
                data = data.replace(secret, REDACTED)
        return data

    def close(self):
        self.session.close()

    def get(self, url, headers: dict, *, timeout: float) -> tuple[int, bytes]:
        """One GET made outside any client's request (a provider's model list): no retries, not
        counted in the stats (it is no client's traffic), the body read whole within
        ``max_response_mb`` and ``timeout``. The status and body, or UpstreamError."""
        bound = SimpleNamespace(deadline=self._clock() + timeout)  # what _read_whole looks at
        request = self._prepare(url, None, headers, method="GET")
        try:
            response = self._adapter.send(request, stream=True,
                                          timeout=(min(self.timeout[0], timeout), timeout))
        except requests.RequestException as e:
            raise self._translate(e) from None
        try:
            self._read_whole(response, bound)
        finally:
            response.close()
        return response.status_code, response.content

    def _prepare(self, url, body: bytes | None, headers: dict, *,
                 method="POST") -> PreparedRequest:
        """The request as requests' transport takes it, built directly: the Session's merging of
        cookies, auth, hooks and environment settings is work this proxy never needs."""
        request = PreparedRequest()
        request.method = method
        request.url = url
        request.headers = CaseInsensitiveDict(self._headers)
        request.headers.update(headers)
        if body is not None:
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


    def _read_whole(self, response: requests.Response, ctx) -> None:
        """Read the (decompressed) body into ``response.content``, in pieces as they arrive:
        past ``max_response_mb`` or the request's deadline it is an UpstreamError."""
        limit = int(self.settings.max_response_mb * 1024 * 1024)
        parts, size = [], 0
        try:
            while True:
                remaining = ctx.deadline - self._clock()
                if remaining <= 0:
                    raise UpstreamTimeout(f"provider {self.provider}: the answer was still "
                                          "arriving when the request deadline passed",
                                          provider=self.provider, kind="timeout")
                # read1: whatever has arrived, so a body dripping byte by byte still meets the
                # deadline check; decompressed at most CHUNK at a time (urllib3 >= 2.6)
                data = response.raw.read1(CHUNK, decode_content=True)
                if not data:
                    break
                size += len(data)
                if size > limit:
                    raise UpstreamError(
                        f"provider {self.provider} sent an answer larger than the limit of "
                        f"{self.settings.max_response_mb:g} MB (http_client.max_response_mb)",
                        provider=self.provider, kind="too_large")
                parts.append(data)
        except STREAM_ERRORS as e:
            response.close()
            raise _broken_off(e, self.provider, "the answer broke off") from None
        except UpstreamError:
            response.close()
            raise
        response._content = self._scrub(b"".join(parts))  # what requests' .content would keep
        response._content_consumed = True

    def _iter_body(self, response: requests.Response):
        """A streamed body's bytes as they arrive, and b"" every ``tick`` seconds of silence;
        silence past the read timeout raises UpstreamTimeout."""
        ready = _Readiness(response)
        quiet_since = time.monotonic()  # real time: it measures a real socket's silence
        try:
            while True:
                if not ready.wait(self._tick):
                    if time.monotonic() - quiet_since >= self.timeout[1]:
                        raise UpstreamTimeout(f"provider {self.provider}: no answer within the "
                                              "read timeout", provider=self.provider,
                                              kind="timeout")
                    yield b""
                    continue
                data = response.raw.read1(CHUNK)
                if not data:
                    return
                quiet_since = time.monotonic()
                yield data
        except STREAM_ERRORS as e:
            raise _broken_off(e, self.provider, "the stream broke off") from None


class _Readiness:
    """Whether a read of a streamed body would wait, and a bounded wait until it would not.

    A socket that polls empty can still have bytes buffered above it (in the BufferedReader
    http.client reads through, or in TLS's decrypted buffer), and buffered bytes can still
    leave a read waiting (a chunk's trailing CRLF without the next chunk's size line); both are
    looked at here. Anything unexpected answers "ready": the read then blocks as it would have
    without this, up to the socket's read timeout.
    """

    def __init__(self, response: requests.Response):
        try:
            self._http = response.raw._fp  # http.client.HTTPResponse: chunked framing state
            self._reader = self._http.fp
            self._sock = self._reader.raw._sock
            self._poll = select.poll()
            self._poll.register(self._sock, select.POLLIN | select.POLLPRI)
        except (AttributeError, OSError, ValueError):
            self._poll = None

    def wait(self, seconds: float) -> bool:
        if self._poll is None:
            return True
        try:
            return self._buffered() or bool(self._poll.poll(seconds * 1000))
        except Exception:  # a transport this does not know: read (and block) as before
            return True

    def _buffered(self) -> bool:
        pending = getattr(self._sock, "pending", None)
        if pending is not None and pending():
            return True
        timeout = self._sock.gettimeout()
        self._sock.settimeout(0)  # peek must not block: it reads the socket when it has nothing
        try:
            peeked = self._reader.peek(1)
        except (ssl.SSLWantReadError, BlockingIOError):
            peeked = b""
        finally:
            self._sock.settimeout(timeout)
        left = self._http.chunk_left if self._http.chunked else 1
        if left:
            return bool(peeked)
        # At a chunk boundary a read needs the next size line whole (after the CRLF ending the
        # previous chunk, when one was read).
        return b"\n" in peeked[2 if left == 0 else 0:]


def _broken_off(e: Exception, provider: str, what: str) -> UpstreamError:
    timeout = isinstance(e, (urllib3.exceptions.ReadTimeoutError, TimeoutError))
    kind = UpstreamTimeout if timeout else UpstreamError
    return kind(f"provider {provider}: {what}", provider=provider,
                kind="timeout" if timeout else "connection")


def read_body(response: requests.Response) -> bytes:
    """The body ``HttpClient.post`` read (a whole answer, an error, or JSON for a stream)."""
    return response.content


def is_json(response: requests.Response) -> bool:
    """Whether the upstream labelled its body JSON (not SSE, even where a stream was asked)."""
    kind = response.headers.get("Content-Type", "")
    return kind.split(";", 1)[0].strip().lower() == "application/json"


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
