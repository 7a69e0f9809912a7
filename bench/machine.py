"""The machine a run shares: what it is, and how much of it other processes took meanwhile."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time

import psutil

from bench.services import which

SHARED_PCT = 10  # other work above this % of one core during a run: the row is not clean


def cpu_sample(proxy_pid=None, exclude=()) -> dict:
    """A point in time: the proxy's CPU seconds (its children's included), every other
    process's (``exclude`` and their children left out), and the VM's steal.

    Other processes (other sessions' tests, builds) slow the proxy even though it is pinned:
    they take core 1 from nginx and wrk, and share the physical core's caches. Kernel threads
    are left out: most of their work here is our own loopback traffic.
    """
    found = {p.info["pid"]: p.info for p in
             psutil.process_iter(["pid", "ppid", "create_time", "cpu_times"])}
    # Ours too: the children of what we started (a proxy's WORKERS, a server's workers).
    ours = _descendants(found, set(exclude) | ({proxy_pid} if proxy_pid else set()))
    proxy = _descendants(found, {proxy_pid}) if proxy_pid else set()
    others, own = {}, 0.0
    for pid, i in found.items():
        used = i["cpu_times"].user + i["cpu_times"].system if i["cpu_times"] else 0.0
        if pid in proxy:
            own += used
        elif pid not in ours and 2 not in (pid, i["ppid"]) and i["cpu_times"]:
            others[pid] = (i["create_time"], used)
    return {"t": time.monotonic(), "proxy": own,
            "others": others, "steal": getattr(psutil.cpu_times(), "steal", 0.0)}


def _descendants(found: dict, roots: set) -> set:
    """``roots`` and every process of ``found`` (pid: info with ppid) descending from them."""
    out, changed = set(roots), True
    while changed:
        grown = {pid for pid, i in found.items() if i["ppid"] in out} - out
        out |= grown
        changed = bool(grown)
    return out


def cpu_use(before, after) -> dict:
    """Between two samples: % of one core used by the proxy, by other processes, and stolen."""
    wall = after["t"] - before["t"]
    others = 0.0
    for pid, (created, used) in after["others"].items():
        then = before["others"].get(pid)
        others += used - then[1] if then and then[0] == created else used
    return {"proxy_cpu_pct": round(100 * (after["proxy"] - before["proxy"]) / wall, 1),
            "others_cpu_pct": round(100 * others / wall, 1),
            "steal_pct": round(100 * (after["steal"] - before["steal"]) / wall, 1)}


@contextlib.contextmanager
def cpu_meter(proxy_pid, procs):
    """``with cpu_meter(pid, procs) as cpu:``: afterwards ``cpu`` holds ``cpu_use`` over the
    block, every process of ``procs`` (a ProcessSet) left out of "other processes"."""
    use: dict = {}
    before = cpu_sample(proxy_pid, procs.pids())
    yield use
    use.update(cpu_use(before, cpu_sample(proxy_pid, procs.pids())))


def shared(row: dict) -> bool:
    """Whether other processes (or the VM host, as steal) took a run's CPU: *(shared)*."""
    return row["others_cpu_pct"] + row.get("steal_pct", 0) > SHARED_PCT


def wait_quiet(limit: float, busy_pct: float = SHARED_PCT / 2) -> float:
    """Wait up to ``limit`` s until the machine is under ``busy_pct`` for a second; the last %."""
    deadline, busy = time.monotonic() + limit, 0.0
    while time.monotonic() < deadline:
        busy = psutil.cpu_percent(interval=1.0)
        if busy < busy_pct:
            break
        print(f"bench: machine {busy:.0f}% busy, waiting for quiet", file=sys.stderr, flush=True)
    return busy


def describe() -> dict:
    """What the figures were measured on."""
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")), "")
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "kernel": platform.release(), "wrk": _first_line([which("wrk"), "-v"]),
            "nginx": _first_line([which("nginx"), "-v"])}


def summary(m: dict) -> str:
    """One line for a report: cores, CPU, kernel, Python (from ``describe()``)."""
    return f"{m['nproc']} cores, {m['cpu']}, Linux {m['kernel']}, Python {m['python']}"


def describe_source(source: str) -> str:
    """The proxy code measured: its git commit, marked when the app has uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", "-C", source, *args], capture_output=True,
                              text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return source
    dirty = git("status", "--porcelain", "--", "app", "settings.py", "wsgi.py")
    return f"{source} at {commit}" + (" + uncommitted changes" if dirty else "")


def _first_line(argv) -> str:
    if argv[0] is None:
        return "not installed"
    done = subprocess.run(argv, capture_output=True, text=True)
    return (done.stdout + done.stderr).strip().splitlines()[0]
