"""Several waitress processes on one port (``WORKERS=N``), kept running by one supervisor.

Each worker is a fresh interpreter (``python -m app.runtime.workers`` with ``WORKER_INDEX`` set) that
builds its own app and binds its own listening socket with ``SO_REUSEPORT``, so the kernel
spreads new connections across the workers. Why not one socket bound by the parent and
inherited: every worker's select loop would wake for each connection and the first to call
accept() takes it (a thundering herd, and an uneven share: a busy worker that happens to be
awake keeps winning); with SO_REUSEPORT each socket has its own queue and connections are
hashed across them. The cost: connections still queued on a worker's socket when it dies are
reset, and the kernel does not know which worker is busy. Linux (3.9+) only.

``server.workers`` (``WORKERS``) 1, the default, serves in the current process with no
supervisor. Either way SIGTERM and SIGINT drain: see ``app.runtime.shutdown.Drain``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from app.runtime.supervision import STATE_ENV, SupervisorState

log = logging.getLogger("llm_proxy.workers")

WORKER_INDEX = "WORKER_INDEX"  # set in a worker's environment: its number, from 0
# ...and how many there are (``server.workers``): a worker that keeps its own rate-limit
# buckets (no Redis) enforces its share of every limit, which needs both (WorkerShare)
WORKER_COUNT = "WORKERS"
WORKER_CORE = "WORKER_CORE"  # the core the supervisor gives a worker (server.pin_workers)


def bound_socket(host: str, port: int, *, reuse_port: bool = True) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening: with SO_REUSEADDR (a restart is
    not refused over TIME_WAIT leftovers) and, when ``reuse_port``, SO_REUSEPORT. OSError
    (a taken address, a host that does not resolve) for the caller to say in one line."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def ensure_unserved(host: str, port: int) -> None:
    """OSError (EADDRINUSE) when something already listens on (host, port).

    Workers bind with SO_REUSEPORT, which lets any other SO_REUSEPORT socket of the same user
    join: a second ``WORKERS=N`` proxy on the port would silently take a share of its
    connections. So the supervisor first binds a plain socket there (SO_REUSEADDR, no
    SO_REUSEPORT), which the kernel refuses while any socket listens on an overlapping
    address, the wildcard included, and allows over TIME_WAIT leftovers of a previous run.
    Why not connect to the port and see if something answers: a listener whose backlog is full
    drops the SYN (a timeout, not a refusal), the wildcard has no one address to connect to,
    a firewall can hide it, and the probe would cost that server a connection. What this
    leaves open: two supervisors started at the same moment both pass before either has a
    worker listening."""
    bound_socket(host, port, reuse_port=False).close()


def cannot_listen(host: str, port: int, error: OSError) -> str:
    """The one line printed when the address cannot be had."""
    reason = error.strerror or str(error)
    reason = reason[:1].lower() + reason[1:]  # "address already in use"
    return f"llm-proxy: cannot listen on {_address(host, port)}: {reason}"


def _address(host: str, port) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def worker_cores(workers: int, cores=None) -> list[int]:
    """The core of each worker (``server.pin_workers``): the cores this process may use, taken
    in turn. A waitress process hands the GIL between its threads at every request (the loop
    thread reads and writes the sockets, a worker thread runs the app); free to move, those
    threads sit on different cores and each hand-over crosses them. Unpinned, two workers on
    two cores served 0.91x of what one worker on one core did; pinned, 2.1x
    (docs/performance.md, target 7). ``cores``: those to use, by default this process's."""
    cores = sorted(os.sched_getaffinity(0) if cores is None else cores)
    return [cores[index % len(cores)] for index in range(workers)]


def pin_to_core(value: str) -> None:
    """Keep this process, and every thread it starts, on the core ``value`` (a worker's
    ``WORKER_CORE``). Before any thread starts: a thread keeps the affinity it was born with."""
    try:
        os.sched_setaffinity(0, {int(value)})
    except (ValueError, OSError) as e:  # a core taken away since: serve unpinned
        log.warning("worker %s could not be pinned to core %s: %s",
                    os.environ.get(WORKER_INDEX), value, e)


def serve_worker(app, *, reuse_port: bool = True) -> int:
    """Serve ``app`` until SIGTERM/SIGINT, drain it (``app.runtime.shutdown.Drain``: in-flight requests
    get ``server.shutdown_grace`` seconds), close it; the exit status: 0, or 2 when the address
    cannot be had (one line on stderr). On its own SO_REUSEPORT socket, or (``reuse_port=False``,
    a single process) on a plain one, so a second server started on the same port by mistake
    fails instead of sharing it. The server is app/runtime/server.py's: the poll loop, the header-stage
    checks, and an open file limit raised to what the settings need."""
    from app.runtime.server import build_server, raise_fd_limit
    from app.runtime.shutdown import Drain

    proxy = app.extensions["llm_proxy"]
    server_settings = proxy.settings.server
    host, port = server_settings.host, server_settings.port
    try:
        connection_limit = raise_fd_limit(proxy.settings)
        sock = bound_socket(host, port, reuse_port=reuse_port)
        server = build_server(app, sockets=[sock], connection_limit=connection_limit)
    except OSError as e:
        print(cannot_listen(host, port, e), file=sys.stderr)
        proxy.close()
        return 2
    drain = Drain(server, server_settings.shutdown_grace)
    signal.signal(signal.SIGTERM, drain.stop)
    signal.signal(signal.SIGINT, drain.stop)
    index = os.environ.get(WORKER_INDEX)
    log.warning("%slistening on %s", f"worker {index} (pid {os.getpid()}) " if index else "",
                _address(server.effective_host, server.effective_port))
    try:
        drain.run()
    finally:
        proxy.close()
    return 0


