"""An upstream's answer as the proxy sees it: ``UpstreamResponse``, never a urllib3 type.

Its status and headers; its body read whole, in pieces as they arrive, within
``http_client.max_response_mb`` (counted after decompression) and the request's deadline; or
its SSE events as they arrive, within the ``streaming`` limits, with ``KEEPALIVE`` whenever a
wait for the upstream completed none; and the error a non-2xx status means, mapped here once.
Every ``urllib3`` exception becomes the proxy's own error here: a request that got no answer
(``failed_request``) and a body that broke off while read. Everything read is scrubbed
of the proxy's secrets here too (``secrets.Scrubber``), before anyone sees it: the body, each
event, and the text of an upstream's error message.
"""

from __future__ import annotations

import http.client
import select
import ssl
import time
from email.utils import parsedate_to_datetime

import orjson
import urllib3
from urllib3.exceptions import (ConnectTimeoutError, NewConnectionError, ProtocolError,
                                ReadTimeoutError)

from app.errors import UpstreamClientError, UpstreamError, UpstreamTimeout
from app.sse import KEEPALIVE, iter_events

CHUNK = 65536  # bytes asked of the socket (or the decompressor) per read
# Closing a stream at its last event: what may still be read of it (its last chunk) so that its
# connection is kept, and the longest wait for that (the client already has its last event).
FINISH_BYTES, FINISH_WAIT = 16384, 0.005
# What a request to urllib3's pool, or a read of its answer's body, may raise.
TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException)
# The 4xx that say more about the provider than the client: 401/403, our key is bad; 408, 429.
PROVIDER_4XX = frozenset((401, 403, 408, 429))


