"""The price table, and what one answer cost at it.

Prices are USD per million tokens, per model: input, output, cached input (prompt tokens the
provider read from its prompt cache) and cache write (prompt tokens it wrote to that cache:
Anthropic's ``cache_creation_input_tokens``). An answer's cost comes from its usage, which the
adapters give in OpenAI's shape: ``prompt_tokens`` counts every input token, cached and
written ones included, so the rest of the prompt is what is priced at the input rate.

The table is the operator's entries (``pricing.models``) over the built-in one below
(``pricing.defaults``). A model is looked up by the name the provider that answered serves
(an alias resolved), then by the name the client asked; exact names before fnmatch patterns,
the operator's entries before the built-in ones. A model found nowhere costs nothing and is
reported as unpriced, so a missing price shows in the metrics instead of passing for free.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
import threading
from dataclasses import dataclass, field

from app.cache.responses import HIT, STALE
from app.pipeline.router import is_pattern
from settings import PRICE_FIELDS

log = logging.getLogger("llm_proxy.pricing")

MILLION = 1_000_000  # prices are per million tokens
MAX_REMEMBERED = 1024  # model names whose price look-up is kept (client-chosen: bounded)

# The built-in table was taken on this date from the providers' public price pages
# (OpenAI: openai.com/api/pricing and platform.openai.com/docs/pricing; Anthropic:
# docs.anthropic.com/en/docs/about-claude/pricing). Prices change: check your provider's page,
# and set what differs in ``pricing.models`` (docs/configuration.md: Prices and cost).
# Not modelled: long-context surcharges (Claude Sonnet past 200K input tokens), Anthropic's
# one-hour cache writes (priced here at the five-minute rate), batch and flex discounts,
# audio and image tokens (priced as text).
PRICES_AS_OF = "2025-11"
_UNKNOWN = object()  # a model not looked up yet


@dataclass(frozen=True)
class Price:
    """One model's prices in USD per million tokens; a cached-input or cache-write price that
    is not known is the input price (nothing cheaper is assumed)."""
    input: float
    output: float
    cached_input: float | None = None
    cache_write: float | None = None

    def cost(self, usage) -> float:
        """USD for one call's OpenAI-shaped ``usage``: cached input at the cached rate, cache
        writes at the write rate, the rest of the prompt at the input rate, the completion
        (reasoning included) at the output rate. Counts that are not whole numbers count 0."""
        prompt = _count(usage.get("prompt_tokens"))
        details = usage.get("prompt_tokens_details")
        cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
        written = _count(usage.get("cache_creation_input_tokens"))
        cached = min(cached, prompt)
        written = min(written, prompt - cached)
        plain = prompt - cached - written
        completion = _count(usage.get("completion_tokens"))
        cached_rate = self.input if self.cached_input is None else self.cached_input
        write_rate = self.input if self.cache_write is None else self.cache_write
        return (plain * self.input + cached * cached_rate + written * write_rate
                + completion * self.output) / MILLION


def _count(value) -> int:
    return value if type(value) is int and value > 0 else 0  # bool is not a count


def _openai(names, input, output, cached_input=None) -> tuple:
    return names, Price(input, output, cached_input)


def _anthropic(names, input, output) -> tuple:
    """Anthropic: cache reads at a tenth of the input price, five-minute writes at 1.25x."""
    return names, Price(input, output, round(input * 0.1, 6), round(input * 1.25, 6))


def _snapshots(*names) -> tuple:
    """Each name and its dated snapshots (``gpt-4o-2024-08-06``, ``claude-sonnet-4-20250514``),
    nothing else: a new model must not inherit an old one's price by a loose pattern."""
    return tuple(n for name in names for n in (name, name + "-20*"))