class Supervisor:
    """Runs ``workers`` copies of a command and keeps them running until told to stop.

    ``command`` is an argv list (run with ``subprocess``) or a callable ``(index) -> Popen``.
    Each worker gets ``WORKER_INDEX`` and ``WORKERS`` (the count) in its environment (and
    ``SUPERVISOR_STATE`` given a ``state``, ``WORKER_CORE`` given ``cores``). A worker that exits is started again after its slot's delay: ``restart_delay``,
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
                 wait: Callable[[float], bool] | None = None, cores: Sequence[int] = ()):
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
        self.cores = list(cores)  # each worker's core (WORKER_CORE); empty: not pinned
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
                env = {**self.env, WORKER_INDEX: str(index), WORKER_COUNT: str(self.workers)}
                env.pop(WORKER_CORE, None)
                if self.cores:
                    env[WORKER_CORE] = str(self.cores[index])
                proc = subprocess.Popen(list(self.command), env=env, preexec_fn=_die_with_parent)
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


ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the app package
STOP_MARGIN = 5.0  # seconds the supervisor waits past the workers' grace before killing them


def main() -> int:
    """``python -m app.runtime.workers`` (and ``python wsgi.py``): a worker when ``WORKER_INDEX`` is
    set; else ``server.workers`` of them under a supervisor, or this process alone when it is
    1. The exit status: 0 after a stop, 2 for a bad configuration or a taken address."""
    environ = dict(os.environ)
    from app import configure_logging, create_app
    from app.runtime import malloc

    # Before any thread starts (see app/runtime/malloc.py); glibc's own MALLOC_ARENA_MAX overrides.
    malloc.limit_arenas(1)

    if WORKER_INDEX in environ:
        if environ.get(WORKER_CORE):
            pin_to_core(environ[WORKER_CORE])
        return serve_worker(create_app())
    from settings import SettingsError, load_settings

    try:  # check the configuration once here, rather than watch every worker fail on it
        settings = load_settings(environ)
    except SettingsError as e:
        print(f"llm-proxy: bad configuration: {e}", file=sys.stderr)
        return 2
    if settings.server.workers == 1:
        return serve_worker(create_app(), reuse_port=False)
    configure_logging(settings)
    return supervise(settings, environ)


def supervise(settings, environ: dict) -> int:
    """Run ``settings.server.workers`` workers under a ``Supervisor`` until SIGTERM/SIGINT."""
    server = settings.server
    try:
        ensure_unserved(server.host, server.port)
        # Bound (not listening) for the supervisor's life: fixes a port given as 0.
        probe = bound_socket(server.host, server.port)
    except OSError as e:
        print(cannot_listen(server.host, server.port, e), file=sys.stderr)
        return 2
    # The state file (restart counts for the workers' /metrics) goes when the supervisor stops.
    with probe, SupervisorState() as state:
        port = probe.getsockname()[1]
        # The workers import the app as this process did, from any working directory (which
        # they keep: a relative config or database path means the same to them).
        path = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
        env = {**environ, "PORT": str(port), "PYTHONPATH": path}
        if settings.console_on and not settings.console.session_secret:
            # One console session secret for every worker, new each start: a cookie signed by
            # one worker is good at the others, whichever the kernel hands the next request.
            env["CONSOLE_SESSION_SECRET"] = secrets.token_urlsafe(32)
        supervisor = Supervisor([sys.executable, "-m", "app.runtime.workers"], server.workers,
                                env=env,
                                state=state,
                                stop_timeout=server.shutdown_grace + STOP_MARGIN,
                                cores=worker_cores(server.workers) if server.pin_workers else ())
        log.warning("supervising %d workers on %s", supervisor.workers,
                    _address(server.host, port))
        if not settings.redis.url:
            for line in split_limits(settings):
                log.warning("%s", line)
        return supervisor.run()


def split_limits(settings) -> list[str]:
    """What start-up says when ``server.workers`` processes keep their own rate-limit counts
    (no ``REDIS_URL``): each enforces its share of every key's limits, and which keys have a
    limit smaller than the count (the workers whose share is 0 refuse them)."""
    from settings import LIMIT_FIELDS

    n = settings.server.workers
    lines = [f"{n} workers without REDIS_URL: each keeps its own rate-limit counts and "
             f"enforces its share of every key's limits (requests, tokens and in flight: "
             f"limit // {n}, one more for the first limit % {n} workers), so together they "
             f"admit no more than the limit, but a client may be refused by one worker while "
             f"another has room. Set REDIS_URL to share exact limits across the workers."]
    keys = settings.auth.client_keys()
    for record in (*keys.records, *(() if keys.required else (keys.anonymous,))):
        small = [f"{name} {value}" for name in LIMIT_FIELDS
                 if (value := getattr(record, name)) and value < n]
        if small:
            who = "anonymous clients" if record is keys.anonymous else f"API key {record.id!r}"
            lines.append(f"{who}: limits below the {n} workers ({', '.join(small)}): the "
                         f"workers whose share of a limit is 0 refuse it")
    return lines


if __name__ == "__main__":
    sys.exit(main())
