"""Adapter for Azure OpenAI: deployment URLs, ``api-version`` and the ``api-key`` header.

``base_url`` is the resource endpoint (``https://NAME.openai.azure.com``); each model name
(or alias target) is the deployment name. The Responses API has no deployment URL: it is
Azure's v1 surface (``/openai/v1/responses``), the deployment named by the body's ``model``.
"""

from __future__ import annotations

from urllib.parse import quote

from app.providers.openai import PATHS, OpenAIAdapter


class AzureOpenAIAdapter(OpenAIAdapter):
    def __init__(self, settings, http):
        super().__init__(settings, http)
        self._base = settings.base_url.rstrip("/")
        self._query = f"?api-version={quote(settings.api_version)}"

    def auth_headers(self) -> dict:
        key = self.settings.api_key
        return {"api-key": key} if key else {}

    lists_models = False

    def list_models(self, timeout: float) -> None:
        """Model names here are deployment names, which the data-plane API does not list."""
        return None

    def url(self, endpoint: str, model: str) -> str:
        if endpoint == "responses":
            return f"{self._base}/openai/v1/responses"
        return f"{self._base}/openai/deployments/{quote(model, safe='')}{PATHS[endpoint]}{self._query}"
