"""WORKERS=N: several waitress processes on one port under a supervisor that restarts them."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from app.workers import Supervisor, worker_count

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(port, path, timeout=2.0):
    """One request on a new connection (so the kernel picks a worker for each)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _pid(port):
    try:
        status, body = _get_json(port, "/metrics?format=json")
    except (OSError, http.client.HTTPException):
        return None
    return body["system"]["pid"] if status == 200 else None


def _wait_for(predicate, timeout, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def _kill_tree(proc):
    try:
        parent = psutil.Process(proc.pid)
        children = parent.children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in [*children]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def test_two_workers_answer_on_one_port_a_killed_one_is_replaced_and_sigterm_stops_all(
        tmp_path):
    port = _free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text("providers: [{name: mock, type: mock, models: [m]}]\n")
    env = {**os.environ, "WORKERS": "2", "HOST": "127.0.0.1", "PORT": str(port), "THREADS": "4",
           "PROXY_CONFIG": str(config), "LOG_LEVEL": "WARNING"}
    env.pop("WORKER_INDEX", None)
    out = open(tmp_path / "supervisor.log", "wb")
    supervisor = subprocess.Popen([sys.executable, "-m", "app.workers"], cwd=REPO, env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        seen: set[int] = set()

        def both_answered():
            pid = _pid(port)
            if pid:
                seen.add(pid)
            return len(seen) >= 2

        assert _wait_for(both_answered, 30), f"pids seen: {seen}"
        children = {p.pid for p in psutil.Process(supervisor.pid).children()}
        assert seen == children and len(children) == 2

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
            headers={"Content-Type": "application/json"})
        assert conn.getresponse().status == 200
        conn.close()

        victim = min(children)
        os.kill(victim, signal.SIGKILL)

        def replaced():
            pid = _pid(port)
            if pid and pid not in children:
                return pid
            return None

        newcomer = _wait_for(replaced, 15)
        assert newcomer, "no new worker answered after the kill"
        now = {p.pid for p in psutil.Process(supervisor.pid).children()}
        assert victim not in now and newcomer in now and len(now) == 2

        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=20) == 0
        assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                       for pid in now)
        log = (tmp_path / "supervisor.log").read_text()
        assert "exited with status -9" in log and "restarted" in log
    finally:
        _kill_tree(supervisor)
        out.close()


def test_a_crash_loop_stops_the_supervisor():
    supervisor = Supervisor([sys.executable, "-c", "raise SystemExit(3)"], 2, restart_delay=0,
                            max_restarts_per_minute=4, poll_interval=0.02)
    started = time.monotonic()
    assert supervisor.run() == 1
    assert time.monotonic() - started < 10 and supervisor.pids() == []


def test_stop_ends_every_worker_even_one_that_ignores_sigterm(tmp_path):
    ignores = ("import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
               f"open(os.path.join({str(tmp_path)!r}, str(os.getpid())), 'w').close(); "
               "time.sleep(60)")
    supervisor = Supervisor([sys.executable, "-c", ignores], 2, stop_timeout=0.5,
                            poll_interval=0.02)
    result = []
    runner = threading.Thread(target=lambda: result.append(supervisor.run()))
    runner.start()
    try:
        assert _wait_for(lambda: len(supervisor.pids()) == 2, 10)
        pids = supervisor.pids()
        assert _wait_for(lambda: len(list(tmp_path.iterdir())) == 2, 10)  # both ignore SIGTERM
        supervisor.stop()
        runner.join(timeout=10)
        assert result == [0]
        assert not any(psutil.pid_exists(pid) for pid in pids)
    finally:
        supervisor.stop()
        runner.join(timeout=10)


def test_worker_count_reads_workers_and_defaults_to_one():
    assert worker_count({}) == 1
    assert worker_count({"WORKERS": "4"}) == 4
    with pytest.raises(SystemExit):
        worker_count({"WORKERS": "0"})
