"""Adapter for Anthropic's Messages API, translated to and from the OpenAI shape."""

from __future__ import annotations

from app.errors import InvalidRequest
from app.providers.base import ProviderAdapter


class AnthropicAdapter(ProviderAdapter):
    endpoints = ("chat",)

    def send(self, call, model, ctx):
        raise InvalidRequest("anthropic adapter: not yet built")

    def stream(self, call, model, ctx):
        raise InvalidRequest("anthropic adapter: not yet built")
