"""A waitress server's graceful stop: on SIGTERM or SIGINT, stop accepting, let the requests in
flight (streams included) finish within ``server.shutdown_grace``, then stop (``Drain``)."""

from __future__ import annotations

import logging
import signal
import socket
import time

from waitress import wasyncore

from app.runtime.server import ACCEPT_BATCH, listeners

log = logging.getLogger("llm_proxy.server")


class Drain:
    """Runs a waitress server's loop until ``stop()`` (a SIGTERM/SIGINT handler), then drains it:
    the connections already queued are accepted and the listening sockets closed (a new
    connection is refused, so a load balancer moves on at once), idle keep-alive connections
    are closed, and the requests in flight, streams included, get up to ``grace`` seconds to
    finish while the loop keeps flushing their output; each connection closes once its last
    answer is sent. What is left at the deadline is cut.

    Why not waitress's own stop (SystemExit from the handler): its ``run()`` leaves the loop at
    once, so nothing written after the signal is ever sent (a stream stops mid-way, an answer
    finished a second later is lost), and then waits at most 5 s for its threads, whatever the
    grace. ``stop()`` only sets a flag (a signal handler must take no lock); a pipe given to
    ``signal.set_wakeup_fd`` ends the loop's wait at once, whichever thread the kernel
    delivered the signal to. ``clock`` measures the grace.
    """

    def __init__(self, server, grace: float, *, clock=time.monotonic):
        self.server = server
        self.grace = grace
        self.signal: int | None = None
        self._clock = clock
        self._listeners = listeners(server)
        self._map = self._listeners[0]._map
        self._adj = self._listeners[0].adj

    def stop(self, signum: int = signal.SIGTERM, frame=None) -> None:
        """Ask the loop to drain and return (safe in a signal handler; a second call waits for
        the first's drain)."""
        if self.signal is None:
            self.signal = signum

    def run(self) -> int:
        """Serve until stopped, drain, stop the threads; the number of requests cut."""
        with _SignalWakeup(self._map):
            while self.signal is None:
                self._turn(self._adj.asyncore_loop_timeout)
            deadline = self._clock() + self.grace
            self._stop_accepting()
            busy = self._close_idle()
            log.warning("%s: stopped accepting connections; %d with requests in flight, given "
                        "up to %g s to finish", _signal_name(self.signal), busy, self.grace)
            while busy and self._clock() < deadline:
                self._turn(max(0.0, min(self._adj.asyncore_loop_timeout,
                                        deadline - self._clock())))  # poll(<0) would block
                busy = self._close_idle()
        if busy:
            log.warning("%d requests still in flight after the %g s grace: cut", busy,
                        self.grace)
            for channel in self._channels():
                channel.handle_close()  # their threads stop at their next write
        # Threads still busy here serve clients already gone; they get what is left.
        dispatcher = self.server.task_dispatcher
        dispatcher.shutdown(cancel_pending=True, timeout=max(0.0, deadline - self._clock()))
        if not dispatcher.threads:  # none left to pull a trigger once it is closed
            wasyncore.close_all(self._map)
        return busy

    def _turn(self, timeout: float) -> None:
        wasyncore.loop(timeout=timeout, map=self._map, use_poll=True, count=1)

    def _channels(self) -> list:
        return [channel for listener in self._listeners
                for channel in list(listener.active_channels.values())]

    def _stop_accepting(self) -> None:
        for listener in self._listeners:
            for _ in range(listener.adj.backlog // ACCEPT_BATCH + 1):
                before = len(self._map)
                listener.handle_accept()  # a batch (_accept_waiting)
                if len(self._map) == before:
                    break
            # The dispatcher's own close: BaseWSGIServer.close would also close the trigger
            # that the threads still pull when they finish.
            wasyncore.dispatcher.close(listener)

    def _close_idle(self) -> int:
        """Close the connections with nothing in flight; the number still busy."""
        busy = 0
        for channel in self._channels():
            receiving = channel.request is not None and channel.request.headers_finished
            if channel.requests or receiving or channel.total_outbufs_len:
                busy += 1  # a request running, its body coming in, or its answer going out
            else:
                channel.handle_close()  # idle, or still sending headers: not yet a request
        return busy


class _SignalWakeup(wasyncore.dispatcher):
    """A socket pair in the loop's map with its write end as ``signal.set_wakeup_fd``: a signal
    ends the loop's poll at once (without it, a signal taken by another thread is noticed only
    at the next timeout). Nothing is set up off the main thread, where Python allows no
    wakeup fd."""

    def __init__(self, socket_map):
        self._previous = None
        reader, self._writer = socket.socketpair()
        super().__init__(reader, map=socket_map)
        self._writer.setblocking(False)
        try:
            self._previous = signal.set_wakeup_fd(self._writer.fileno(),
                                                  warn_on_full_buffer=False)
        except ValueError:  # not the main thread
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.set_wakeup_fd(self._previous)
        self.close()
        self._writer.close()

    def readable(self):
        return True

    def writable(self):
        return False

    def handle_read(self):
        try:
            self.recv(512)
        except OSError:
            pass


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
