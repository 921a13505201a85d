"""Keep-alive and visibility: the refresh token's own expiry, when it was last issued or used
(the keep-alive's idle clock), the expiry an INTEGRATION_EXPIRING event was written for, and
when an access token was last served.

Existing rows holding a refresh token start their idle clock at their last refresh, or their
last write when never refreshed.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("integrations") as batch:
        batch.add_column(
            sa.Column("refresh_token_expires_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch.add_column(
            sa.Column("refresh_token_used_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch.add_column(
            sa.Column("expiring_notice_for", sa.DateTime(timezone=True), nullable=True)
        )
        batch.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
    integrations = sa.table(
        "integrations",
        sa.column("refresh_token_ct", sa.LargeBinary),
        sa.column("refresh_token_used_at", sa.DateTime(timezone=True)),
        sa.column("last_refreshed_at", sa.DateTime(timezone=True)),
        sa.column("updated_at", sa.DateTime(timezone=True)),
    )
    op.execute(
        integrations.update()
        .where(integrations.c.refresh_token_ct.is_not(None))
        .values(
            refresh_token_used_at=sa.func.coalesce(
                integrations.c.last_refreshed_at, integrations.c.updated_at
            )
        )
    )
    op.create_index(
        "ix_integrations_refresh_token_used_at", "integrations", ["refresh_token_used_at"]
    )
    op.create_index(
        "ix_integrations_refresh_token_expires_at", "integrations", ["refresh_token_expires_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_integrations_refresh_token_expires_at", table_name="integrations")
    op.drop_index("ix_integrations_refresh_token_used_at", table_name="integrations")
    with op.batch_alter_table("integrations") as batch:
        batch.drop_column("last_used_at")
        batch.drop_column("expiring_notice_for")
        batch.drop_column("refresh_token_used_at")
        batch.drop_column("refresh_token_expires_at")