DEFAULT_PRICES = (
    # OpenAI: input, output, cached input.
    _openai(_snapshots("gpt-5", "gpt-5.1") + ("gpt-5-chat-latest", "gpt-5.1-chat-latest",
                                               "gpt-5-codex", "gpt-5.1-codex"),
            1.25, 10.00, 0.125),
    _openai(_snapshots("gpt-5-mini", "gpt-5.1-codex-mini"), 0.25, 2.00, 0.025),
    _openai(_snapshots("gpt-5-nano"), 0.05, 0.40, 0.005),
    _openai(_snapshots("gpt-5-pro"), 15.00, 120.00),
    _openai(_snapshots("gpt-4.1"), 2.00, 8.00, 0.50),
    _openai(_snapshots("gpt-4.1-mini"), 0.40, 1.60, 0.10),
    _openai(_snapshots("gpt-4.1-nano"), 0.10, 0.40, 0.025),
    _openai(_snapshots("gpt-4o"), 2.50, 10.00, 1.25),
    _openai(("gpt-4o-2024-05-13", "chatgpt-4o-latest"), 5.00, 15.00),
    _openai(_snapshots("gpt-4o-mini"), 0.15, 0.60, 0.075),
    _openai(_snapshots("o1"), 15.00, 60.00, 7.50),
    _openai(_snapshots("o1-pro"), 150.00, 600.00),
    _openai(_snapshots("o1-mini"), 1.10, 4.40, 0.55),
    _openai(_snapshots("o3"), 2.00, 8.00, 0.50),
    _openai(_snapshots("o3-pro"), 20.00, 80.00),
    _openai(_snapshots("o3-mini"), 1.10, 4.40, 0.55),
    _openai(_snapshots("o4-mini"), 1.10, 4.40, 0.275),
    _openai(("codex-mini-latest",), 1.50, 6.00, 0.375),
    _openai(_snapshots("gpt-4-turbo") + ("gpt-4-turbo-preview",), 10.00, 30.00),
    _openai(("gpt-4", "gpt-4-0613"), 30.00, 60.00),
    _openai(("gpt-3.5-turbo", "gpt-3.5-turbo-0125"), 0.50, 1.50),
    _openai(("text-embedding-3-small",), 0.02, 0.0),
    _openai(("text-embedding-3-large",), 0.13, 0.0),
    _openai(("text-embedding-ada-002",), 0.10, 0.0),
    # Anthropic: input, output (cache read 0.1x, cache write 1.25x of input).
    _anthropic(_snapshots("claude-opus-4-5"), 5.00, 25.00),
    _anthropic(_snapshots("claude-opus-4-1", "claude-opus-4", "claude-opus-4-0"), 15.00, 75.00),
    _anthropic(_snapshots("claude-sonnet-4-5", "claude-sonnet-4", "claude-sonnet-4-0"),
               3.00, 15.00),
    _anthropic(_snapshots("claude-haiku-4-5"), 1.00, 5.00),
    _anthropic(_snapshots("claude-3-7-sonnet", "claude-3-5-sonnet", "claude-3-sonnet")
               + ("claude-3-7-sonnet-latest", "claude-3-5-sonnet-latest"), 3.00, 15.00),
    _anthropic(_snapshots("claude-3-5-haiku") + ("claude-3-5-haiku-latest",), 0.80, 4.00),
    _anthropic(_snapshots("claude-3-opus") + ("claude-3-opus-latest",), 15.00, 75.00),
    (_snapshots("claude-3-haiku"), Price(0.25, 1.25, 0.03, 0.30)),
)


@dataclass
class Cost:
    """What one request's upstream calls cost: ``usd`` for the priced ones; ``unpriced``: the
    models of calls that used tokens but have no price (they count 0)."""
    usd: float = 0.0
    unpriced: list[str] = field(default_factory=list)


