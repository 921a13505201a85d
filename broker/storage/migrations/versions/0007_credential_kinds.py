"""Credential kinds beyond the authorization code: the kind and its encrypted credential, and
the kind in audit events.

Revision ID: 0007
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("integrations") as batch:
        # Every existing row holds authorization-code tokens.
        batch.add_column(
            sa.Column(
                "credential_type",
                sa.String(32),
                nullable=False,
                server_default="authorization_code",
            )
        )
        batch.add_column(sa.Column("credential_ct", sa.LargeBinary, nullable=True))
    # Audit events name the kind of credential a call reached.
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("credential_type", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("credential_type")
    with op.batch_alter_table("integrations") as batch:
        batch.drop_column("credential_ct")
        batch.drop_column("credential_type")
