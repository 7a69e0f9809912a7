"""The access log: one line per request on stdout, JSON for machines or text for people.

It carries the request id, the API key's id (never the key), model, provider, status, cache
result, attempts, upstream and total milliseconds, and tokens. Lines are written straight to
the stream under a lock: the logging module's record machinery cost about a tenth of the
proxy's throughput on the mock provider, for nothing this log needs.

The text format writes ``key=value`` pairs; values come partly from clients (the model, the
path), so a value that is not plain printable ASCII without spaces, quotes, ``=`` or
backslashes is written quoted, with control characters escaped: no value can end the line or
forge a pair.
The JSON format is safe by construction (orjson escapes the C0 control characters in strings);
the few it leaves that some readers still act on (C1 controls, U+2028/9) are escaped too.
"""

from __future__ import annotations

import re
import sys
import threading

import orjson


class AccessLog:
    def __init__(self, *, enabled=True, fmt="json", stream=None):
        self.enabled = enabled
        self.format = fmt
        self._stream = stream
        self._lock = threading.Lock()

    def record(self, request, trace, *, method, path, status, total_ms):
        """One line for a finished ``request`` (app.pipeline.Request) and its ``trace``."""
        if not self.enabled:
            return
        usage = trace.usage or {}
        key_id = request.tenant.id if request.tenant else "anonymous"
        entry = {
            "request_id": request.id, "key_id": key_id, "method": method, "path": path,
            "model": trace.model, "provider": trace.provider or None, "status": status,
            "cache": trace.cache or None, "attempts": trace.upstream.count,
            "upstream_ms": round(trace.upstream.seconds * 1000, 2),
            "total_ms": round(total_ms, 2),
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
        }
        if trace.usage_estimated:
            entry["usage_estimated"] = True
        if trace.cost_usd is not None:
            entry["cost_usd"] = round(trace.cost_usd, 8)
        if trace.condensed:
            entry["condensed"] = trace.condensed
        if self.format == "json":
            line = _one_line(orjson.dumps(entry).decode()) + "\n"
        else:
            line = " ".join(f"{k}={_text_value(v)}" for k, v in entry.items()
                            if v is not None) + "\n"
        stream = self._stream or sys.stdout  # looked up late: tests and servers may swap it
        with self._lock:  # one write per line; stdout is line-buffered on a terminal and
            stream.write(line)  # unbuffered in the image (PYTHONUNBUFFERED)


# A value written as it is: printable ASCII but the space, '"', '=' and '\\'.
_PLAIN = re.compile(r"[!#-<>-\[\]-~]+")
# What a quoted value escapes: the quote, the backslash, C0 and C1 controls, DEL, and the
# Unicode line and paragraph separators some viewers break lines at.
_ESCAPED = re.compile(r'["\\\x00-\x1f\x7f-\x9f\u2028\u2029]')
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}

# What JSON may hold unescaped but a reader may still act on: DEL and the C1 controls (NEL is a
# line break to Python's splitlines, CSI starts a terminal sequence) and the Unicode line and
# paragraph separators; written as escapes, which mean the same to a JSON parser.
_JSON_UNSAFE = re.compile(r"[\x7f-\x9f\u2028\u2029]")


def _one_line(text: str) -> str:
    """A JSON line with no character any reader takes for a line break or a control."""
    if _JSON_UNSAFE.search(text) is None:
        return text
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _text_value(value) -> str:
    """``value`` as the text format writes it: plain when it cannot be misread, else quoted."""
    if isinstance(value, (int, float)):
        return str(value)
    text = str(value)
    if _PLAIN.fullmatch(text):
        return text
    return '"' + _ESCAPED.sub(_escape, text) + '"'


def _escape(match: re.Match) -> str:
    char = match.group()
    return _ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100
                                  else f"\\u{ord(char):04x}")
