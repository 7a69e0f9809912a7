"""The console's charts as SVG geometry, computed on the server: a line is a path's ``d``
attribute, so a page draws its charts without JavaScript and the refresh script only swaps
attributes (the Content-Security-Policy allows no inline style or script)."""

from __future__ import annotations

import math

WIDTH, HEIGHT = 600, 140  # the viewBox of every chart


def nice_top(value: float, floor: float) -> float:
    """The chart's top: ``value`` rounded up to 1, 2 or 5 times a power of ten, at least
    ``floor``."""
    value = max(value, floor)
    if not math.isfinite(value) or value <= 0:
        return floor
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return step * power
    return 10 * power


def path(values: list[float | None], top: float) -> str:
    """A path's ``d`` through ``values`` spread across the width; a None (a point without
    requests) breaks the line, and a point alone between two breaks is drawn as a dot (a
    segment of no length, which the stylesheet's round caps show)."""
    n = len(values)
    if n == 0 or top <= 0:
        return ""
    parts = []
    for index, value in enumerate(values):
        if value is None:
            continue
        x = index * WIDTH / max(1, n - 1)
        y = HEIGHT - min(value, top) / top * HEIGHT
        joined = index > 0 and values[index - 1] is not None
        parts.append(f"{'L' if joined else 'M'}{x:.1f} {y:.1f}")
        if not joined and (index == n - 1 or values[index + 1] is None):
            parts.append("l0 0")
    return " ".join(parts)


def chart(lines: dict[str, list[float | None]], *, floor: float, label) -> dict:
    """A chart's paths by line name, its top and the top's label (``label(top)``)."""
    top = nice_top(max((v for values in lines.values() for v in values if v is not None),
                       default=0.0), floor)
    return {"top": label(top), "paths": {name: path(values, top)
                                         for name, values in lines.items()}}
