"""The access log: one line per request on stdout, JSON for machines or text for people.

It carries the request id, the API key's id (never the key), model, provider, status, cache
result, attempts, upstream and total milliseconds, and tokens. Its logger is
``llm_proxy.access``; the line is formatted only when that logger is enabled.
"""

from __future__ import annotations

import logging
import sys

import orjson

FORMATS = ("json", "text")


class AccessLog:
    def __init__(self, *, enabled=True, fmt="json", stream=None):
        self.enabled = enabled
        self.format = fmt
        self.logger = logging.getLogger("llm_proxy.access")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        if not any(getattr(h, "access_log", False) for h in self.logger.handlers):
            handler = logging.StreamHandler(stream or sys.stdout)
            handler.access_log = True
            handler.setFormatter(logging.Formatter("%(message)s"))
            self.logger.addHandler(handler)

    def record(self, ctx, *, method, path, status, model, total_ms, key_id="anonymous"):
        if not self.enabled or not self.logger.isEnabledFor(logging.INFO):
            return
        usage = ctx.usage or {}
        entry = {
            "request_id": ctx.request_id, "key_id": key_id, "method": method, "path": path,
            "model": model, "provider": ctx.provider or None, "status": status,
            "cache": ctx.cache or None, "attempts": ctx.attempts,
            "upstream_ms": round(ctx.upstream_seconds * 1000, 2), "total_ms": round(total_ms, 2),
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
        }
        if ctx.condensed:
            entry["condensed"] = ctx.condensed
        if self.format == "json":
            self.logger.info(orjson.dumps(entry).decode())
        else:
            self.logger.info(" ".join(f"{k}={v}" for k, v in entry.items() if v is not None))
