"""The operator console at ``/console``: server-rendered pages of the proxy's figures and the
operator's actions on them, signed in with the admin key (docs/console.md).

``register(app)`` is called by ``create_app`` only when ``settings.console_on``; otherwise
nothing of the console is routed and ``/console`` is a 404. The console's own state (its
session signer and its sign-in throttle) is a ``Console`` on ``app.extensions``.
"""

from __future__ import annotations

import logging
import secrets

from app.console.session import Sessions, SignInThrottle

log = logging.getLogger("llm_proxy.console")
EXTENSION = "llm_proxy_console"


class Console:
    """What the console keeps beside the proxy's components: ``sessions`` (None while no
    admin key is set: nobody can sign in) and the ``throttle`` on wrong admin keys."""

    def __init__(self, llm_proxy):
        settings = llm_proxy.settings
        c = settings.console
        # With WORKERS>1 and no secret set, the supervisor gives every worker the same random
        # one (app/runtime/workers.py), so a cookie signed by one worker is good at the others.
        secret = c.session_secret.encode() if c.session_secret else secrets.token_bytes(32)
        if c.session_secret and len(c.session_secret) < 32:
            log.warning("console.session_secret (CONSOLE_SESSION_SECRET) is shorter than 32 "
                        "characters: whoever guesses it can make session cookies")
        self.sessions = (Sessions(secret, settings.admin_api_key, c.session_hours,
                                  wall=llm_proxy.wall, shared=llm_proxy.shared,
                                  prefix=settings.redis.prefix)
                         if settings.admin_api_key else None)
        self.throttle = SignInThrottle(c.sign_in_attempts, clock=llm_proxy.clock,
                                       workers=settings.server.workers)
        self.refresh_seconds = c.refresh_seconds


def register(app) -> None:
    """Route ``/console`` on ``app`` (the proxy's), with its security headers."""
    from app.console import views

    app.extensions[EXTENSION] = Console(app.extensions["llm_proxy"])
    app.register_blueprint(views.bp)
    app.after_request(views.security_headers)
