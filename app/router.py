"""Which providers serve a model, in the order they are tried."""

from __future__ import annotations

import fnmatch
import re

from app.errors import ModelNotFound, NoProviderAvailable


class Router:
    """Maps a public model name (or alias) to the enabled providers that serve it.

    A provider lists model names, aliases (public name -> its own name) and glob patterns
    such as ``claude-*``. Candidates come in priority order (lower first), config order
    breaking ties.
    """

    def __init__(self, providers):
        self.providers = providers
        self._exact: dict[str, list] = {}
        self._patterns: list[tuple[re.Pattern, object, int]] = []
        for order, adapter in enumerate(providers):
            s = adapter.settings
            key = (s.priority, order)
            names = {m: m for m in s.models if not _is_pattern(m)}
            names.update(s.aliases)
            for public, upstream in names.items():
                self._exact.setdefault(public, []).append((key, adapter, upstream))
            for m in s.models:
                if _is_pattern(m):
                    self._patterns.append((re.compile(fnmatch.translate(m)), adapter, key))
        for entries in self._exact.values():
            entries.sort(key=lambda e: e[0])
        self._resolved = {model: self._resolve(model) for model in self._exact}

    def candidates(self, model: str, endpoint: str) -> list[tuple[object, str]]:
        """(adapter, provider's model name) pairs to try; ModelNotFound or NoProviderAvailable."""
        entries = self._resolved.get(model)
        if entries is None:
            entries = self._resolve(model)
        if not entries:
            raise ModelNotFound(
                f"The model {model!r} does not exist or is not served by this proxy. "
                f"Available models: {', '.join(self.model_names()) or 'none'}.",
                param="model")
        found = [(a, m) for a, m in entries if a.settings.enabled and endpoint in a.endpoints]
        if not found:
            served = [a for a, _ in entries if a.settings.enabled]
            if served:
                raise ModelNotFound(f"The model {model!r} does not support this endpoint.",
                                    param="model", code="unsupported_endpoint")
            raise NoProviderAvailable(f"No enabled provider serves the model {model!r}.",
                                      headers={"Retry-After": "60"})
        return found

    def model_owners(self) -> list[tuple[str, str]]:
        """(model or alias, first enabled provider serving it); glob patterns are left out."""
        owners = []
        for model in sorted(self._exact):
            enabled = [a.name for _, a, _ in self._exact[model] if a.settings.enabled]
            if enabled:
                owners.append((model, enabled[0]))
        return owners

    def model_names(self) -> list[str]:
        return [model for model, _ in self.model_owners()]

    def _resolve(self, model):
        entries = list(self._exact.get(model, ()))
        entries += [(key, adapter, model) for pattern, adapter, key in self._patterns
                    if pattern.match(model)]
        entries.sort(key=lambda e: e[0])
        seen, found = set(), []
        for _, adapter, upstream in entries:
            if adapter.name not in seen:  # a name and a pattern of one provider: try it once
                seen.add(adapter.name)
                found.append((adapter, upstream))
        return found


def _is_pattern(model: str) -> bool:
    return any(c in model for c in "*?[")
