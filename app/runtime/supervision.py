"""What a ``WORKERS=N`` supervisor tells its workers: its restart counts, in a small JSON file.

The supervisor has no HTTP server of its own, so it publishes a snapshot of its worker slots to
a file in a directory it makes (its path reaches the workers in ``SUPERVISOR_STATE``) and each
worker's ``/metrics`` reads the file when scraped. The file is replaced whole (a temporary file,
then ``os.replace``), so a reader sees the old snapshot or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

STATE_ENV = "SUPERVISOR_STATE"  # in a worker's environment: the supervisor's state file


class SupervisorState:
    """The supervisor's state file, in a fresh directory that ``close()`` removes."""

    def __init__(self, parent: str | None = None):
        self.directory = tempfile.mkdtemp(prefix="llm-proxy-supervisor-", dir=parent)
        self.path = os.path.join(self.directory, "state.json")

    def publish(self, snapshot: dict) -> None:
        """Replace the file with ``snapshot`` (raises OSError if it cannot be written)."""
        temporary = self.path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(snapshot, f)
        os.replace(temporary, self.path)

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> SupervisorState:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_state(environ=None) -> dict | None:
    """The supervisor's last snapshot, or None when this process is not supervised (or the
    file is gone: the supervisor stopped)."""
    path = (os.environ if environ is None else environ).get(STATE_ENV)
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
