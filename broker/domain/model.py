"""Domain records. ``Integration`` carries metadata only; ciphertexts stay in
``StoredIntegration``."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any


class Status(enum.StrEnum):
    CONNECTED = "CONNECTED"
    EXPIRED = "EXPIRED"
    NEEDS_REAUTHORIZATION = "NEEDS_REAUTHORIZATION"
    DISCONNECTED = "DISCONNECTED"


class Revocation(enum.StrEnum):
    REVOKED = "REVOKED"
    NOT_SUPPORTED = "NOT_SUPPORTED"
    FAILED = "FAILED"
    PENDING = "PENDING"
    SKIPPED = "SKIPPED"


@dataclass(frozen=True, slots=True)
class Integration:
    id: str
    user_id: str
    provider: str
    account_id: str
    status: Status
    token_type: str
    scopes: tuple[str, ...]
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None
    last_refreshed_at: datetime | None
    disconnected_at: datetime | None
    disconnect_reason: str | None
    has_refresh_token: bool
    version: int


@dataclass(frozen=True, slots=True)
class StoredIntegration:
    """A row as read from storage: metadata plus ciphertexts (never plaintext)."""

    integration: Integration
    access_token_ct: bytes | None = field(repr=False)
    refresh_token_ct: bytes | None = field(repr=False)
    key_id: str | None
    refresh_failures: int = 0
    revocation: str | None = None
    revocation_attempts: int = 0


@dataclass(frozen=True, slots=True)
class Selector:
    """integration_id, or (user_id, provider, account_id); account_id None = "the only one"."""

    integration_id: str = ""
    user_id: str = ""
    provider: str = ""
    account_id: str | None = None


@dataclass(frozen=True, slots=True)
class NewTokens:
    """Tokens to store (plaintext lives only in memory, on the way to encryption)."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    token_type: str
    expires_at: datetime | None
    scopes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StoreCommand:
    user_id: str
    provider: str
    account_id: str
    tokens: NewTokens
    metadata: dict[str, Any]
    # Alternative to tokens.expires_at, resolved against the broker's clock.
    expires_in_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class AccessToken:
    access_token: str = field(repr=False)
    token_type: str = "Bearer"
    expires_at: datetime | None = None
    scopes: tuple[str, ...] = ()
    integration_id: str = ""
    refreshed: bool = False


@dataclass(frozen=True, slots=True)
class TokenRequest:
    selector: Selector
    min_valid_for: timedelta = timedelta(0)
    force_refresh: bool = False
    required_scopes: tuple[str, ...] = ()
    # Seconds the caller will still wait (its gRPC deadline); None: no deadline.
    deadline_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Page:
    integrations: list[Integration]
    next_page_token: str
