"""An OTLP/HTTP trace receiver for tests: a real threaded HTTP server on loopback, port 0.

It accepts ``POST /v1/traces`` (protobuf, gzip or not), decodes each ExportTraceServiceRequest
with the ``opentelemetry-proto`` package and keeps its spans as plain ``Span`` records, so tests
assert the span tree, attributes, events and timing without any OpenTelemetry SDK type. A
``Blackhole`` is a receiver that never answers (a collector that hangs).
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse)

KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
STATUSES = {0: "UNSET", 1: "OK", 2: "ERROR"}


@dataclass
class Event:
    name: str
    time_ns: int
    attributes: dict


@dataclass
class Span:
    """One span as the receiver decoded it: ids in lowercase hex, parent "" for a root."""
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    attributes: dict
    status: str
    events: list[Event] = field(default_factory=list)
    resource: dict = field(default_factory=dict)

    def event(self, name: str) -> Event:
        found = [e for e in self.events if e.name == name]
        assert len(found) == 1, f"{len(found)} events named {name!r} in {self.events}"
        return found[0]


class OTLPReceiver:
    """Context manager running the receiver; ``endpoint`` is its ``/v1/traces`` URL."""

    def __init__(self):
        self.spans: list[Span] = []
        self.posts = 0
        self.bad_paths: list[str] = []
        self._changed = threading.Condition()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.receiver = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.endpoint = self.url + "/v1/traces"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                        daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, n: int, timeout: float = 5.0) -> list[Span]:
        """The spans once at least ``n`` arrived; AssertionError past ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.spans) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.spans)} of {n} spans arrived in {timeout} s:"
                                         f" {[s.name for s in self.spans]}")
                self._changed.wait(left)
            return list(self.spans)

    def named(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.name == name]

    def _received(self, spans: list[Span]) -> None:
        with self._changed:
            self.posts += 1
            self.spans.extend(spans)
            self._changed.notify_all()


class Blackhole:
    """A listening socket that accepts and never answers: exports to it hang until their
    timeout. Context manager; ``endpoint`` is its ``/v1/traces`` URL."""

    def __init__(self):
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.endpoint = f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1/traces"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._sock.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        receiver = self.server.receiver
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/v1/traces":
            receiver.bad_paths.append(self.path)
            self._answer(404, b"")
            return
        encoding = (self.headers.get("Content-Encoding") or "").lower()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        receiver._received(decoded(request))
        self._answer(200, ExportTraceServiceResponse().SerializeToString())

    def _answer(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def decoded(request: ExportTraceServiceRequest) -> list[Span]:
    """The spans of one export, as plain records."""
    spans = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                spans.append(Span(
                    name=s.name, kind=KINDS[s.kind], trace_id=s.trace_id.hex(),
                    span_id=s.span_id.hex(), parent_id=s.parent_span_id.hex(),
                    start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                    attributes=_attributes(s.attributes), status=STATUSES[s.status.code],
                    events=[Event(e.name, e.time_unix_nano, _attributes(e.attributes))
                            for e in s.events],
                    resource=resource))
    return spans


def _attributes(pairs) -> dict:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(v) for v in any_value.array_value.values)
    if kind == "kvlist_value":
        return _attributes(any_value.kvlist_value.values)
    return getattr(any_value, kind) if kind else None
