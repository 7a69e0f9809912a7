"""The waitress server: its options, the poll loop, the file-descriptor limit, and the checks
made at the header stage, before a request's body is read (its graceful stop: app/runtime/shutdown.py).

Why a header stage: waitress reads a whole request body (spilling past ``inbuf_overflow`` to a
temp file) before the app sees the request, so a key check in a view comes after the upload
(30 keyless clients once parked 570 MB of temp files), and waitress itself has no header
timeout (``channel_timeout`` counts inactivity, so a client dripping a header byte every few
seconds holds its connection for ever). Here, as soon as a request's headers are complete:

- ``Content-Length`` together with ``Transfer-Encoding``, or ``Transfer-Encoding`` on HTTP/1.0,
  is refused with 400 (RFC 9112 6.1, 6.3): the framing is ambiguous, the classic set-up for
  request smuggling, and waitress alone would read it as chunked and serve what follows.
- A request that carries a body needs a key the app would accept: a client key (the
  ``KeyStore``), or the admin key under ``/debug`` and ``/admin``. 401 otherwise, so a client without a key
  can make the proxy hold no body at all. Requests without a body go on to the app, which
  answers them as it always does (probes, ``/metrics``, ``GET /v1/models``).
- A ``Content-Length`` over ``server.max_request_body_mb`` gets 413; a chunked body is stopped
  by waitress just past the limit.

A refused request gets the OpenAI-style JSON error (Anthropic's under ``/v1/messages``) and
its connection closes, with one log line (logger ``llm_proxy.server``) and
``llm_proxy_rejected_requests_total{reason}``; so do waitress's own refusals (malformed
request 400, headers over ``server.max_header_kb`` 431). A connection whose request headers
are not complete ``server.header_timeout`` seconds after its first byte (or after it opened,
for its first request) is closed the same way, with no answer.
The app stays the authority: these checks only refuse earlier what it would refuse anyway.

No waitress class is patched: the channel class is a subclass built per server by
``type(...)``, closing over that app's gate; its parsers and error task are subclasses that get
the gate from it; the channel class and the accept and maintenance hooks are set on the server
instance.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http
import logging
import re
import resource
import threading
import time
from functools import partial

from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import BaseWSGIServer, create_server
from waitress.task import ErrorTask
from waitress.utilities import Error

from app.auth import presented_key
from app.errors import AdminDisabled, AdminRefused, InvalidRequest, PayloadTooLarge, ProxyError
from app.protocols import messages
from app.runtime.dispatcher import ElasticDispatcher

log = logging.getLogger("llm_proxy.server")

# The label values of llm_proxy_rejected_requests_total: a fixed set.
REJECTION_REASONS = ("header_timeout", "headers_too_large", "body_too_large", "no_key",
                     "bad_key", "smuggling", "malformed")
# Descriptors besides client connections and upstream pools: listening sockets, the loop's
# trigger pipe, log and state files, Redis, temp files of bodies and answers spilled to disk.
FD_MARGIN = 64
# A chunked body's framing counts against waitress's limit: a little slack over the app's.
CHUNKED_SLACK = 64 * 1024
ACCEPT_BATCH = 64  # connections accepted per turn of the loop
_ADMIN_PATH = re.compile(r"^/(debug|admin)(/|$)")  # the admin key's routes (app/api/admin.py)
_FRAMING = re.compile(rb"\r\n(content-length|transfer-encoding):", re.IGNORECASE)


def waitress_options(server) -> dict:
    """waitress settings from ``settings.server``, except where to listen."""
    return dict(
        threads=server.threads, connection_limit=server.connection_limit,
        channel_timeout=server.channel_timeout,
        max_request_header_size=server.max_header_kb * 1024,
        # A Content-Length over the limit is refused at the header stage; this stops a chunked
        # body; in between, the app answers 413 as it always did.
        max_request_body_size=body_limit(server) + CHUNKED_SLACK,
        asyncore_use_poll=True,  # select() fails on descriptors numbered 1024 or more
        channel_request_lookahead=1, ident="llm-proxy", clear_untrusted_proxy_headers=True)


def body_limit(server) -> int:
    """The largest request body in bytes (``server.max_request_body_mb``)."""
    return int(server.max_request_body_mb * 1024 * 1024)


def build_server(app, *, host: str | None = None, port: int | None = None, sockets=None,
                 **overrides):
    """A waitress server for ``app`` with the proxy's options (``overrides`` win) and the
    header-stage checks, listening on ``sockets`` or on (host, port); not yet running."""
    settings = app.extensions["llm_proxy"].settings.server
    options = {**waitress_options(settings), **overrides}
    if sockets:
        options["sockets"] = sockets
    else:
        options.update(host=host or settings.host, port=settings.port if port is None else port)
    server = create_server(app, _dispatcher=ElasticDispatcher(options["threads"]), **options)
    gate = HeaderGate(app)
    channel_class = gate.channel_class()
    for listener in listeners(server):
        listener.channel_class = channel_class
        listener.maintenance = partial(_maintain, listener, listener.maintenance, gate)
        listener.handle_accept = partial(_accept_waiting, listener, listener.handle_accept)
        # Maintenance runs every cleanup_interval; waitress takes whole seconds (30 by default),
        # too coarse to hold a header timeout of a few seconds.
        listener.adj.cleanup_interval = max(0.05, min(30.0, gate.header_timeout / 4))
    return server


@contextlib.contextmanager
def served_in_thread(app, **overrides):
    """``app`` on its production server on a free loopback port, in a thread of this process,
    for tests and benchmarks; yields the base URL. Stopped workers first (one that finishes a
    request pulls the trigger, which must not write to the trigger's pipe once it is closed and
    its fd number reused), then every socket, clients' keep-alive channels included, closed
    from inside the loop's own thread."""
    server = build_server(app, host="127.0.0.1", port=0,
                          **{"asyncore_loop_timeout": 0.05, **overrides})
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.task_dispatcher.shutdown(timeout=1)

        def close_all():
            for channel in list(server._map.values()):
                channel.close()
        try:
            server.trigger.pull_trigger(close_all)
        except OSError:  # its pipe's fd was closed under it (seen 1 run in 15): close from here
            close_all()
        thread.join(timeout=5)


