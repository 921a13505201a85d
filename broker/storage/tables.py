"""The schema. Changes go through an Alembic migration in ``migrations/versions``.

Tokens exist here only as ciphertext (``*_ct`` columns, format in ``broker.crypto.aead``).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

metadata = MetaData()

# The environment this database belongs to, recorded at first migration.
broker_meta = Table(
    "broker_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

integrations = Table(
    "integrations",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("user_id", String(255), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("account_id", String(255), nullable=False, server_default=""),
    Column("status", String(32), nullable=False),
    Column("access_token_ct", LargeBinary, nullable=True),
    Column("refresh_token_ct", LargeBinary, nullable=True),
    # Key id of the row's ciphertexts; lets start-up and `keys status` count rows per key.
    Column("key_id", String(64), nullable=True),
    Column("token_type", String(64), nullable=False, server_default="Bearer"),
    Column("scopes", JSON, nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("last_refreshed_at", DateTime(timezone=True), nullable=True),
    Column("disconnected_at", DateTime(timezone=True), nullable=True),
    Column("disconnect_reason", Text, nullable=True),
    # Outcome of the provider-side revocation at Disconnect (REVOKED, PENDING, ...).
    Column("revocation", String(16), nullable=True),
    Column("revocation_attempts", Integer, nullable=False, server_default="0"),
    Column("next_revocation_at", DateTime(timezone=True), nullable=True),
    # Compare-and-swap counter: every write of tokens is "UPDATE … WHERE version = :seen".
    Column("version", BigInteger, nullable=False, server_default="1"),
    Column("refresh_failures", Integer, nullable=False, server_default="0"),
    Column("last_refresh_error", String(64), nullable=True),
    Column("next_refresh_at", DateTime(timezone=True), nullable=True),
    # Refresh lease: the one broker (of any replica) allowed to call the provider for this row
    # until refresh_lease_until. Longer than the provider timeout times the attempts.
    Column("refresh_lease_owner", String(64), nullable=True),
    Column("refresh_lease_until", DateTime(timezone=True), nullable=True),
    # What the row holds; every kind but the authorization code keeps its
    # long-lived secret in credential_ct (JSON, encrypted like the tokens).
    Column("credential_type", String(32), nullable=False, server_default="authorization_code"),
    Column("credential_ct", LargeBinary, nullable=True),
    # PostgreSQL: the key of the session-level advisory lock the lease holder's process keeps
    # for its whole life. Lock gone = holder gone, and the lease is free at once.
    Column("refresh_lease_session", BigInteger, nullable=True),
    # Lifetime (expires_in) of the last access token the provider issued: a min_valid_for
    # longer than this cannot be met by refreshing again.
    Column("issued_lifetime_seconds", Integer, nullable=True),
    # When the refresh token itself lapses (the provider's refresh_token_expires_in); None:
    # not known, or it does not.
    Column("refresh_token_expires_at", DateTime(timezone=True), nullable=True),
    # When the refresh token was last issued (stored) or presented to the provider in a
    # successful refresh: the keep-alive's idle clock (providers.NAME.refresh_token_idle_
    # lifetime_seconds).
    Column("refresh_token_used_at", DateTime(timezone=True), nullable=True),
    # The refresh_token_expires_at an INTEGRATION_EXPIRING event was written for (once per
    # lapse: a new expiry arms it again).
    Column("expiring_notice_for", DateTime(timezone=True), nullable=True),
    # The last time an access token was served (GetAccessToken, Proxy); written in batches
    # from memory (broker.domain.usage), never with a version bump.
    Column("last_used_at", DateTime(timezone=True), nullable=True),
    UniqueConstraint("user_id", "provider", "account_id", name="uq_integrations_owner"),
    Index("ix_integrations_user_created", "user_id", "created_at", "id"),
    Index("ix_integrations_expires_at", "expires_at"),
    Index("ix_integrations_refresh_token_used_at", "refresh_token_used_at"),
    Index("ix_integrations_provider_used", "provider", "refresh_token_used_at"),
    Index("ix_integrations_refresh_token_expires_at", "refresh_token_expires_at"),
)

# One row per RPC that reads, returns, changes or deletes an integration. Never a token.
audit_events = Table(
    "audit_events",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("caller", String(128), nullable=False),
    Column("method", String(64), nullable=False),
    Column("integration_id", String(36), nullable=True),
    Column("user_id", String(255), nullable=True),
    Column("provider", String(64), nullable=True),
    Column("outcome", String(32), nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("detail", String(255), nullable=True),
    Column("credential_type", String(32), nullable=True),
    # The grant a call was made under (or created, or revoked) and its run.
    Column("grant_id", String(36), nullable=True),
    Column("run_id", String(255), nullable=True),
    Index("ix_audit_user", "user_id", "occurred_at"),
    Index("ix_audit_integration", "integration_id", "occurred_at"),
    Index("ix_audit_caller", "caller", "occurred_at"),
    # Most events belong to no run: a partial index spares each of them an index entry (the
    # hot path's insert) and still serves "events of run R" (run_id = R implies NOT NULL).
    Index(
        "ix_audit_run",
        "run_id",
        "occurred_at",
        postgresql_where=text("run_id IS NOT NULL"),
        sqlite_where=text("run_id IS NOT NULL"),
    ),
)

# PKCE authorization flows in progress (BeginAuthorization → CompleteAuthorization).
oauth_flows = Table(
    "oauth_flows",
    metadata,
    # SHA-256 of the state: a database reader cannot recover the state to complete a flow.
    Column("state_hash", String(64), primary_key=True),
    Column("user_id", String(255), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("account_id", String(255), nullable=False, server_default=""),
    Column("redirect_uri", Text, nullable=False),
    Column("scopes", JSON, nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("verifier_ct", LargeBinary, nullable=True),
    Column("key_id", String(64), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("consumed_at", DateTime(timezone=True), nullable=True),
    Column("version", BigInteger, nullable=False, server_default="1"),
    # The caller that began the flow: pending flows are capped per caller.
    Column("caller", String(255), nullable=False, server_default=""),
    Index("ix_oauth_flows_expires_at", "expires_at"),
    Index(
        "ix_oauth_flows_caller_open",
        "caller",
        "expires_at",
        postgresql_where=text("consumed_at IS NULL"),
        sqlite_where=text("consumed_at IS NULL"),
    ),
)

# Encryptions per key, for the AES-GCM random-nonce budget (NIST SP 800-38D: 2^32 per key).
key_usage = Table(
    "key_usage",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("encryptions", BigInteger, nullable=False, server_default="0"),
    Column("updated_at", DateTime(timezone=True), nullable=True),
)

# Run-scoped grants. The token itself is never stored, only its SHA-256.
grants = Table(
    "grants",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("token_sha256", String(64), nullable=False, unique=True),
    Column("user_id", String(255), nullable=False),
    Column("providers", JSON, nullable=False),
    Column("integration_ids", JSON, nullable=False),
    Column("audience", JSON, nullable=False),
    Column("methods", JSON, nullable=False),
    Column("run_id", String(255), nullable=False, server_default=""),
    Column("issuer", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("revoked_by", String(128), nullable=True),
    Index("ix_grants_run", "run_id"),
    Index("ix_grants_user", "user_id", "created_at"),
    Index("ix_grants_expires_at", "expires_at"),
)

# SQLite only: what each committed write changed (integration or grant ids), so a broker
# process can hear about writes made by another process (the CLI) on the same file — the
# job PostgreSQL's NOTIFY does for replicas. Purged after a few minutes.
change_log = Table(
    "change_log",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("key", String(64), nullable=False),
    Column("user_id", String(255), nullable=False, server_default=""),
    Column("provider", String(64), nullable=False, server_default=""),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
)

_EVENT_ID = BigInteger().with_variant(Integer(), "sqlite")

# The transactional outbox: one row per integration state change, written in the transaction
# that makes the change. Ids are handed out in commit order (see broker.storage.events).
integration_events = Table(
    "integration_events",
    metadata,
    Column("id", _EVENT_ID, primary_key=True, autoincrement=True),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("integration_id", String(36), nullable=False),
    Column("user_id", String(255), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("account_id", String(255), nullable=False, server_default=""),
    Column("type", String(32), nullable=False),
    Column("reason", String(64), nullable=False, server_default=""),
    Column("message", String(255), nullable=False, server_default=""),
    Column("failure_count", Integer, nullable=True),
    Column("revocation", String(16), nullable=True),
    Index("ix_integration_events_occurred", "occurred_at"),
    Index("ix_integration_events_user", "user_id", "id"),
    Index("ix_integration_events_integration", "integration_id", "id"),
    sqlite_autoincrement=True,
)

# One row per configured webhook: how far its queue has been filled, and which broker (of any
# replica) delivers to it right now. One deliverer per endpoint keeps its events in order.
webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("cursor", BigInteger, nullable=False, server_default="0"),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until", DateTime(timezone=True), nullable=True),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("endpoint", String(64), primary_key=True),
    Column("event_id", BigInteger, primary_key=True),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_attempt_at", DateTime(timezone=True), nullable=True),
    Column("last_status", Integer, nullable=True),
    Column("last_error", String(255), nullable=True),
    Column("delivered_at", DateTime(timezone=True), nullable=True),
    Index("ix_webhook_deliveries_state", "endpoint", "state", "event_id"),
)

# ``broker import``: one row per imported row of an application's table (``source`` names the
# table, never with credentials), committed with the integration it became.
imports = Table(
    "imports",
    metadata,
    Column("source", String(255), primary_key=True),
    Column("source_id", String(255), primary_key=True),
    Column("integration_id", String(36), nullable=False),
    Column("source_updated_at", DateTime(timezone=True), nullable=True),
    Column("imported_at", DateTime(timezone=True), nullable=False),
    Column("verified", String(16), nullable=True),
    Column("verified_at", DateTime(timezone=True), nullable=True),
    Column("wiped_at", DateTime(timezone=True), nullable=True),
    Index("ix_imports_integration", "integration_id"),
)
