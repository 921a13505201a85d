"""Run-scoped grants, their audit columns, and the SQLite change log.

Revision ID: 0005
Revises: 0007
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "grants",
        sa.Column("id", sa.String(36), primary_key=True),
        # SHA-256 of the grant token; the token itself is never stored.
        sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("providers", sa.JSON, nullable=False),
        sa.Column("integration_ids", sa.JSON, nullable=False),
        sa.Column("audience", sa.JSON, nullable=False),
        sa.Column("methods", sa.JSON, nullable=False),
        sa.Column("run_id", sa.String(255), nullable=False, server_default=""),
        sa.Column("issuer", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_by", sa.String(128), nullable=True),
    )
    op.create_index("ix_grants_run", "grants", ["run_id"])
    op.create_index("ix_grants_user", "grants", ["user_id", "created_at"])
    op.create_index("ix_grants_expires_at", "grants", ["expires_at"])
    op.create_table(
        "change_log",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False, server_default=""),
        sa.Column("provider", sa.String(64), nullable=False, server_default=""),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("grant_id", sa.String(36), nullable=True))
        batch.add_column(sa.Column("run_id", sa.String(255), nullable=True))
    op.create_index("ix_audit_run", "audit_events", ["run_id", "occurred_at"])


def downgrade() -> None:
    op.drop_index("ix_audit_run", "audit_events")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("run_id")
        batch.drop_column("grant_id")
    op.drop_table("change_log")
    op.drop_table("grants")
