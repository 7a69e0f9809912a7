"""Provider adapters, one per wire protocol, built from the provider settings."""

from __future__ import annotations

from app.upstream.client import HttpClient
from app.providers.anthropic import AnthropicAdapter
from app.providers.azure_openai import AzureOpenAIAdapter
from app.providers.base import Call, ProviderAdapter, Reply
from app.providers.mock import MockAdapter
from app.providers.openai import OpenAIAdapter

ADAPTERS = {
    "openai": OpenAIAdapter,
    "azure_openai": AzureOpenAIAdapter,
    "anthropic": AnthropicAdapter,
}

__all__ = ["Call", "ProviderAdapter", "Reply", "build_provider"]


def build_provider(provider_settings, settings, *, secrets=None,
                   **http_options) -> ProviderAdapter:
    """The adapter for one provider, with its own pooled HTTP client (none for the mock).
    ``secrets``: what its answers are scrubbed of (app/upstream/secrets.py ``Secrets``: the
    app passes every configured one); by default the provider's own key."""
    if provider_settings.type == "mock":
        return MockAdapter(provider_settings)
    pool_size = max(settings.http_client.max_keepalive_connections, settings.server.threads)
    http = HttpClient(provider_settings.name, settings.http_client, pool_size=pool_size,
                      read_timeout=provider_settings.timeout, streaming=settings.streaming,
                      secrets=secrets or [provider_settings.api_key], **http_options)
    return ADAPTERS[provider_settings.type](provider_settings, http)
