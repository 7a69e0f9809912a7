"""For tests that run real processes and sockets: a free port, a bounded wait, a clean stop."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import pytest


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float = 20.0, interval: float = 0.05):
    """Poll ``check()`` until it returns something truthy (errors a starting server raises count
    as not yet); fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except (OSError, ValueError, KeyError, IndexError) as e:
            result, last_error = None, e
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error})")


def stop(process: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 10.0) -> float:
    """Send ``sig``, then kill after ``timeout`` seconds if needed; the seconds it took to exit."""
    started = time.monotonic()
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    return time.monotonic() - started
