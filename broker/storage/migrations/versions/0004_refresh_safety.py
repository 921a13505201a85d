"""Refresh safety: the lease holder's session key, and the lifetime the provider last issued.

Revision ID: 0004
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("integrations") as batch:
        batch.add_column(sa.Column("refresh_lease_session", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("issued_lifetime_seconds", sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("integrations") as batch:
        batch.drop_column("issued_lifetime_seconds")
        batch.drop_column("refresh_lease_session")
