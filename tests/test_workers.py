"""WORKERS=N: several waitress processes on one port under a supervisor that restarts them."""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from app.runtime.supervision import SupervisorState
from app.runtime.workers import Supervisor, split_limits, worker_cores
from settings import build_settings
from tests.conftest import FakeClock
from tests.databases import sqlite_environ
from tests.processes import free_port

REPO = Path(__file__).resolve().parent.parent


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


def _both_running(port):
    """The supervisor's two worker slots from a worker's JSON metrics, once both run."""
    try:
        status, body = _get_json(port, "/metrics?format=json")
    except (OSError, http.client.HTTPException):
        return None
    slots = body.get("supervisor", {}).get("workers", [])
    return slots if [s["state"] for s in slots] == ["running", "running"] else None


def _workers_answer(port, count=2, timeout=30):
    """Whether ``count`` different workers answered on ``port`` within ``timeout`` seconds."""
    seen: set[int] = set()

    def all_answered():
        pid = _pid(port)
        if pid:
            seen.add(pid)
        return len(seen) >= count

    return _wait_for(all_answered, timeout)


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
    port = free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text("providers: [{name: mock, type: mock, models: [m]}]\n")
    env = {**os.environ, "WORKERS": "2", "HOST": "127.0.0.1", "PORT": str(port), "THREADS": "4",
           "PROXY_CONFIG": str(config), "LOG_LEVEL": "WARNING", **sqlite_environ(tmp_path)}
    env.pop("WORKER_INDEX", None)
    out = open(tmp_path / "supervisor.log", "wb")
    supervisor = subprocess.Popen([sys.executable, "-m", "app.runtime.workers"], cwd=REPO, env=env,
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
        # Each worker on a core of its own (server.pin_workers, on by default), in turn.
        cores = {pid: psutil.Process(pid).cpu_affinity() for pid in children}
        assert sorted(cores.values()) == [[c] for c in sorted(worker_cores(2))], cores

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
        assert psutil.Process(newcomer).cpu_affinity() == cores[victim]  # its slot's core

        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=20) == 0
        assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                       for pid in now)
        log = (tmp_path / "supervisor.log").read_text()
        assert "exited with status -9" in log and "restarted" in log
    finally:
        _kill_tree(supervisor)
        out.close()