class UpstreamResponse:
    """One upstream answer. ``body()`` is what ``HttpClient.post`` read (a whole answer, an
    error, or JSON sent where a stream was asked); ``events()`` relays a stream's."""

    def __init__(self, response: urllib3.BaseHTTPResponse, client, started: float,
                 scrubber=None):
        self._response = response  # read as it arrives: not preloaded, not decoded
        self._client = client
        self._started = started  # when the request began: streams end max_duration after it
        # the secrets to scrub (the client's key included): the client's by default
        self._scrubber = scrubber or client.secrets.scrubber
        self.status = response.status
        self._body: bytes | None = None
        self._ready: _Readiness | None = None  # set while events() reads the stream

    def read(self, deadline: float) -> None:
        """Read the whole body now, within ``max_response_mb`` and ``deadline``."""
        self._body = self._scrubber.scrub(_read_whole(self._response, self._client, deadline))

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def header(self, name: str, default: str = "") -> str:
        return self._response.headers.get(name, default)

    @property
    def is_json(self) -> bool:
        """Whether the upstream labelled its body JSON (not SSE, even where a stream was asked)."""
        kind = self.header("Content-Type")
        return kind.split(";", 1)[0].strip().lower() == "application/json"

    def body(self) -> bytes:
        if self._body is None:
            raise RuntimeError("a streamed answer's body is read through events()")
        return self._body

    def close(self) -> None:
        if self._ready is not None:
            self._finish_stream()
        response = self._response
        response.close()  # unread, its connection is closed, and its pool slot given back:
        response.release_conn()  # a body read to its end gave its connection back already

    def _finish_stream(self) -> None:
        """Read the rest of a stream whose caller stopped at its end (``[DONE]``, or
        ``message_stop``) when it is already here or within ``FINISH_WAIT``: the last chunk
        that ends the body. Read to its end, the body gives its connection back to the pool;
        closed unread, the connection is closed, and the next request connects again (for a
        TLS provider, a handshake a stream). Bounded: ``FINISH_BYTES`` at most, and no wait
        past ``FINISH_WAIT`` (a stream still sending is closed as before)."""
        ready, self._ready = self._ready, None
        left, wait = FINISH_BYTES, FINISH_WAIT
        try:
            while left > 0 and ready.wait(wait):
                data = self._response.read1(min(CHUNK, left))
                if not data:
                    return  # the body's end: urllib3 has put the connection back
                left -= len(data)
                wait = 0.0
        except Exception:  # any failure here only means the connection is not kept
            return

    def failure(self, *, translate_error=None, key_hint: str = "") -> UpstreamError:
        """The error this non-2xx answer means: the client's own 4xx (its message re-shaped as an
        OpenAI error, through ``translate_error`` for another protocol), or a provider failure
        (anything else: 5xx, a status no HTTP server should send such as 1xx or 999, and
        ``PROVIDER_4XX``). ``key_hint`` follows the status in the message."""
        provider, status = self._client.provider, self.status
        self.close()
        if not 400 <= status < 500 or status in PROVIDER_4XX:
            return UpstreamError(
                f"provider {provider} answered HTTP {status}{key_hint}", provider=provider,
                upstream_status=status, kind="status",
                retry_after=retry_after_seconds(self.header("Retry-After")))
        message, error_body = _client_error(self._body or b"", status, translate_error,
                                            self._scrubber.text)
        return UpstreamClientError(message, status=status, body=error_body, provider=provider)

    def events(self):
        """The SSE events of a streamed answer as they arrive, and ``KEEPALIVE`` whenever a wait
        for the upstream completed no event (at least every ``tick`` seconds of quiet), so the
        caller can send keep-alives and notice a client that left. Closed at the end.

        Bounded: an event past ``streaming.max_event_kb``, no event for
        ``streaming.idle_timeout`` (bytes dripping without an event boundary included), the
        stream running past ``streaming.max_duration`` from the request's start, or no byte for
        the read timeout each raise UpstreamError (UpstreamTimeout for the times).
        """
        client, scrub = self._client, self._scrubber.scrub
        limits, name, clock = client.streaming, client.provider, client.clock
        ends_at = self._started + limits.max_duration
        last_event = clock()
        ready = self._ready = _Readiness(self._response)
        try:
            for event in iter_events(_iter_body(self._response, client, ready), provider=name,
                                     max_event_bytes=int(limits.max_event_kb * 1024)):
                now = clock()
                if event is not KEEPALIVE:
                    last_event = now
                elif now - last_event > limits.idle_timeout:
                    raise UpstreamTimeout(f"provider {name} sent no event for "
                                          f"{limits.idle_timeout:g} s (streaming.idle_timeout)",
                                          provider=name, kind="idle")
                if now > ends_at:
                    raise UpstreamTimeout(f"provider {name}: the stream ran past its maximum "
                                          f"of {limits.max_duration:g} s "
                                          "(streaming.max_duration)", provider=name,
                                          kind="duration")
                yield event if event is KEEPALIVE else scrub(event)
        except Exception:
            self._ready = None  # a stream that failed is closed, not finished
            raise
        finally:
            self.close()


def _read_whole(response: urllib3.BaseHTTPResponse, client, deadline: float) -> bytes:
    """The (decompressed) body, read in pieces as they arrive: past ``max_response_mb`` or
    ``deadline`` it is an UpstreamError (and the response is closed)."""
    provider, clock = client.provider, client.clock
    limit_mb = client.settings.max_response_mb
    limit = int(limit_mb * 1024 * 1024)
    parts, size = [], 0
    try:
        while True:
            if deadline - clock() <= 0:
                raise UpstreamTimeout(f"provider {provider}: the answer was still arriving "
                                      "when the request deadline passed", provider=provider,
                                      kind="timeout")
            # read1: whatever has arrived, so a body dripping byte by byte still meets the
            # deadline check; decompressed at most CHUNK at a time (urllib3 >= 2.6)
            data = response.read1(CHUNK, decode_content=True)
            if not data:
                break
            size += len(data)
            if size > limit:
                raise UpstreamError(f"provider {provider} sent an answer larger than the limit "
                                    f"of {limit_mb:g} MB (http_client.max_response_mb)",
                                    provider=provider, kind="too_large")
            parts.append(data)
    except TRANSPORT_ERRORS as e:
        response.close()
        raise _broken_off(e, provider, "the answer broke off") from None
    except UpstreamError:
        response.close()
        raise
    return b"".join(parts)


