"""The audit trail's run index covers only events made under a grant's run.

Most events (every GetAccessToken without a grant) have no run: indexing their NULL run ids
cost each of them an index entry on the hot path's insert and served no query (``broker audit
--run R`` asks for run_id = R, which the partial index answers).

Revision ID: 0008
Revises: 0006
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0006"
branch_labels = None
depends_on = None

_NOT_NULL = sa.text("run_id IS NOT NULL")


def upgrade() -> None:
    op.drop_index("ix_audit_run", "audit_events")
    op.create_index(
        "ix_audit_run",
        "audit_events",
        ["run_id", "occurred_at"],
        postgresql_where=_NOT_NULL,
        sqlite_where=_NOT_NULL,
    )


def downgrade() -> None:
    op.drop_index("ix_audit_run", "audit_events")
    op.create_index("ix_audit_run", "audit_events", ["run_id", "occurred_at"])
