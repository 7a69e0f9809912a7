"""Which providers serve a model, in the order they are tried."""

from __future__ import annotations

import fnmatch
import random
import re

from app.errors import ModelNotFound, NoProviderAvailable


class Router:
    """Maps a public model name (or alias) to the enabled providers that serve it.

    A provider lists model names, aliases (public name -> its own name) and glob patterns
    such as ``claude-*``. Candidates come in priority order (lower first). Among providers of
    equal priority the ``strategy`` spreads the load: ``weighted`` draws a random order by
    each provider's ``weight``; ``least_in_flight`` puts the one with the fewest requests in
    flight first (``load(name)`` tells), ties broken by weight.
    """

    def __init__(self, providers, *, strategy="weighted", load=None, rng=random.random):
        self.providers = providers
        self._strategy = strategy
        self._load = load or (lambda name: 0)
        self._random = rng
        self._exact: dict[str, list] = {}
        self._patterns: list[tuple[re.Pattern, object, int]] = []
        for adapter in providers:
            s = adapter.settings
            names = {m: m for m in s.models if not _is_pattern(m)}
            names.update(s.aliases)
            for public, upstream in names.items():
                self._exact.setdefault(public, []).append((adapter, upstream))
            self._patterns += [(re.compile(fnmatch.translate(m)), adapter)
                               for m in s.models if _is_pattern(m)]
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
            if any(a.settings.enabled for a, _ in entries):
                raise ModelNotFound(f"The model {model!r} does not support this endpoint.",
                                    param="model", code="unsupported_endpoint")
            raise NoProviderAvailable(f"No enabled provider serves the model {model!r}.",
                                      headers={"Retry-After": "60"})
        if len(found) > 1:
            found = self._balance(found)
        return found

    def canonical_model(self, model: str) -> str:
        """The provider's own name for ``model`` at the highest priority (aliases resolved)."""
        entries = self._resolved.get(model)
        return entries[0][1] if entries else model

    def model_owners(self) -> list[tuple[str, str]]:
        """(model or alias, first enabled provider serving it); glob patterns are left out."""
        owners = []
        for model in sorted(self._exact):
            enabled = [a.name for a, _ in self._resolved[model] if a.settings.enabled]
            if enabled:
                owners.append((model, enabled[0]))
        return owners

    def model_names(self) -> list[str]:
        return [model for model, _ in self.model_owners()]

    def _resolve(self, model):
        """Providers serving ``model`` by priority, config order breaking ties; each once."""
        entries = list(self._exact.get(model, ()))
        entries += [(adapter, model) for pattern, adapter in self._patterns if pattern.match(model)]
        order = {adapter.name: i for i, adapter in enumerate(self.providers)}
        entries.sort(key=lambda e: (e[0].settings.priority, order[e[0].name]))
        seen, found = set(), []
        for adapter, upstream in entries:
            if adapter.name not in seen:  # a name and a pattern of one provider: try it once
                seen.add(adapter.name)
                found.append((adapter, upstream))
        return found

    def _balance(self, found):
        """Reorder each run of equal priority by the strategy; priorities stay in order."""
        ordered, start = [], 0
        while start < len(found):
            priority = found[start][0].settings.priority
            end = start
            while end < len(found) and found[end][0].settings.priority == priority:
                end += 1
            group = found[start:end]
            if len(group) > 1:
                group = self._weighted_order(group)
                if self._strategy == "least_in_flight":
                    group.sort(key=lambda e: self._load(e[0].name))
            ordered += group
            start = end
        return ordered

    def _weighted_order(self, group):
        """A random order where each provider comes first with probability weight/total."""
        left, out = list(group), []
        while len(left) > 1:
            total = sum(a.settings.weight for a, _ in left)
            point = self._random() * total
            for i, (adapter, _) in enumerate(left):
                point -= adapter.settings.weight
                if point < 0:
                    break
            out.append(left.pop(i))
        return out + left


def _is_pattern(model: str) -> bool:
    return any(c in model for c in "*?[")
