"""Which concrete models the providers that serve glob patterns (``gpt-*``) have, asked of
their upstreams in one background thread, so ``GET /v1/models`` can list them.

A pattern routes any matching name, but says nothing of which models exist. Each upstream
that can tell (OpenAI-compatible ``GET /models``, Anthropic's ``GET /v1/models``) is asked at
start-up and every ``interval`` seconds, with a short timeout, never on a request's path; the
router keeps the answer. A failure is logged once (until the list is read again) and changes
nothing: the provider keeps its last list, or none, and its patterns route as before.
"""

from __future__ import annotations

import logging
import threading

from app.errors import UpstreamError
from app.pipeline.router import is_pattern

log = logging.getLogger("llm_proxy.discovery")

INTERVAL = 600.0  # seconds between two rounds: new models appear a few times a year
TIMEOUT = 5.0  # seconds for one upstream's list (connect and read)


class ModelDiscovery:
    """Asks each eligible provider's upstream for its model list, in a daemon thread.

    Eligible: enabled, serving at least one pattern, an adapter that can list
    (``lists_models``: not Azure, whose names are deployments, nor the mock) and no key
    variable left unset (the call could only be refused). ``wait(seconds)`` is the pause
    between rounds and answers True to stop; it defaults to the stop event's wait, and tests
    drive it.
    """

    def __init__(self, adapters, router, *, interval: float = INTERVAL, timeout: float = TIMEOUT,
                 wait=None):
        self.router = router
        self.interval = interval
        self.timeout = timeout
        self.adapters = [a for a in adapters if a.lists_models and a.settings.enabled
                         and not a.missing_key and any(is_pattern(m) for m in a.settings.models)]
        self._stopping = threading.Event()
        self._wait = wait or self._stopping.wait
        self._failing: set[str] = set()  # providers whose last round failed (logged once)
        self._rounds = 0
        self._round_done = threading.Condition()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Start the thread (its first round at once); False when there is nothing to ask."""
        if self._thread is not None or not self.adapters:
            return False
        self._thread = threading.Thread(target=self._run, name="llm-proxy-model-discovery",
                                        daemon=True)
        self._thread.start()
        return True

    def close(self, timeout: float = 1.0):
        """Stop the thread; a round under way ends within its own timeout (the thread is a
        daemon: nothing waits for it beyond ``timeout``)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def refresh(self):
        """One round: every eligible provider asked once, in turn."""
        for adapter in self.adapters:
            if self._stopping.is_set():
                return
            try:
                models = adapter.list_models(self.timeout)
            except UpstreamError as e:
                self._failed(adapter.name, e.message)
                continue
            except Exception as e:  # a list this code did not expect: logged, never fatal
                self._failed(adapter.name, f"{type(e).__name__}: {e}")
                continue
            if models is None:
                continue
            kept = self.router.listed(adapter.name, models)
            if adapter.name in self._failing or self._rounds == 0:
                log.info("provider %s: its model list has %d models matching its patterns",
                         adapter.name, kept)
            self._failing.discard(adapter.name)
        with self._round_done:
            self._rounds += 1
            self._round_done.notify_all()

    def wait_for_round(self, rounds: int, timeout: float) -> bool:
        """Wait until ``rounds`` rounds have ended (at once when there is nothing to ask)."""
        if not self.adapters:
            return True
        with self._round_done:
            return self._round_done.wait_for(lambda: self._rounds >= rounds, timeout)

    def _run(self):
        while not self._stopping.is_set():
            try:
                self.refresh()
            except Exception:  # the thread must outlive any one round
                log.exception("model discovery: a round failed")
            if self._wait(self.interval):
                return

    def _failed(self, provider: str, why: str):
        if self._stopping.is_set() or provider in self._failing:
            return
        self._failing.add(provider)
        log.warning("provider %s: its model list could not be read (%s); GET /v1/models shows "
                    "its configured names and the models it last listed; its patterns route as "
                    "before", provider, why)
