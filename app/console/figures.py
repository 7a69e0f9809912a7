"""How the console writes its figures, and the shape every page's figures take.

A page's figures are a ``Figures``: ``fields`` (an element's text), ``paths`` (a chart line's
``d``), ``states`` (an element's ``data-value``, which the stylesheet colours) and ``values``
(a meter's ``value``), each by a name that is also the element's ``data-*`` attribute. The
template writes them into the HTML; the page's JSON view sends the same four maps, which the
refresh script copies onto the elements: one assembly serves both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

from app.store.spend import usd as usd_text

DASH = "\u2013"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass
class Figures:
    fields: dict[str, str] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"fields": self.fields, "paths": self.paths, "states": self.states,
                "values": self.values}


def slugs(names) -> dict[str, str]:
    """A name (a provider's, which the config may spell any way) -> a token safe in an element
    id and in ``data-*`` names: unsafe characters become ``_``, a clash gets a number."""
    found: dict[str, str] = {}
    taken: set[str] = set()
    for name in names:
        slug = _UNSAFE.sub("_", name)[:64] or "_"
        base, n = slug, 2
        while slug in taken:
            slug, n = f"{base}-{n}", n + 1
        taken.add(slug)
        found[name] = slug
    return found


def count(n: int | None) -> str:
    return DASH if n is None else f"{n:,}"


def rate(per_second: float | None) -> str:
    if per_second is None:
        return DASH
    return f"{per_second:.2f}/s" if per_second < 10 else f"{per_second:,.1f}/s"


def percent(share: float | None) -> str:
    """A share (0 to 1) as a percentage."""
    if share is None:
        return DASH
    value = share * 100
    return f"{value:.0f}%" if value in (0, 100) else f"{value:.2f}%" if value < 10 \
        else f"{value:.1f}%"


def ms(value: float | None) -> str:
    if value is None:
        return DASH
    if value < 1:
        return f"{value:.2f} ms"
    if value < 100:
        return f"{value:.1f} ms"
    if value < 1000:
        return f"{value:.0f} ms"
    return f"{value / 1000:.2f} s"


def usd(amount: float | None) -> str:
    return DASH if amount is None else f"{usd_text(round(amount, 6))} USD"


def mb(value: float | None) -> str:
    return DASH if value is None else f"{value:,.1f} MB"


def size(n: int | None) -> str:
    """Bytes, in the unit that reads best."""
    if n is None:
        return DASH
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def seconds(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def limit(value: int | None) -> str:
    """A configured limit: None or 0 is unlimited."""
    return "unlimited" if not value else f"{value:,}"


def when(wall: float | None) -> str:
    """A time as the console shows it: UTC, to the second."""
    if wall is None:
        return DASH
    return datetime.fromtimestamp(wall, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def iso_text(iso: str | None) -> str:
    """An ISO 8601 time of the store (``...Z``) as ``when`` writes it."""
    if not iso:
        return DASH
    try:
        return when(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return iso
