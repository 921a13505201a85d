"""Retry bookkeeping for provider revocations left PENDING by Disconnect.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("integrations") as batch:
        batch.add_column(
            sa.Column("revocation_attempts", sa.Integer, nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("next_revocation_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("integrations") as batch:
        batch.drop_column("next_revocation_at")
        batch.drop_column("revocation_attempts")
