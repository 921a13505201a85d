"""Imported source rows (``broker import``): which row of which application table became which
integration, so a second run imports nothing new, an interrupted one resumes, and
``--wipe-source`` clears exactly the rows the broker now holds.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "imports",
        sa.Column("source", sa.String(255), primary_key=True),
        sa.Column("source_id", sa.String(255), primary_key=True),
        sa.Column("integration_id", sa.String(36), nullable=False),
        sa.Column("source_updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("verified", sa.String(16), nullable=True),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("wiped_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_imports_integration", "imports", ["integration_id"])


def downgrade() -> None:
    op.drop_index("ix_imports_integration", table_name="imports")
    op.drop_table("imports")
