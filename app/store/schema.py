"""The store's tables (SQLAlchemy Core): the same schema on SQLite and PostgreSQL.

Times are UNIX seconds (UTC) in floating-point columns and days are ``YYYY-MM-DD`` text: both
compare, sort and group the same way on both databases, which their date-time types do not.
The migrations in ``migrations/versions`` create these tables; a change here is a new migration.
"""

from __future__ import annotations

import sqlalchemy as sa

HEAD = "0002"  # the newest migration in migrations/versions: a new migration moves it
metadata = sa.MetaData()

# API keys made through the admin API or ``python -m app.keys`` (the config file's are not here).
keys = sa.Table(
    "keys", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False, unique=True),
    # the secret before the last rotation, valid until previous_valid_until
    sa.Column("previous_sha256", sa.String(64), nullable=True),
    sa.Column("previous_valid_until", sa.Float, nullable=True),
    sa.Column("owner", sa.String(200), nullable=False, server_default=""),
    sa.Column("team", sa.String(200), nullable=False, server_default=""),
    sa.Column("models", sa.JSON, nullable=False),  # glob patterns; [] allows every model
    sa.Column("requests_per_minute", sa.Integer, nullable=True),  # None: the default
    sa.Column("tokens_per_minute", sa.Integer, nullable=True),
    sa.Column("max_in_flight", sa.Integer, nullable=True),
    sa.Column("budget_daily_usd", sa.Float, nullable=True),  # None: no such budget
    sa.Column("budget_monthly_usd", sa.Float, nullable=True),
    sa.Column("budget_total_usd", sa.Float, nullable=True),
    sa.Column("soft_limit_percent", sa.Float, nullable=True),
    sa.Column("expires_at", sa.Float, nullable=True),
    sa.Column("metadata", sa.JSON, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),  # kept for its spend and audit trail
)

# Every change to a key: who made it, when, and what (never a secret or its digest).
audit = sa.Table(
    "audit", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("key_id", sa.String(64), nullable=False),
    sa.Column("detail", sa.JSON, nullable=False),
    sa.Index("audit_key_at", "key_id", "at"),
)

# What each key spent, per UTC day and model: added to by the writer, never rewritten.
spend = sa.Table(
    "spend", metadata,
    sa.Column("key_id", sa.String(64), primary_key=True),
    sa.Column("day", sa.String(10), primary_key=True),
    sa.Column("model", sa.String(200), primary_key=True),
    sa.Column("requests", sa.BigInteger, nullable=False),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
    sa.Column("completion_tokens", sa.BigInteger, nullable=False),
    sa.Column("cached_tokens", sa.BigInteger, nullable=False),
    sa.Column("cost_usd", sa.Float, nullable=False),
    sa.Index("spend_day", "day"),
)

# The request log: one row per proxied request.
requests = sa.Table(
    "requests", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),  # the cursor of GET /admin/requests
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("key_id", sa.String(64), nullable=False),
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("served_model", sa.String(200), nullable=False),
    sa.Column("provider", sa.String(64), nullable=False),
    sa.Column("stream", sa.Boolean, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("cache", sa.String(8), nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("cached_tokens", sa.Integer, nullable=False),
    sa.Column("cost_usd", sa.Float, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("overhead_ms", sa.Float, nullable=False),
    sa.Column("condensed", sa.String(16), nullable=False),
    sa.Column("error_code", sa.String(64), nullable=True),
    sa.Column("request_body", sa.Text, nullable=True),  # only with database.log_bodies
    sa.Column("response_body", sa.Text, nullable=True),
    sa.Index("requests_at", "at"),
    sa.Index("requests_key_at", "key_id", "at"),
    sa.Index("requests_request_id", "request_id"),
)
