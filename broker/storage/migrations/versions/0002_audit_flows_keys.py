"""Audit trail, PKCE authorization flows, per-key encryption counts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("caller", sa.String(128), nullable=False),
        sa.Column("method", sa.String(64), nullable=False),
        sa.Column("integration_id", sa.String(36), nullable=True),
        sa.Column("user_id", sa.String(255), nullable=True),
        sa.Column("provider", sa.String(64), nullable=True),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("detail", sa.String(255), nullable=True),
    )
    op.create_index("ix_audit_user", "audit_events", ["user_id", "occurred_at"])
    op.create_index("ix_audit_integration", "audit_events", ["integration_id", "occurred_at"])
    op.create_index("ix_audit_caller", "audit_events", ["caller", "occurred_at"])
    op.create_table(
        "oauth_flows",
        # SHA-256 of the state: a database reader cannot recover the state to complete a flow.
        sa.Column("state_hash", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("account_id", sa.String(255), nullable=False, server_default=""),
        sa.Column("redirect_uri", sa.Text, nullable=False),
        sa.Column("scopes", sa.JSON, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("verifier_ct", sa.LargeBinary, nullable=True),
        sa.Column("key_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("consumed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.BigInteger, nullable=False, server_default="1"),
    )
    op.create_index("ix_oauth_flows_expires_at", "oauth_flows", ["expires_at"])
    op.create_table(
        "key_usage",
        sa.Column("key_id", sa.String(64), primary_key=True),
        sa.Column("encryptions", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("key_usage")
    op.drop_table("oauth_flows")
    op.drop_table("audit_events")
