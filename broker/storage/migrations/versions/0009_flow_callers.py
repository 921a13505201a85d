"""Authorization flows name the caller that began them, so pending flows can be capped per
caller; a partial index answers "this caller's open flows" without reading closed ones.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_OPEN = sa.text("consumed_at IS NULL")


def upgrade() -> None:
    with op.batch_alter_table("oauth_flows") as batch:
        # Flows begun before this revision count for no caller (they expire within minutes).
        batch.add_column(sa.Column("caller", sa.String(255), nullable=False, server_default=""))
    op.create_index(
        "ix_oauth_flows_caller_open",
        "oauth_flows",
        ["caller", "expires_at"],
        postgresql_where=_OPEN,
        sqlite_where=_OPEN,
    )


def downgrade() -> None:
    op.drop_index("ix_oauth_flows_caller_open", "oauth_flows")
    with op.batch_alter_table("oauth_flows") as batch:
        batch.drop_column("caller")