def test_workers_take_the_cores_in_turn_and_pin_workers_false_leaves_them_free(tmp_path):
    assert worker_cores(2, {0, 1}) == [0, 1]
    assert worker_cores(3, {2, 5}) == [2, 5, 2]  # more workers than cores: shared in turn
    assert worker_cores(2, {3}) == [3, 3]
    port = free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text("server: {pin_workers: false}\n"
                      "providers: [{name: mock, type: mock, models: [m]}]\n")
    env = {**os.environ, "WORKERS": "2", "HOST": "127.0.0.1", "PORT": str(port), "THREADS": "4",
           "PROXY_CONFIG": str(config), "LOG_LEVEL": "WARNING", "WORKER_CORE": "0",
           **sqlite_environ(tmp_path)}
    env.pop("WORKER_INDEX", None)
    with open(tmp_path / "supervisor.log", "wb") as out:
        supervisor = subprocess.Popen([sys.executable, "-m", "app.runtime.workers"], cwd=REPO,
                                      env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            assert _workers_answer(port), (tmp_path / "supervisor.log").read_text()
            allowed = sorted(os.sched_getaffinity(0))
            for child in psutil.Process(supervisor.pid).children():
                assert child.cpu_affinity() == allowed  # a stray WORKER_CORE is not passed on
        finally:
            _kill_tree(supervisor)


def _exits_at_once(started, clock):
    """A command whose worker exits with status 3 and has already exited when returned (so the
    supervisor's next poll sees it, however slowly the process ran); records each start's time."""
    def command(index):
        started.append(clock())
        proc = subprocess.Popen(["sh", "-c", "exit 3"])
        proc.wait(timeout=10)
        return proc
    return command


def _delays_logged(caplog) -> list[float]:
    return [float(d) for d in re.findall(r"restarting in ([\d.]+) s", caplog.text)]


def test_a_worker_that_keeps_crashing_is_restarted_after_growing_capped_delays_forever(caplog):
    clock, started = FakeClock(start=0.0), []

    def wait(seconds):  # each poll, the fake time moves on by the poll interval
        clock.advance(seconds)
        return clock() >= 120.0  # two minutes of crashes, then stop

    supervisor = Supervisor(_exits_at_once(started, clock), 1, restart_delay=0.5,
                            max_restart_delay=4.0, poll_interval=0.1, clock=clock, wait=wait)
    with caplog.at_level(logging.WARNING, logger="llm_proxy.workers"):
        assert supervisor.run() == 0  # ran the two minutes: it never gave up
    delays = [0.5, 1.0, 2.0] + [4.0] * (len(started) - 4)
    assert _delays_logged(caplog)[:len(delays)] == delays
    assert "exited with status 3; restarting in 4.0 s (restart 4)" in caplog.text
    # the exit is seen at the next poll, and the restart made at the first poll after the delay
    for delay, (before, after) in zip(delays, zip(started, started[1:])):
        assert delay <= after - before <= delay + 2 * 0.1 + 1e-6
    assert len(started) > 25  # still restarting every ~4 s, far past 10 restarts a minute
    assert len(started) - 1 <= supervisor.snapshot()["workers"][0]["restarts"] <= len(started)


def test_a_worker_that_stays_up_healthy_after_seconds_starts_its_slot_from_the_first_delay(
        caplog):
    clock, started, live = FakeClock(start=0.0), [], []
    crashing = _exits_at_once(started, clock)

    def command(index):  # the fourth start is a worker that stays up until killed
        if len(started) != 3:
            return crashing(index)
        started.append(clock())
        live.append(subprocess.Popen(["sleep", "30"]))
        return live[0]

    def wait(seconds):
        clock.advance(seconds)
        if live and live[0].poll() is None and clock() - started[3] >= 70.0:
            live[0].kill()  # up 70 s, past healthy_after, then it dies
            live[0].wait(timeout=10)
        return len(started) >= 6

    supervisor = Supervisor(command, 1, restart_delay=0.5, max_restart_delay=30.0,
                            healthy_after=60.0, poll_interval=0.1, clock=clock, wait=wait)
    with caplog.at_level(logging.WARNING, logger="llm_proxy.workers"):
        assert supervisor.run() == 0
    assert _delays_logged(caplog) == [0.5, 1.0, 2.0, 0.5, 1.0]
    assert "exited with status -9; restarting in 0.5 s (restart 4)" in caplog.text


def _worker_env(tmp_path, port, **extra):
    config = tmp_path / "proxy.yaml"
    config.write_text("providers: [{name: mock, type: mock, models: [m]}]\n")
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "THREADS": "4",
           "PROXY_CONFIG": str(config), "LOG_LEVEL": "WARNING", **sqlite_environ(tmp_path),
           **extra}
    env.pop("WORKER_INDEX", None)
    return env


def test_a_healthy_worker_keeps_serving_while_another_slot_crash_loops(tmp_path):
    port = free_port()
    env = _worker_env(tmp_path, port)
    out = open(tmp_path / "worker.log", "wb")

    def command(index):  # slot 0: a real worker; slot 1: one that dies as it starts
        if index == 0:
            return subprocess.Popen([sys.executable, "-m", "app.runtime.workers"], cwd=REPO,
                                    env={**env, "WORKER_INDEX": "0"}, stdout=out,
                                    stderr=subprocess.STDOUT)
        return subprocess.Popen(["sh", "-c", "exit 3"])

    supervisor = Supervisor(command, 2, restart_delay=0.025, max_restart_delay=0.1,
                            poll_interval=0.01)
    runner = threading.Thread(target=supervisor.run)
    runner.start()
    try:
        serving = _wait_for(lambda: _pid(port), 30)
        assert serving, (tmp_path / "worker.log").read_text()
        first = supervisor.snapshot()["workers"][1]["restarts"]
        answered = set()

        def crashed_a_dozen_more_times():
            answered.add(_pid(port))
            return supervisor.snapshot()["workers"][1]["restarts"] >= first + 12

        assert _wait_for(crashed_a_dozen_more_times, 15)
        assert answered == {serving}  # every request answered, by the same worker
        assert runner.is_alive() and serving in supervisor.pids()
        healthy, crashing = supervisor.snapshot()["workers"]
        assert healthy["restarts"] == 0 and healthy["state"] == "running"
        assert crashing["delay"] == 0.1  # backing off at the cap
    finally:
        supervisor.stop()
        runner.join(timeout=20)
        out.close()
    assert not runner.is_alive()


