"""The proxy's one exception root and its mapping to OpenAI-style JSON errors."""

from __future__ import annotations

import orjson


class ProxyError(Exception):
    """Root of every error the proxy raises; carries the OpenAI error fields and HTTP status."""

    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message, *, param=None, code=None, status=None, headers=None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequest(ProxyError):
    """The client's request is malformed or has a field of the wrong type."""
    status, type, code = 400, "invalid_request_error", "invalid_request"


class ModelNotFound(ProxyError):
    """No enabled provider serves the requested model."""
    status, type, code = 404, "invalid_request_error", "model_not_found"


class NotFound(ProxyError):
    """The path names a thing the proxy does not have or has turned off (a provider, a cache)."""
    status, type, code = 404, "invalid_request_error", "not_found"


class PayloadTooLarge(ProxyError):
    """The request body is larger than the configured limit."""
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class AuthError(ProxyError):
    """The request carries no API key where one is required, or a key the proxy does not know."""
    status, type, code = 401, "authentication_error", "invalid_api_key"

    def __init__(self, message, *, code="invalid_api_key"):
        super().__init__(message, code=code, headers={"WWW-Authenticate": "Bearer"})


class ModelForbidden(ProxyError):
    """The client's key may not use the requested model."""
    status, type, code = 403, "permission_error", "model_not_allowed"


class RateLimited(ProxyError):
    """The key is over one of its limits (requests, tokens, or requests in flight)."""
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class BudgetExceeded(ProxyError):
    """The key has spent its budget for the period (day, month or in total)."""
    status, type, code = 429, "insufficient_quota", "budget_exceeded"


class Conflict(ProxyError):
    """The change contradicts what is stored: a key id taken, a key that is read-only."""
    status, type, code = 409, "invalid_request_error", "conflict"


class StoreDisabled(ProxyError):
    """The database is turned off (``database.enabled``), so keys, spend and the log are too."""
    status, type, code = 404, "invalid_request_error", "database_disabled"


class StoreUnavailable(ProxyError):
    """The database did not answer an admin call (the proxied requests never wait on it)."""
    status, type, code = 503, "server_error", "database_unavailable"


class AdminRefused(ProxyError):
    """The admin key is missing or wrong."""
    status, type, code = 401, "authentication_error", "invalid_admin_key"


class AdminDisabled(ProxyError):
    """No admin key is configured, so the debug routes are off."""
    status, type, code = 403, "permission_error", "admin_disabled"


class NoProviderAvailable(ProxyError):
    """Every provider that serves the model is unavailable right now."""
    status, type, code = 503, "server_error", "no_provider_available"


class ProviderFull(NoProviderAvailable):
    """Every provider that serves the model is healthy but at its limit of calls in flight."""
    code = "provider_full"


class UpstreamError(ProxyError):
    """A provider failed (connection, 5xx, 429, bad answer); another provider may succeed."""
    status, type, code = 502, "upstream_error", "upstream_error"

    def __init__(self, message, *, provider="", upstream_status=None, kind="error",
                 retry_after=None, retryable=False, **kwargs):
        super().__init__(message, **kwargs)
        self.provider = provider
        self.retryable = retryable  # safe to send again to the same provider
        self.upstream_status = upstream_status
        self.kind = kind  # connect, timeout, status, protocol
        self.retry_after = retry_after


class UpstreamTimeout(UpstreamError):
    """A provider did not answer within the read timeout or the request deadline."""
    status, type, code = 504, "upstream_error", "upstream_timeout"


class UpstreamRateLimited(UpstreamError):
    """Every provider of the model rate limited it (HTTP 429, or cooling down after one)."""
    status, type, code = 429, "rate_limit_error", "upstream_rate_limited"


class SummaryFailed(UpstreamError):
    """The summarizing model answered, but with no usable summary text."""
    code = "summary_failed"


class UpstreamClientError(ProxyError):
    """The provider refused the request as the client's fault (4xx): returned to the client as is."""
    type = "invalid_request_error"
    code = "upstream_client_error"

    def __init__(self, message, *, status, body: bytes | None = None, provider=""):
        super().__init__(message, status=status)
        self.provider = provider
        self._body = body

    def body(self) -> bytes:
        return self._body or super().body()


def error_body(message, type_="invalid_request_error", param=None, code=None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def sse_error_event(error: ProxyError) -> bytes:
    """The final SSE event of a stream that failed after its first byte."""
    return b"data: " + error.body() + b"\n\n"