def fd_need(settings) -> int:
    """Descriptors the settings may have open at once: every client connection, every
    provider's upstream pool (``max(http_client.max_keepalive_connections, server.threads)``
    each), one per thread, and ``FD_MARGIN``."""
    server = settings.server
    pool = max(settings.http_client.max_keepalive_connections, server.threads)
    pools = pool * sum(1 for p in settings.providers if p.type != "mock")
    return server.connection_limit + pools + server.threads + FD_MARGIN


def raise_fd_limit(settings, *, getrlimit=resource.getrlimit,
                   setrlimit=resource.setrlimit) -> int:
    """At start-up: raise the soft ``RLIMIT_NOFILE`` to ``fd_need(settings)`` (up to the hard
    limit) and return the connection limit to serve with. That is ``server.connection_limit``
    unless the hard limit is too low, which is logged as a warning: then the connections get
    what is left after the pools, so accept() stops at the limit instead of failing with "Too
    many open files", which would also fail every upstream call."""
    need = fd_need(settings)
    limit = settings.server.connection_limit
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open file limit raised from %d to %d", soft, target)
            soft = target
        except (ValueError, OSError) as e:
            log.warning("could not raise the open file limit from %d to %d: %s", soft, target, e)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return limit
    fitted = max(soft - (need - limit), soft // 2)
    log.warning("the open file limit (soft %d, hard %s) is below the %d that %d connections and "
                "the upstream pools need: serving at most %d connections; raise the hard limit "
                "(ulimit -Hn, LimitNOFILE=, docker --ulimit nofile=)", soft,
                "unlimited" if hard == resource.RLIM_INFINITY else hard, need, limit,
                min(limit, fitted))
    return min(limit, fitted)


class Refusal(Error):
    """A request refused by the server, rendered as the proxy's JSON error; ``rejection`` is
    its llm_proxy_rejected_requests_total reason (None: not counted, e.g. a 500)."""

    anthropic = False  # refused on an Anthropic path: the body in Anthropic's envelope

    def __init__(self, error: ProxyError, rejection: str | None):
        super().__init__(error.message)
        self.error = error
        self.rejection = rejection
        self.code = error.status
        self.reason = http.HTTPStatus(error.status).phrase  # waitress's name for the phrase

    def to_response(self, ident=None):
        headers = [("Content-Type", "application/json"), *self.error.headers.items()]
        body = messages.error_body(self.error) if self.anthropic else self.error.body()
        return f"{self.code} {self.reason}", headers, body

    @classmethod
    def of(cls, error: Error, gate: HeaderGate) -> Refusal:
        """The refusal for one of waitress's own errors (or ``error`` itself, if one)."""
        if isinstance(error, Refusal):
            return error
        if error.code == 431:
            return cls(ProxyError(f"The request line and headers are larger than the limit of "
                                  f"{gate.max_header} bytes.", status=431,
                                  code="headers_too_large"), "headers_too_large")
        if error.code == 413:  # a chunked body crossing the limit
            return cls(PayloadTooLarge(f"The request body is larger than the limit of "
                                       f"{gate.max_body} bytes."), "body_too_large")
        if error.code in (400, 501):  # a bad request line, header or chunk; an unknown coding
            return cls(InvalidRequest(f"The request is malformed: {error.body}.",
                                      status=error.code, code="malformed_request"), "malformed")
        return cls(ProxyError("The proxy failed to serve this request.", status=error.code), None)


class _Headers:
    """waitress's parsed headers (``X_API_KEY``) looked up by their HTTP names (``X-API-Key``)."""

    def __init__(self, headers: dict):
        self._headers = headers

    def get(self, name, default=None):
        return self._headers.get(name.upper().replace("-", "_"), default)


class HeaderGate:
    """What one app's server checks before reading a body; records what it refuses."""

    def __init__(self, app):
        self.proxy = app.extensions["llm_proxy"]
        settings = self.proxy.settings
        self.keys = self.proxy.keys
        self.admin_key = settings.admin_api_key
        self.max_body = body_limit(settings.server)
        self.max_header = settings.server.max_header_kb * 1024
        self.header_timeout = settings.server.header_timeout

    def check(self, request, header_plus: bytes) -> Refusal | None:
        """The refusal for a request whose headers were just parsed, or None to go on."""
        framing = {name.lower() for name in _FRAMING.findall(header_plus)}
        if b"transfer-encoding" in framing and (b"content-length" in framing
                                                or request.version != "1.1"):
            return Refusal(InvalidRequest(
                "A request may not carry both Content-Length and Transfer-Encoding (nor "
                "Transfer-Encoding on HTTP/1.0): its length is ambiguous.",
                code="ambiguous_message_length"), "smuggling")
        if not (request.chunked or request.content_length > 0):
            return None  # nothing to hold: the app answers as it always does
        refusal = self._key_refusal(_Headers(request.headers), request.path)
        if refusal is not None:
            return refusal
        if request.content_length > self.max_body:
            return Refusal(PayloadTooLarge(f"The request body is larger than the limit of "
                                           f"{self.max_body} bytes."), "body_too_large")
        return None

    def _key_refusal(self, headers, path: str) -> Refusal | None:
        """The app's own key check, from the headers alone: the refusal it would make."""
        try:
            if not _ADMIN_PATH.match(path):
                self.keys.authenticate(headers)
                return None
            if not self.admin_key:
                raise AdminDisabled(f"The admin routes ({path}) are disabled: set ADMIN_API_KEY "
                                    "to enable them.")
            given = presented_key(headers)
            if not (given and hmac.compare_digest(_digest(given), _digest(self.admin_key))):
                refused = AdminRefused(f"A valid admin key is required for {path}.",
                                       headers={"WWW-Authenticate": "Bearer"})
                return Refusal(refused, "bad_key" if given else "no_key")
        except ProxyError as e:
            return Refusal(e, "no_key" if e.code == "missing_api_key" else "bad_key")
        return None

    def refused(self, rejection: str, request, addr, status: int) -> None:
        """Log and count a request refused before it reached the app."""
        self.proxy.metrics.rejected(rejection)
        log.warning("refused %s %r from %s with %d before the app saw it: %s",
                    getattr(request, "command", "-"), getattr(request, "path", "-"),
                    _host(addr), status, rejection)

    def expire(self, channels, now: float) -> None:
        """Close the channels still waiting for request headers after header_timeout."""
        cutoff = now - self.header_timeout
        for channel in channels:
            since = channel.awaiting_headers_since()
            if since is not None and since < cutoff and not channel.will_close:
                channel.will_close = True  # the loop closes it
                self.proxy.metrics.rejected("header_timeout")
                log.warning("closed the connection from %s: its request headers were not "
                            "complete after %g s (server.header_timeout)", _host(channel.addr),
                            self.header_timeout)

    def channel_class(self) -> type:
        """The channel class for this gate's server."""
        return type("GatedChannel", (_GatedChannel,), {"gate": self})


class _Waiting:
    """A connection's wait for request headers, shared by its channel and its parsers."""

    __slots__ = ("opened", "had_request")

    def __init__(self, opened: float):
        self.opened = opened  # the first request's headers are due from here
        self.had_request = False  # a request's headers have arrived complete


class _GatedParser(HTTPRequestParser):
    """waitress's parser, with the gate's checks once the headers are in."""

    def __init__(self, adj, gate: HeaderGate, waiting: _Waiting):
        super().__init__(adj)
        self.gate = gate
        self.waiting = waiting
        self.started = time.time()  # this request's first byte: its headers are due from here

    def parse_header(self, header_plus):
        super().parse_header(header_plus)  # ParsingError here: waitress's own 400
        self.waiting.had_request = True
        refusal = self.gate.check(self, header_plus)
        if refusal is not None:  # complete now, with no body: the channel answers and closes
            self.error = refusal
            self.completed = True
            self.expect_continue = False  # no "100 Continue" before the refusal
            self.chunked = False
            self.body_rcv = None
            self.content_length = 0
            self.connection_close = True

    def received(self, data):
        consumed = super().received(data)
        if self.completed and self.error is not None:
            return len(data)  # nothing after a refused request is parsed: the connection closes
        return consumed


class _RefusalTask(ErrorTask):
    """Answers a request refused by the server (the gate or waitress) with the JSON error."""

    def execute(self):
        refusal = self.request.error = Refusal.of(self.request.error, self.channel.gate)
        refusal.anthropic = messages.speaks(getattr(self.request, "path", None))
        if refusal.rejection is not None:
            self.channel.gate.refused(refusal.rejection, self.request, self.channel.addr,
                                      refusal.code)
        super().execute()


class _GatedChannel(HTTPChannel):
    """waitress's channel, whose parsers check headers and which knows how long it has
    waited for them."""

    gate: HeaderGate
    error_task_class = _RefusalTask

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.waiting = _Waiting(self.creation_time)

    def parser_class(self, adj):
        """The parser for the next request (waitress calls ``self.parser_class(adj)``)."""
        return _GatedParser(adj, self.gate, self.waiting)

    def readable(self):
        # Once a request is refused the connection only answers and closes: read no more.
        return super().readable() and not any(r.error is not None for r in self.requests[-1:])

    def awaiting_headers_since(self) -> float | None:
        """Since when this channel has waited for request headers, or None when it is not
        waiting for them: while it serves a request, while a body comes in, and while a
        connection that has sent a request idles (``channel_timeout`` bounds those two)."""
        if self.requests:
            return None
        request = self.request
        if request is not None and request.headers_finished:
            return None
        if not self.waiting.had_request:  # the first: blank lines and all, from the opening
            return self.waiting.opened
        return None if request is None else request.started


def _maintain(listener, maintenance, gate, now):
    maintenance(now)  # waitress's: close channels idle past channel_timeout
    try:  # called from the loop's readable(): an error here would stop the server
        gate.expire(list(listener.active_channels.values()), now)
    except Exception:
        log.exception("checking the header timeout failed")


def _accept_waiting(listener, accept_one):
    """Accept the connections waiting, up to ACCEPT_BATCH and the connection limit. waitress
    accepts one per turn of its loop, and each turn visits every open connection: with
    thousands open, a burst of new ones would wait in the backlog for seconds."""
    for _ in range(ACCEPT_BATCH):
        before = len(listener._map)
        if before >= listener.adj.connection_limit:
            return
        accept_one()
        if len(listener._map) == before:
            return  # none was waiting (or it failed and was logged)


def listeners(server) -> list:
    """The listening servers behind what create_server returned (one, or several sockets)."""
    if isinstance(server, BaseWSGIServer):
        return [server]
    return [d for d in server.map.values() if isinstance(d, BaseWSGIServer)]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _host(addr) -> str:
    return addr[0] if isinstance(addr, tuple) and addr else str(addr)
