"""The background pass's keep-alive claim asks, per provider with an idle lifetime, for refresh
tokens last used before that provider's cutoff: one index range per provider on
(provider, refresh_token_used_at). Without it PostgreSQL read each such provider's whole
slice of the table (through the owner index, where provider is the second column) on every
pass.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_integrations_provider_used",
        "integrations",
        ["provider", "refresh_token_used_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_integrations_provider_used", table_name="integrations")
