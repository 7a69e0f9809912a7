"""Which providers serve a model, in the order they are tried."""

from __future__ import annotations

import fnmatch
import random
import re

from app.errors import ModelNotFound, NoProviderAvailable
from app.protocols import serves

NAMED_IN_404 = 50  # models a 404 names; GET /v1/models lists them all


class Router:
    """Maps a public model name (or alias) to the enabled providers that serve it.

    A provider lists model names, aliases (public name -> its own name) and glob patterns
    such as ``claude-*``. Candidates come in priority order (lower first). Among providers of
    equal priority the ``strategy`` spreads the load: ``weighted`` draws a random order by
    each provider's ``weight``; ``least_in_flight`` puts the one with the fewest requests in
    flight first (``load(name)`` tells), ties broken by weight.

    A pattern says which names a provider takes, not which models exist: the concrete models
    its upstream listed (``listed``, from ``ModelDiscovery``) are shown as names by
    ``models`` and ``model``. Routing itself goes by the patterns either way.
    """

    def __init__(self, providers, *, strategy="weighted", load=None, rng=random.random):
        self.providers = providers
        self._strategy = strategy
        self._load = load or (lambda name: 0)
        self._random = rng
        self._exact: dict[str, list] = {}
        self._patterns: list[tuple[re.Pattern, object]] = []
        self._names: dict[str, set[str]] = {}  # provider -> its names and aliases
        self._several: set[str] = set()  # providers serving more than one upstream model
        self._listed: dict[str, dict[str, int]] = {}  # provider -> listed models (id: created)
        for adapter in providers:
            s = adapter.settings
            names = {m: m for m in s.models if not is_pattern(m)}
            names.update(s.aliases)
            self._names[adapter.name] = set(names)
            for public, upstream in names.items():
                self._exact.setdefault(public, []).append((adapter, upstream))
            self._patterns += [(re.compile(fnmatch.translate(m)), adapter)
                               for m in s.models if is_pattern(m)]
            if any(is_pattern(m) for m in s.models) or len(set(names.values())) > 1:
                self._several.add(adapter.name)
        self._resolved = {model: self._resolve(model) for model in self._exact}

    def candidates(self, model: str, endpoint: str) -> list[tuple[object, str]]:
        """(adapter, provider's model name) pairs to try; ModelNotFound or NoProviderAvailable."""
        entries = self._resolved.get(model)
        if entries is None:
            entries = self._resolve(model)
        if not entries:
            raise ModelNotFound(f"The model {model!r} does not exist or is not served by this "
                                f"proxy. {self._available()}", param="model")
        found = [(a, m) for a, m in entries if a.settings.enabled and serves(a, endpoint)]
        if not found:
            if any(a.settings.enabled for a, _ in entries):
                raise ModelNotFound(f"The model {model!r} does not support this endpoint.",
                                    param="model", code="unsupported_endpoint")
            raise NoProviderAvailable(f"No enabled provider serves the model {model!r}.",
                                      headers={"Retry-After": "60"})
        if len(found) > 1:
            found = self._balance(found)
        return found

    def serves_several_models(self, provider: str) -> bool:
        """Whether ``provider`` serves more than one model of its own (several names, aliases
        naming several, or a pattern): then one model's failures are kept apart from the
        others' (app/pipeline/breakers.py); a provider of one model is that model."""
        return provider in self._several

    def canonical_model(self, model: str) -> str:
        """The provider's own name for ``model`` at the highest priority (aliases resolved)."""
        entries = self._resolved.get(model)
        return entries[0][1] if entries else model

    def served_name(self, provider: str, model: str) -> str:
        """The name ``provider`` serves ``model`` under (its alias resolved)."""
        for adapter in self.providers:
            if adapter.name == provider:
                return adapter.settings.aliases.get(model, model)
        return model

    def model_owners(self) -> list[tuple[str, str]]:
        """(model or alias, first enabled provider serving it), by name; see ``models``."""
        return [(model, owner) for model, owner, _ in self.models()]

    def model_names(self) -> list[str]:
        return [model for model, _, _ in self.models()]

    def models(self) -> list[tuple[str, str, int]]:
        """(model, owner, created) by name: every name and alias an enabled provider serves,
        and the models an enabled provider's upstream listed that its patterns match; glob
        patterns themselves are left out. ``created`` is the upstream's, 0 when unknown."""
        found = []
        for model in sorted(set(self._exact).union(*self._listed.values())):
            known = self.model(model)
            if known is not None:
                found.append((model, *known))
        return found

    def model(self, model: str) -> tuple[str, int] | None:
        """(owner, created) of a model this proxy serves, or None. The owner is the first
        enabled provider, in routing order, that has it by name or alias, or by a pattern
        while its upstream listed it or its list is unknown (not asked, or failed)."""
        listed = self._listed
        entries = self._resolved.get(model)
        for adapter, _ in entries if entries is not None else self._resolve(model):
            if not adapter.settings.enabled:
                continue
            models = listed.get(adapter.name)
            if model in self._names[adapter.name] or models is None or model in models:
                created = max((m.get(model, 0) for m in listed.values()), default=0)
                return adapter.name, created
        return None

    def serves_by_name(self, model: str) -> bool:
        """Whether ``model`` is a configured name or alias, or one an upstream listed: a name
        the proxy vouches for (a pattern alone takes any name a client makes up)."""
        return model in self._exact or any(model in m for m in self._listed.values())

    def patterns(self) -> list[str]:
        """The glob patterns of the enabled providers, in config order, each once."""
        found = []
        for adapter in self.providers:
            if adapter.settings.enabled:
                found += [m for m in adapter.settings.models if is_pattern(m) and m not in found]
        return found

    def listed(self, provider: str, models: dict[str, int]) -> int:
        """What ``provider``'s upstream lists (id -> created): the models its patterns match
        are kept and served as names from now on. How many were kept."""
        adapter = next(a for a in self.providers if a.name == provider)
        patterns = [re.compile(fnmatch.translate(m)) for m in adapter.settings.models
                    if is_pattern(m)]
        kept = {m: c for m, c in models.items() if any(p.match(m) for p in patterns)}
        self._listed = {**self._listed, provider: kept}  # one reference swap: readers never lock
        return len(kept)

    def _available(self) -> str:
        """The end of a 404: the models served, and the patterns that take other names."""
        names, patterns = self.model_names(), self.patterns()
        shown = ", ".join(names[:NAMED_IN_404])
        if len(names) > NAMED_IN_404:
            shown += f" and {len(names) - NAMED_IN_404} more (GET /v1/models lists them)"
        if not patterns:
            return f"Available models: {shown or 'none'}."
        return (f"Available models: {shown or 'none listed'}; and any model served by "
                f"pattern: {', '.join(patterns)}.")

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


def is_pattern(model: str) -> bool:
    """Whether a configured model is a glob pattern (``gpt-*``) rather than a name."""
    return any(c in model for c in "*?[")
