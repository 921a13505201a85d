"""Integration events (transactional outbox) and webhook delivery state.

Revision ID: 0006
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0004"
branch_labels = None
depends_on = None

# SQLite only auto-assigns INTEGER PRIMARY KEY; AUTOINCREMENT keeps ids from being reused after
# the newest events are purged (a reused id would look "already seen" to a resuming reader).
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "integration_events",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("integration_id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("account_id", sa.String(255), nullable=False, server_default=""),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False, server_default=""),
        sa.Column("message", sa.String(255), nullable=False, server_default=""),
        sa.Column("failure_count", sa.Integer, nullable=True),
        sa.Column("revocation", sa.String(16), nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_integration_events_occurred", "integration_events", ["occurred_at"])
    op.create_index("ix_integration_events_user", "integration_events", ["user_id", "id"])
    op.create_index(
        "ix_integration_events_integration", "integration_events", ["integration_id", "id"]
    )
    op.create_table(
        "webhook_endpoints",
        sa.Column("name", sa.String(64), primary_key=True),
        # Events up to this id have been looked at (and queued when they matched).
        sa.Column("cursor", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("endpoint", sa.String(64), primary_key=True),
        sa.Column("event_id", sa.BigInteger, primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.Integer, nullable=True),
        sa.Column("last_error", sa.String(255), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index(
        "ix_webhook_deliveries_state", "webhook_deliveries", ["endpoint", "state", "event_id"]
    )


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_endpoints")
    op.drop_index("ix_integration_events_integration", "integration_events")
    op.drop_index("ix_integration_events_user", "integration_events")
    op.drop_index("ix_integration_events_occurred", "integration_events")
    op.drop_table("integration_events")