def _iter_body(response: urllib3.BaseHTTPResponse, client, ready: _Readiness):
    """A streamed body's bytes as they arrive, and b"" every ``client.tick`` seconds of
    silence; silence past the read timeout raises UpstreamTimeout."""
    quiet_since = time.monotonic()  # real time: it measures a real socket's silence
    try:
        while True:
            if not ready.wait(client.tick):
                if time.monotonic() - quiet_since >= client.read_timeout:
                    raise UpstreamTimeout(f"provider {client.provider}: no answer within the "
                                          "read timeout", provider=client.provider,
                                          kind="timeout")
                yield b""
                continue
            data = response.read1(CHUNK)
            if not data:
                return
            quiet_since = time.monotonic()
            yield data
    except TRANSPORT_ERRORS as e:
        raise _broken_off(e, client.provider, "the stream broke off") from None


class _Readiness:
    """Whether a read of a streamed body would wait, and a bounded wait until it would not.

    A socket that polls empty can still have bytes buffered above it (in the BufferedReader
    http.client reads through, or in TLS's decrypted buffer), and buffered bytes can still
    leave a read waiting (a chunk's trailing CRLF without the next chunk's size line); both are
    looked at here. Anything unexpected answers "ready": the read then blocks as it would have
    without this, up to the socket's read timeout.
    """

    def __init__(self, response: urllib3.BaseHTTPResponse):
        try:
            self._http = response._fp  # http.client.HTTPResponse: chunked framing state
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


def failed_request(e: Exception, name: str) -> UpstreamError:
    """The proxy's error for a request that got no answer (urllib3's exception ``e``)."""
    if isinstance(e, NewConnectionError):  # refused, unreachable, a name that did not resolve
        return UpstreamError(f"provider {name}: connection failed", provider=name,
                             kind="connect", retryable=True)
    if isinstance(e, ConnectTimeoutError):
        return UpstreamTimeout(f"provider {name}: connect timeout", provider=name,
                               kind="connect", retryable=True)
    if isinstance(e, ReadTimeoutError):
        return UpstreamTimeout(f"provider {name}: no answer within the read timeout",
                               provider=name, kind="timeout")
    if isinstance(e, (ProtocolError, urllib3.exceptions.SSLError, OSError)):
        return UpstreamError(f"provider {name}: connection lost", provider=name,
                             kind="connection")
    return UpstreamError(f"provider {name}: request failed", provider=name, kind="protocol")


def _broken_off(e: Exception, provider: str, what: str) -> UpstreamError:
    timeout = isinstance(e, (urllib3.exceptions.ReadTimeoutError, TimeoutError))
    kind = UpstreamTimeout if timeout else UpstreamError
    return kind(f"provider {provider}: {what}", provider=provider,
                kind="timeout" if timeout else "connection")


def _client_error(body: bytes, status: int, translate_error, scrub):
    """The upstream's own error message, re-shaped as an OpenAI error when it is not one; every
    text in it passed through ``scrub`` (the body was scrubbed as bytes: this catches what
    decoding revealed, such as a key written with unusual escapes)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if translate_error is not None and isinstance(data, dict):
        data = translate_error(data)
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        message = scrub(error["message"])
        fields = {name: scrub(value) if isinstance(value, str) else value
                  for name, value in (("type", error.get("type")), ("param", error.get("param")),
                                      ("code", error.get("code")))}
        return message, orjson.dumps({"error": {
            "message": message, "type": fields["type"] or "invalid_request_error",
            "param": fields["param"], "code": fields["code"]}})
    message = f"the provider refused the request (HTTP {status})"
    return message, None


def retry_after_seconds(value, *, now=time.time) -> float | None:
    """Retry-After as seconds: a number or an HTTP date (against ``now``, the wall clock);
    None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now())
    except (TypeError, ValueError, IndexError):
        return None
