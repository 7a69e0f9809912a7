"""What every report shares: its header, percentiles, and the targets with PASS or MISS."""

from __future__ import annotations

import datetime
import sys

from bench import machine


def header(report: dict, title: str) -> list[str]:
    """The report's first lines: what was measured, when, on what, from which code, how."""
    m = report["machine"]
    return [f"# llm-proxy {title}, {report['date']}", "",
            f"- machine: {machine.summary(m)}", f"- tools: {m['wrk']}; {m['nginx']}",
            f"- proxy code: {report['source']}", f"- command: `{report['command']}`"]


def percentile_ms(seconds: list[float], q: float, digits: int = 4):
    """The ``q``-th percentile of durations in seconds, in ms (None when there are none)."""
    if not seconds:
        return None
    values = sorted(seconds)
    return round(values[min(len(values) - 1, int(q / 100 * len(values)))] * 1000, digits)


def target(label: str, measured: str, limit: str, ok: bool | None, info: bool = False) -> dict:
    """One line of the targets table: PASS or MISS; an ``info`` line says within or beyond;
    ``ok`` None is information only."""
    if ok is None:
        result = "info"
    elif info:
        result = ("within" if ok else "beyond") + " (info)"
    else:
        result = "PASS" if ok else "MISS"
    return {"target": label, "measured": measured, "limit": limit, "result": result}


def passed(targets: list[dict]) -> bool:
    return all(t["result"] != "MISS" for t in targets)


def targets_table(targets: list[dict]) -> list[str]:
    return ["", "| target | measured | limit | result |", "| --- | --- | --- | --- |",
            *(f"| {t['target']} | {t['measured']} | {t['limit']} | {t['result']} |"
              for t in targets)]


def shared_note(rows) -> list[str]:
    """The footnote for rows marked *(shared)*, when there are any."""
    if not any(machine.shared(r) for r in rows):
        return []
    return ["", f"*shared*: other processes (or the VM host, as steal) took over "
            f"{machine.SHARED_PCT}% of a core during that run: its figures are low; rerun on a "
            "quiet machine."]


def progress(text: str) -> None:
    """A progress line on stderr (stdout gets the report)."""
    print(f"bench {datetime.datetime.now():%H:%M:%S}: {text}", file=sys.stderr, flush=True)
