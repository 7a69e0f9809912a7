"""Several waitress processes on one port (``WORKERS=N``), kept running by one supervisor.

Each worker is a fresh interpreter (``python -m app.workers`` with ``WORKER_INDEX`` set) that
builds its own app and binds its own listening socket with ``SO_REUSEPORT``, so the kernel
spreads new connections across the workers. Why not one socket bound by the parent and
inherited: every worker's select loop would wake for each connection and the first to call
accept() takes it (a thundering herd, and an uneven share: a busy worker that happens to be
awake keeps winning); with SO_REUSEPORT each socket has its own queue and connections are
hashed across them. The cost: connections still queued on a worker's socket when it dies are
reset, and the kernel does not know which worker is busy. Linux (3.9+) only.

``WORKERS=1`` (the default) serves in the current process with no supervisor.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

from app.supervision import STATE_ENV, SupervisorState

log = logging.getLogger("llm_proxy.workers")

WORKER_INDEX = "WORKER_INDEX"  # set in a worker's environment: its number, from 0


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, not yet listening."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def serve_worker(app, *, reuse_port: bool = True) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, then close it: on its own SO_REUSEPORT socket, or
    (``reuse_port=False``, a single process) on a plain one, so a second server started on the
    same port by mistake fails instead of sharing it. The server is app/server.py's: the poll
    loop, the header-stage checks, and an open file limit raised to what the settings need."""
    from app.server import build_server, raise_fd_limit

    settings = app.extensions["llm_proxy"].settings
    server_settings = settings.server
    connection_limit = raise_fd_limit(settings)
    if reuse_port:
        sock = reuseport_socket(server_settings.host, server_settings.port)
        server = build_server(app, sockets=[sock], connection_limit=connection_limit)
    else:
        server = build_server(app, host=server_settings.host, port=server_settings.port,
                              connection_limit=connection_limit)

    def stop(signum, frame):
        raise SystemExit(0)  # waitress's run() catches it and shuts its threads down

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("worker %s (pid %d) serving on %s:%s", os.environ.get(WORKER_INDEX, "-"),
             os.getpid(), server_settings.host, server.effective_port)
    try:
        server.run()  # returns after closing itself on SystemExit
    finally:
        app.extensions["llm_proxy"].close()


