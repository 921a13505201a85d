"""Initial schema: broker_meta, integrations.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "broker_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "integrations",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("account_id", sa.String(255), nullable=False, server_default=""),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("access_token_ct", sa.LargeBinary, nullable=True),
        sa.Column("refresh_token_ct", sa.LargeBinary, nullable=True),
        sa.Column("key_id", sa.String(64), nullable=True),
        sa.Column("token_type", sa.String(64), nullable=False, server_default="Bearer"),
        sa.Column("scopes", sa.JSON, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_refreshed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disconnected_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disconnect_reason", sa.Text, nullable=True),
        sa.Column("revocation", sa.String(16), nullable=True),
        sa.Column("version", sa.BigInteger, nullable=False, server_default="1"),
        sa.Column("refresh_failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_refresh_error", sa.String(64), nullable=True),
        sa.Column("next_refresh_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("refresh_lease_owner", sa.String(64), nullable=True),
        sa.Column("refresh_lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("user_id", "provider", "account_id", name="uq_integrations_owner"),
    )
    op.create_index("ix_integrations_user_created", "integrations", ["user_id", "created_at", "id"])
    op.create_index("ix_integrations_expires_at", "integrations", ["expires_at"])


def downgrade() -> None:
    op.drop_table("integrations")
    op.drop_table("broker_meta")
