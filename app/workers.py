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
from collections import deque
from typing import Callable, Sequence

log = logging.getLogger("llm_proxy.workers")

WORKER_INDEX = "WORKER_INDEX"  # set in a worker's environment: its number, from 0


def waitress_options(server) -> dict:
    """waitress settings from ``settings.server``, except where to listen."""
    return dict(
        threads=server.threads, connection_limit=server.connection_limit,
        channel_timeout=server.channel_timeout,
        # waitress guards the extreme; the app answers the usual 413 as OpenAI JSON
        max_request_body_size=int(server.max_request_body_mb * 2 * 1024 * 1024),
        channel_request_lookahead=1, ident="llm-proxy", clear_untrusted_proxy_headers=True)


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
    same port by mistake fails instead of sharing it."""
    from waitress.server import create_server

    server_settings = app.extensions["llm_proxy"].settings.server
    if reuse_port:
        sock = reuseport_socket(server_settings.host, server_settings.port)
        server = create_server(app, sockets=[sock], **waitress_options(server_settings))
    else:
        server = create_server(app, host=server_settings.host, port=server_settings.port,
                               **waitress_options(server_settings))

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
    Each worker gets ``WORKER_INDEX`` in its environment. A worker that exits is started again
    after ``restart_delay`` seconds; more than ``max_restarts_per_minute`` restarts within a
    minute is a crash loop: the supervisor stops everything and ``run()`` returns 1. SIGTERM or
    SIGINT (or ``stop()``) sends SIGTERM to every worker, waits up to ``stop_timeout`` seconds,
    kills what is left, and ``run()`` returns 0. Workers get SIGTERM if the supervisor dies.
    """

    def __init__(self, command: Sequence[str] | Callable[[int], subprocess.Popen], workers: int,
                 *, restart_delay: float = 0.5, max_restarts_per_minute: int = 10,
                 stop_timeout: float = 10.0, env: dict | None = None,
                 poll_interval: float = 0.1):
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.command = command
        self.workers = workers
        self.restart_delay = restart_delay
        self.max_restarts_per_minute = max_restarts_per_minute
        self.stop_timeout = stop_timeout
        self.env = dict(os.environ if env is None else env)
        self.poll_interval = poll_interval
        self.procs: list[subprocess.Popen | None] = [None] * workers
        self._due: list[float] = [0.0] * workers  # when an exited slot may start again
        self._restarts: deque[float] = deque()
        self._stop = threading.Event()

    def pids(self) -> list[int]:
        """The pids of the workers running now."""
        return [p.pid for p in self.procs if p is not None and p.poll() is None]

    def stop(self) -> None:
        """Ask ``run()`` to stop the workers and return (safe from any thread or a signal)."""
        self._stop.set()

    def run(self) -> int:
        """Start the workers and supervise them until stopped; the exit status."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: self.stop())
        status = 0
        try:
            for index in range(self.workers):
                self._start(index)
            while not self._stop.wait(self.poll_interval):
                if not self._check():
                    status = 1
                    break
        finally:
            self._stop_all()
        return status

    def _check(self) -> bool:
        """Restart the workers that exited; False on a crash loop."""
        now = time.monotonic()
        for index, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is not None:
                log.warning("worker %d (pid %d) exited with status %s", index, proc.pid,
                            proc.returncode)
                self.procs[index] = None
                self._due[index] = now + self.restart_delay
            if self.procs[index] is None and now >= self._due[index]:
                while self._restarts and now - self._restarts[0] > 60.0:
                    self._restarts.popleft()
                if len(self._restarts) >= self.max_restarts_per_minute:
                    log.error("workers restarted %d times within a minute: stopping",
                              len(self._restarts))
                    return False
                self._restarts.append(now)
                self._start(index, restart=True)
        return True

    def _start(self, index: int, restart: bool = False) -> None:
        if callable(self.command):
            proc = self.command(index)
        else:
            proc = subprocess.Popen(list(self.command), env={**self.env, WORKER_INDEX: str(index)},
                                    preexec_fn=_die_with_parent)
        self.procs[index] = proc
        log.warning("worker %d %s (pid %d)", index, "restarted" if restart else "started",
                    proc.pid)

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
    with reuseport_socket(server.host, server.port) as probe:
        port = probe.getsockname()[1]
        supervisor = Supervisor([sys.executable, "-m", "app.workers"], worker_count(environ),
                                env={**environ, "PORT": str(port)})
        log.warning("supervising %d workers on %s:%d", supervisor.workers, server.host, port)
        return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