class Supervisor:
    """Runs ``workers`` copies of a command and keeps them running until told to stop.

    ``command`` is an argv list (run with ``subprocess``) or a callable ``(index) -> Popen``.
    Each worker gets ``WORKER_INDEX`` in its environment (and ``SUPERVISOR_STATE`` given a
    ``state``). A worker that exits is started again after its slot's delay: ``restart_delay``,
    doubled by each further exit up to ``max_restart_delay``, back to the first once a worker
    stays up ``healthy_after`` seconds. It never gives up: stopping everything on a crash loop
    would leave the port unserved, so whoever can crash a worker (too many connections) could
    take the service down; a slot backing off alone costs little while the others serve.
    Restarts are logged and published to ``state`` for the workers' ``/metrics``. SIGTERM or
    SIGINT (or ``stop()``) sends SIGTERM to every worker, waits up to ``stop_timeout`` seconds,
    kills what is left, and ``run()`` returns 0. Workers get SIGTERM if the supervisor dies.
    ``clock`` and ``wait`` (``wait(seconds)``: True to stop; by default the wait ``stop()``
    ends) let tests drive the backoff without sleeping through it.
    """

    def __init__(self, command: Sequence[str] | Callable[[int], subprocess.Popen], workers: int,
                 *, restart_delay: float = 0.5, max_restart_delay: float = 30.0,
                 healthy_after: float = 60.0, stop_timeout: float = 10.0,
                 env: dict | None = None, poll_interval: float = 0.1,
                 state: SupervisorState | None = None, clock: Callable[[], float] = time.monotonic,
                 wait: Callable[[float], bool] | None = None):
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.command = command
        self.workers = workers
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        self.healthy_after = healthy_after
        self.stop_timeout = stop_timeout
        self.env = dict(os.environ if env is None else env)
        self.poll_interval = poll_interval
        self.state = state
        if state is not None:
            self.env[STATE_ENV] = state.path
        self.procs: list[subprocess.Popen | None] = [None] * workers
        self._clock = clock
        self._stop = threading.Event()
        self._wait = wait or self._stop.wait
        self._started = [0.0] * workers  # when each slot's worker started
        self._due = [0.0] * workers  # when an empty slot may start again
        self._delay = [0.0] * workers  # the slot's last restart delay; 0 once healthy
        self._restarts = [0] * workers

    def pids(self) -> list[int]:
        """The pids of the workers running now."""
        return [p.pid for p in self.procs if p is not None and p.poll() is None]

    def snapshot(self) -> dict:
        """Each slot's worker pid, state (running or waiting), restarts and last delay."""
        slots = [{"worker": index, "pid": proc.pid if proc is not None else None,
                  "state": "running" if proc is not None else "waiting",
                  "restarts": self._restarts[index], "delay": self._delay[index]}
                 for index, proc in enumerate(self.procs)]
        return {"pid": os.getpid(), "restarts": sum(self._restarts), "workers": slots}

    def stop(self) -> None:
        """Ask ``run()`` to stop the workers and return (safe from any thread or a signal)."""
        self._stop.set()

    def run(self) -> int:
        """Start the workers and supervise them until stopped; the exit status (0)."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: self.stop())
        try:
            for index in range(self.workers):
                self._start(index)
            self._publish()
            while not self._wait(self.poll_interval):
                self._check()
        finally:
            self._stop_all()
        return 0

    def _check(self) -> None:
        """Restart the workers that exited once their slot's delay has passed."""
        now = self._clock()
        changed = False
        for index, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is None:
                if self._delay[index] and now - self._started[index] >= self.healthy_after:
                    self._delay[index] = 0.0
                    changed = True
                continue
            if proc is not None:
                if now - self._started[index] >= self.healthy_after:
                    self._delay[index] = 0.0
                self.procs[index] = None
                self._restarts[index] += 1
                delay = self._back_off(index, now)
                log.warning("worker %d (pid %d) exited with status %s; restarting in %.1f s "
                            "(restart %d)", index, proc.pid, proc.returncode, delay,
                            self._restarts[index])
                changed = True
            if now >= self._due[index]:
                self._start(index, restart=True)
                changed = True
        if changed:
            self._publish()

    def _back_off(self, index: int, now: float) -> float:
        """The slot's next delay: the first, or twice the last (capped); it starts then."""
        last = self._delay[index]
        delay = min(self.max_restart_delay, last * 2 if last else self.restart_delay)
        self._delay[index] = delay
        self._due[index] = now + delay
        return delay

    def _start(self, index: int, restart: bool = False) -> None:
        try:
            if callable(self.command):
                proc = self.command(index)
            else:
                proc = subprocess.Popen(list(self.command),
                                        env={**self.env, WORKER_INDEX: str(index)},
                                        preexec_fn=_die_with_parent)
        except (OSError, subprocess.SubprocessError) as e:  # fork refused (EAGAIN, ENOMEM)
            delay = self._back_off(index, self._clock())
            log.error("worker %d could not start (%s); trying again in %.1f s", index, e, delay)
            return
        self.procs[index] = proc
        self._started[index] = self._clock()
        log.warning("worker %d %s (pid %d)", index, "restarted" if restart else "started",
                    proc.pid)

    def _publish(self) -> None:
        if self.state is None:
            return
        try:
            self.state.publish(self.snapshot())
        except OSError as e:  # the workers' metrics go stale; the workers keep serving
            log.error("could not publish the workers' state to %s: %s", self.state.path, e)

    def _stop_all(self) -> None:
        running = [p for p in self.procs if p is not None and p.poll() is None]
        for proc in running:
            _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for proc in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in %.0f s: killing it", proc.pid,
                            self.stop_timeout)
                _signal(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        for index, proc in enumerate(self.procs):
            if proc is not None:
                log.warning("worker %d (pid %d) stopped", index, proc.pid)
        self.procs = [None] * self.workers


def _signal(proc, sig) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies (Linux prctl; else nothing)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def worker_count(environ=None) -> int:
    """``WORKERS`` from the environment (default 1)."""
    environ = os.environ if environ is None else environ
    value = environ.get("WORKERS", "1").strip() or "1"
    try:
        count = int(value)
    except ValueError:
        raise SystemExit(f"llm-proxy: bad configuration: WORKERS must be a number, got {value!r}")
    if count < 1:
        raise SystemExit("llm-proxy: bad configuration: WORKERS must be at least 1")
    return count


def main() -> int:
    """``python -m app.workers``: a worker when ``WORKER_INDEX`` is set; else ``WORKERS`` of
    them under a supervisor, or this process alone when WORKERS is 1."""
    environ = dict(os.environ)
    from app import configure_logging, create_app, malloc

    # Before any thread starts (see app/malloc.py); glibc's own MALLOC_ARENA_MAX overrides.
    malloc.limit_arenas(1)

    if WORKER_INDEX in environ:
        serve_worker(create_app())
        return 0
    if worker_count(environ) == 1:
        serve_worker(create_app(), reuse_port=False)
        return 0
    from settings import SettingsError, load_settings

    try:  # check the configuration once here, rather than watch every worker fail on it
        settings = load_settings(environ)
    except SettingsError as e:
        print(f"llm-proxy: bad configuration: {e}", file=sys.stderr)
        return 2
    configure_logging(settings)
    server = settings.server
    # Bind once here: fails early if the port is taken, and fixes a port given as 0.
    # The state file (restart counts for the workers' /metrics) goes when the supervisor stops.
    with reuseport_socket(server.host, server.port) as probe, SupervisorState() as state:
        port = probe.getsockname()[1]
        supervisor = Supervisor([sys.executable, "-m", "app.workers"], worker_count(environ),
                                env={**environ, "PORT": str(port)}, state=state)
        log.warning("supervising %d workers on %s:%d", supervisor.workers, server.host, port)
        return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
