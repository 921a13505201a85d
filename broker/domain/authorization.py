"""Authorization-code + PKCE flow inside the broker (BeginAuthorization / CompleteAuthorization).

PLACEHOLDER: the interface the servicer and app wiring rely on; to be implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from broker.domain.model import Integration
from broker.domain.service import Clock, IntegrationService, TokenCipher
from broker.providers.catalog import ProviderRegistry
from broker.providers.client import OAuthClient


@dataclass(frozen=True, slots=True)
class BeginResult:
    authorization_url: str
    state: str
    expires_at: datetime


class AuthorizationService:
    def __init__(
        self,
        engine: AsyncEngine,
        cipher: TokenCipher,
        registry: ProviderRegistry,
        client: OAuthClient,
        integrations: IntegrationService,
        clock: Clock,
        flow_ttl: timedelta = timedelta(minutes=10),
    ) -> None:
        self.engine = engine
        self.cipher = cipher
        self.registry = registry
        self.client = client
        self.integrations = integrations
        self.clock = clock
        self.flow_ttl = flow_ttl

    async def begin(
        self,
        user_id: str,
        provider: str,
        redirect_uri: str,
        scopes: tuple[str, ...],
        account_id: str,
        metadata: dict[str, Any],
    ) -> BeginResult:
        raise NotImplementedError

    async def complete(
        self, state: str, code: str, error: str, error_description: str
    ) -> tuple[Integration, bool]:
        raise NotImplementedError

    async def purge_expired(self) -> int:
        return 0
