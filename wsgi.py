"""Entry point: ``app`` for WSGI servers; ``python wsgi.py`` serves it with waitress, in
``WORKERS`` processes (default 1) sharing the port."""

import sys

if __name__ == "__main__":
    from app.runtime.workers import main

    sys.exit(main())

from app import create_app  # noqa: E402  (only when imported: the server builds its own)

app = create_app()