class PriceTable:
    """Model -> Price, and the cost of a request's answer and side calls (``Trace``)."""

    def __init__(self, entries=(), *, defaults=True, router=None):
        """``entries``: (model name or pattern, Price), the operator's, ahead of the built-in
        table when ``defaults``; ``router`` resolves the name a provider serves (aliases)."""
        tables = [list(entries)]
        if defaults:
            tables.append([(name, price) for names, price in DEFAULT_PRICES for name in names])
        # Each table's exact names, then its patterns: the operator's before the built-in.
        self._tiers = []
        for table in tables:
            exact = {}
            for name, price in table:
                if not is_pattern(name):
                    exact.setdefault(name, price)
            patterns = [(re.compile(fnmatch.translate(name)), price) for name, price in table
                        if is_pattern(name)]
            self._tiers.append((exact, patterns))
        self._router = router
        self._aliases = {a.name: dict(a.settings.aliases) for a in router.providers} \
            if router is not None else {}
        self._found: dict[str, Price | None] = {}  # look-ups remembered, bounded
        self._lock = threading.Lock()
        self._reported: set[str] = set()  # unpriced models already logged, bounded

    @classmethod
    def from_settings(cls, pricing, *, router=None) -> PriceTable:
        """From the ``pricing`` section (settings.PricingSettings, validated)."""
        entries = [(e["model"].strip(), Price(*(e.get(f) for f in PRICE_FIELDS)))
                   for e in pricing.models]
        return cls(entries, defaults=pricing.defaults, router=router)

    def price(self, model: str) -> Price | None:
        """The price of ``model``: the first tier with its exact name, else with a pattern."""
        found = self._found.get(model, _UNKNOWN)
        if found is not _UNKNOWN:
            return found
        found = None
        for exact, patterns in self._tiers:
            found = exact.get(model) or next((p for rx, p in patterns if rx.match(model)), None)
            if found is not None:
                break
        with self._lock:
            if len(self._found) >= MAX_REMEMBERED:
                self._found.clear()
            self._found[model] = found
        return found

    def cost(self, trace) -> Cost:
        """The cost of the request ``trace`` records: its answer (nothing when it came from the
        cache or was another request's, coalesced) and its side calls (the summary), each at
        its own model's price."""
        cost = Cost()
        calls = [] if trace.cache in (HIT, STALE) else [(trace.model, trace.provider, trace.usage)]
        calls += [(model, "", usage) for model, usage in trace.side_usage]
        for model, provider, usage in calls:
            if not isinstance(usage, dict):
                continue
            price = self._price_served(model, provider)
            if price is not None:
                cost.usd += price.cost(usage)
            elif _used_tokens(usage):
                cost.unpriced.append(model)
                self._report(model)
        if not math.isfinite(cost.usd):  # unreachable with validated prices; never a bad header
            cost.usd = 0.0
        return cost

    def estimate(self, model: str, tokens: int) -> float:
        """USD a request for ``model`` may cost at most, roughly: ``tokens`` (its reservation:
        prompt estimate and most it may answer) at the dearer of its input and output rates;
        0 for a model without a price."""
        price = self._price_served(model, "")
        return 0.0 if price is None else tokens * max(price.input, price.output) / MILLION

    def _price_served(self, model: str, provider: str) -> Price | None:
        """By the name the provider serves (its alias resolved; without a provider, the
        first one's), then by the name asked."""
        if provider:
            served = self._aliases.get(provider, {}).get(model, model)
        elif self._router is not None:
            served = self._router.canonical_model(model)
        else:
            served = model
        found = self.price(served)
        if found is None and served != model:
            found = self.price(model)
        return found

    def _report(self, model: str):
        """One warning per unpriced model (a bounded number of them), not one per answer."""
        with self._lock:
            if model in self._reported or len(self._reported) >= MAX_REMEMBERED:
                return
            self._reported.add(model)
        log.warning("model %r has no price: its answers count as 0 USD (add it to "
                    "pricing.models, docs/configuration.md)", model[:200])


def _used_tokens(usage: dict) -> bool:
    return any(_count(usage.get(k)) for k in ("prompt_tokens", "completion_tokens",
                                              "total_tokens"))