def _get_text(port, path, timeout=2.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def test_a_killed_workers_restart_shows_in_every_workers_metrics(tmp_path):
    port = free_port()
    out = open(tmp_path / "supervisor.log", "wb")
    supervisor = subprocess.Popen([sys.executable, "-m", "app.runtime.workers"], cwd=REPO,
                                  env=_worker_env(tmp_path, port, WORKERS="2"), stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        def supervised():
            return _both_running(port)

        slots = _wait_for(supervised, 30)
        assert slots, (tmp_path / "supervisor.log").read_text()
        state_file = psutil.Process(slots[0]["pid"]).environ()["SUPERVISOR_STATE"]
        victim = slots[1]["pid"]
        os.kill(victim, signal.SIGKILL)

        wanted = ('llm_proxy_worker_restarts_total{worker="0"} 0.0',
                  'llm_proxy_worker_restarts_total{worker="1"} 1.0',
                  'llm_proxy_workers{state="running"} 2.0')

        def restart_reported():
            try:
                text = _get_text(port, "/metrics")
            except (OSError, http.client.HTTPException):
                return None
            return all(line in text for line in wanted)

        assert _wait_for(restart_reported, 15), _get_text(port, "/metrics")
        status, body = _get_json(port, "/metrics?format=json")
        assert body["supervisor"]["restarts"] == 1
        assert body["supervisor"]["workers"][1]["pid"] not in (None, victim)

        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=20) == 0
        assert not os.path.exists(os.path.dirname(state_file))  # removed with the supervisor
        log = (tmp_path / "supervisor.log").read_text()
        assert "exited with status -9; restarting in 0.5 s (restart 1)" in log
    finally:
        _kill_tree(supervisor)
        out.close()


def test_a_worker_reports_its_supervisors_counts_and_an_unsupervised_one_reports_none(
        make_app, monkeypatch):
    app = make_app([{"name": "mock", "type": "mock", "models": ["m"]}])
    client = app.test_client()
    alone = client.get("/metrics").get_data(as_text=True)
    assert "llm_proxy_worker" not in alone and "llm_proxy_workers" not in alone
    assert "supervisor" not in client.get("/metrics?format=json").get_json()

    with SupervisorState() as state:
        state.publish({"pid": 1, "restarts": 3, "workers": [
            {"worker": 0, "pid": 10, "state": "running", "restarts": 0, "delay": 0.0},
            {"worker": 1, "pid": None, "state": "waiting", "restarts": 3, "delay": 2.0}]})
        monkeypatch.setenv("SUPERVISOR_STATE", state.path)
        text = client.get("/metrics").get_data(as_text=True)
        for line in ('llm_proxy_worker_restarts_total{worker="1"} 3.0',
                     'llm_proxy_worker_restart_delay_seconds{worker="1"} 2.0',
                     'llm_proxy_workers{state="running"} 1.0',
                     'llm_proxy_workers{state="waiting"} 1.0'):
            assert line in text
        assert client.get("/metrics?format=json").get_json()["supervisor"]["restarts"] == 3
    assert "llm_proxy_workers" not in client.get("/metrics").get_data(as_text=True)  # file gone


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


def test_workers_in_the_config_file_run_that_many_processes_under_a_supervisor(tmp_path):
    """``server.workers`` is the setting; WORKERS is only its variable."""
    port = free_port()
    env = _worker_env(tmp_path, port)
    (tmp_path / "proxy.yaml").write_text(
        "server: {workers: 2}\nproviders: [{name: mock, type: mock, models: [m]}]\n")
    env.pop("WORKERS", None)
    out = open(tmp_path / "supervisor.log", "wb")
    supervisor = subprocess.Popen([sys.executable, "wsgi.py"], cwd=REPO, env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        def supervised():
            return _both_running(port) is not None

        assert _wait_for(supervised, 30), (tmp_path / "supervisor.log").read_text()
        assert len(psutil.Process(supervisor.pid).children()) == 2
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=20) == 0
    finally:
        _kill_tree(supervisor)
        out.close()


def test_a_bad_workers_value_stops_start_up_with_one_line(tmp_path):
    env = _worker_env(tmp_path, free_port(), WORKERS="0")
    result = subprocess.run([sys.executable, "wsgi.py"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=20)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("llm-proxy: bad configuration: ") and "server.workers" in line \
        and "at least 1" in line, line


def _post_chat(port, timeout=5.0):
    """One chat request on a new connection (so the kernel picks a worker for each)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
            headers={"Content-Type": "application/json", "Connection": "close"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_two_workers_without_redis_admit_no_more_than_the_limit_in_all(tmp_path):
    """5 requests a minute (over an hour's window: nothing refills during the test) and two
    workers that keep their own counts: worker 0 admits 3, worker 1 admits 2, and 40 requests
    spread over both get exactly 5 answers, where each worker used to admit all 5. Start-up
    says so, and recommends REDIS_URL."""
    port = free_port()
    env = _worker_env(tmp_path, port, WORKERS="2", RATE_LIMIT_REQUESTS="5")
    env.pop("REDIS_URL", None)
    (tmp_path / "proxy.yaml").write_text(
        "auth: {window: 3600}\nproviders: [{name: mock, type: mock, models: [m]}]\n")
    out = open(tmp_path / "supervisor.log", "wb")
    supervisor = subprocess.Popen([sys.executable, "-m", "app.runtime.workers"], cwd=REPO, env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        assert _workers_answer(port), (tmp_path / "supervisor.log").read_text()
        answers = [_post_chat(port) for _ in range(40)]
        codes = [status for status, _ in answers]
        assert codes.count(200) == 5 and codes.count(429) == 35
        messages = {body["error"]["message"] for status, body in answers if status == 429}
        assert all("this worker's share of 5: the limit is split over 2 proxy workers" in m
                   for m in messages)
        assert any("3 requests per 3600 s" in m for m in messages)
        assert any("2 requests per 3600 s" in m for m in messages)
        log = (tmp_path / "supervisor.log").read_text()
        assert "2 workers without REDIS_URL: each keeps its own rate-limit counts" in log
        assert "Set REDIS_URL to share exact limits across the workers" in log
    finally:
        supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(timeout=20)
        finally:
            _kill_tree(supervisor)
            out.close()


def test_start_up_names_the_keys_whose_limit_is_below_the_worker_count():
    settings = build_settings({
        "server": {"workers": 3},
        "auth": {"api_keys_required": True, "requests_per_minute": 60, "api_keys": [
            {"id": "tiny", "sha256": "a" * 64, "requests_per_minute": 2, "max_in_flight": 1},
            {"id": "big", "sha256": "b" * 64}]},
        "providers": [{"name": "mock", "type": "mock", "models": ["m"]}]})
    lines = split_limits(settings)
    assert lines[0].startswith("3 workers without REDIS_URL: each keeps its own rate-limit "
                               "counts and enforces its share of every key's limits")
    assert lines[1:] == ["API key 'tiny': limits below the 3 workers (requests_per_minute 2, "
                         "max_in_flight 1): the workers whose share of a limit is 0 refuse it"]
