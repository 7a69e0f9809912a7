"""API keys and their audit trail.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "keys",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("previous_sha256", sa.String(64), nullable=True),
        sa.Column("previous_valid_until", sa.Float, nullable=True),
        sa.Column("owner", sa.String(200), nullable=False, server_default=""),
        sa.Column("team", sa.String(200), nullable=False, server_default=""),
        sa.Column("models", sa.JSON, nullable=False),
        sa.Column("requests_per_minute", sa.Integer, nullable=True),
        sa.Column("tokens_per_minute", sa.Integer, nullable=True),
        sa.Column("max_in_flight", sa.Integer, nullable=True),
        sa.Column("budget_daily_usd", sa.Float, nullable=True),
        sa.Column("budget_monthly_usd", sa.Float, nullable=True),
        sa.Column("budget_total_usd", sa.Float, nullable=True),
        sa.Column("soft_limit_percent", sa.Float, nullable=True),
        sa.Column("expires_at", sa.Float, nullable=True),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
    )
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_index("audit_key_at", "audit", ["key_id", "at"])


def downgrade():
    op.drop_index("audit_key_at", "audit")
    op.drop_table("audit")
    op.drop_table("keys")
