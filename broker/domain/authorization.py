"""Authorization-code + PKCE flow inside the broker (BeginAuthorization / CompleteAuthorization).

The web backend never sees a refresh token: Begin hands it a URL to send the user to and an
opaque ``state``; its callback route passes the provider's ``state`` and ``code`` (or
``error``) to Complete, and the broker exchanges the code and stores the integration exactly as
StoreIntegration would.

What a database reader finds in ``oauth_flows`` is not enough to finish a flow: the state is
stored only as its SHA-256, and the PKCE verifier is encrypted like a token, bound to its flow
(row id = the state hash, column ``pkce_verifier``) and to the flow's user, provider and
account: a flow handed to another user in the database cannot be completed. The state is
single use: it is consumed by one conditional UPDATE *before* the code is exchanged, so of two
concurrent completions (on any replica) exactly one reaches the provider.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from broker import metrics
from broker.config import AuthorizationSettings
from broker.domain import context, periodic, validation
from broker.domain.integrations import IntegrationService
from broker.domain.tokens import TokenCipher
from broker.errors import (
    AuthorizationFlowInvalid,
    AuthorizationUserMismatch,
    FlowLimit,
    GrantRejected,
    InvalidArgument,
    StorageUnavailable,
)
from broker.model import Clock, Integration, Kind, NewTokens, Owner, StoreCommand
from broker.providers.authorize import authorization_url, new_code_verifier
from broker.providers.catalog import ProviderRegistry
from broker.providers.client import OAuthClient, TokenResponse
from broker.storage import flows
from broker.storage.engine import storage_errors

log = logging.getLogger("broker.authorization")

VERIFIER_COLUMN = "pkce_verifier"
# Broker default when neither the profile nor the refresh settings say how long a token
# without expires_in lives (the same default as RefreshSettings).
FALLBACK_EXPIRES_IN = 3600
MAX_REDIRECT_URI = 2048
# States this broker issues are 43 characters; anything much longer is not one of ours.
MAX_STATE = 256
# Providers' codes are opaque but short (Google's are ~100 characters); 4 KiB is generous.
MAX_CODE = 4096
# How long closed and expired flows are kept before the purge deletes them, so that a late
# replay is answered "already used" / "expired" (clearer than "unknown") for a while.
PURGE_GRACE = timedelta(hours=1)
# A callback's error code and description end up in a status message shown to callers (and
# maybe in their logs): keep the code code-like and the description short and printable.
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_DESCRIPTION_LIMIT = 200
# Tokens the provider already issued are lost if they cannot be stored, so a brief database
# outage after the exchange is waited out rather than failing the (unrepeatable) flow at once.
_STORE_RETRY_DELAYS = (0.2, 0.5, 1.0)


@dataclass(frozen=True, slots=True)
class BeginResult:
    authorization_url: str
    # Returned to the caller once and never stored, logged or shown again.
    state: str
    expires_at: datetime

    def __repr__(self) -> str:
        return f"BeginResult(state=<hidden>, expires_at={self.expires_at.isoformat()})"


def _flow_owner(key: str, user_id: str, provider: str, account_id: str) -> Owner:
    """A flow's verifier is bound to whom the flow will store tokens for."""
    return Owner(key, user_id, provider, account_id, Kind.AUTHORIZATION_CODE.value)


def state_hash(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


def _provider_error(error: str, description: str) -> tuple[str, str]:
    code = error if _ERROR_CODE.fullmatch(error) else "unrecognized_error"
    text = " ".join(_CONTROL.sub(" ", description).split())
    if len(text) > _DESCRIPTION_LIMIT:
        text = text[: _DESCRIPTION_LIMIT - 1] + "…"
    return code, f" ({text})" if text else ""


class AuthorizationService:
    def __init__(
        self,
        engine: AsyncEngine,
        cipher: TokenCipher,
        registry: ProviderRegistry,
        client: OAuthClient,
        integrations: IntegrationService,
        clock: Clock,
        flow_ttl: timedelta | None = None,
        *,
        default_expires_in_seconds: int | None = None,
        limits: AuthorizationSettings | None = None,
    ) -> None:
        self.engine = engine
        self.cipher = cipher
        self.registry = registry
        self.client = client
        self.integrations = integrations
        self.clock = clock
        self.limits = limits or AuthorizationSettings()
        self.flow_ttl = flow_ttl or timedelta(seconds=self.limits.flow_ttl_seconds)
        if default_expires_in_seconds is None:
            # Same default as refreshes use, when the wiring did not pass one explicitly.
            settings = getattr(integrations.refresher, "settings", None)
            configured = getattr(settings, "default_expires_in_seconds", None)
            default_expires_in_seconds = (
                configured if isinstance(configured, int) else FALLBACK_EXPIRES_IN
            )
        self.default_expires_in_seconds = default_expires_in_seconds

    # -- begin -----------------------------------------------------------------------------

    async def begin(
        self,
        user_id: str,
        provider: str,
        redirect_uri: str,
        scopes: tuple[str, ...],
        account_id: str,
        metadata: dict[str, Any],
    ) -> BeginResult:
        validation.text("user_id", user_id, validation.MAX_ID)
        validation.text("provider", provider, validation.MAX_PROVIDER)
        validation.text("redirect_uri", redirect_uri, MAX_REDIRECT_URI)
        validation.text("account_id", account_id, validation.MAX_ID, required=False)
        limits = self.limits
        # Tighter than StoreIntegration's: a flow is stored before anyone has authorized
        # anything, and abandoned ones stay until they expire.
        requested = validation.scopes(
            "scopes", scopes, max_count=limits.max_scopes, max_length=limits.max_scope_length
        )
        validation.metadata(metadata, max_bytes=limits.max_metadata_bytes)
        profile = self.registry.get(provider)  # UnknownProvider if not configured here
        template = profile.template_problem(metadata)
        if template is not None:
            # Its endpoints need a value only this flow can give ({shop}, {subdomain}).
            raise InvalidArgument(*template)
        profile = profile.resolved(metadata)
        context.note_owner(user_id, profile.name)
        context.check_owner(user_id, profile.name)
        if redirect_uri not in profile.redirect_uris:
            # Exact match only (RFC 9700 §4.1.3): a prefix or pattern match is how codes leak
            # to an attacker's page, and it is how a production broker refuses a localhost
            # callback.
            where = f"providers.{profile.name}.redirect_uris"
            if profile.redirect_uris:
                problem = (
                    f"is not one of the redirect URIs registered for {profile.name!r} on this "
                    f"broker (environment {self.cipher.environment!r}, see {where})"
                )
            else:
                problem = (
                    f"no redirect URI is registered for {profile.name!r} on this broker "
                    f"(environment {self.cipher.environment!r}); configure {where}"
                )
            raise InvalidArgument("redirect_uri", problem)

        state = secrets.token_urlsafe(32)
        key = state_hash(state)
        verifier = new_code_verifier() if profile.pkce else None
        # Empty scopes ask for the profile's defaults; the flow remembers what was asked for,
        # which is what the integration is granted if the token response does not say.
        url = authorization_url(
            profile,
            redirect_uri=redirect_uri,
            state=state,
            scopes=requested or None,
            code_verifier=verifier,
        )
        now = self.clock()
        expires_at = now + self.flow_ttl
        values: dict[str, Any] = {
            "state_hash": key,
            "user_id": user_id,
            "provider": profile.name,
            "account_id": account_id,
            "redirect_uri": redirect_uri,
            "scopes": list(requested or profile.scopes),
            "metadata": metadata,
            "verifier_ct": None,
            "key_id": None,
            "created_at": now,
            "expires_at": expires_at,
            "version": 1,
        }
        if verifier is not None:
            owner = _flow_owner(key, user_id, profile.name, account_id)
            values["verifier_ct"] = self.cipher.encrypt(owner, VERIFIER_COLUMN, verifier)
            values["key_id"] = self.cipher.keyring.primary_id
        call = context.current_call.get()
        caller = values["caller"] = call.caller.name if call is not None else ""
        async with storage_errors(), self.engine.begin() as conn:
            await flows.lock_caller(conn, caller)
            # Inserted first, then counted with it: on SQLite the insert takes the write lock,
            # so no other flow can slip in between the count and the commit.
            await flows.insert_flow(conn, values)
            if await flows.pending(conn, caller, now) > limits.max_pending_flows_per_caller:
                metrics.FLOWS_REFUSED.labels("pending_per_caller").inc()
                raise FlowLimit(
                    f"caller {caller!r} has {limits.max_pending_flows_per_caller} authorization "
                    "flows neither completed nor expired (the limit); complete some, or wait "
                    f"for them to expire ({int(self.flow_ttl.total_seconds())} s after they "
                    "began)",
                    setting="authorization.max_pending_flows_per_caller",
                    limit=limits.max_pending_flows_per_caller,
                )
            await context.audit_in(conn)
        log.debug("authorization flow started for provider %s", profile.name)
        return BeginResult(authorization_url=url, state=state, expires_at=expires_at)

    # -- complete --------------------------------------------------------------------------

    async def complete(
        self, state: str, code: str, error: str, error_description: str, user_id: str
    ) -> tuple[Integration, bool]:
        """``user_id``: the user of the session that received the callback (required)."""
        validation.text("state", state, MAX_STATE)
        validation.text("user_id", user_id, validation.MAX_ID)
        validation.text("code", code, MAX_CODE, required=False)
        if not code and not error:
            raise InvalidArgument(
                "code", "give the code from the provider's callback, or its error"
            )
        if code and error:
            raise InvalidArgument("code", "give either code or error (from the callback), not both")

        # The caller's policy comes before anything reaches the provider: a caller outside
        # this user (or, below, the flow's provider) must not get a code exchanged for it.
        context.note_owner(user_id)
        context.check_owner(user_id)
        flow = await self._consume(state_hash(state))
        context.note_owner(flow.user_id, flow.provider)
        if flow.user_id != user_id:
            # Someone began a flow for themselves and got another user's browser to land on
            # the callback: refuse before the code is exchanged (the flow stays consumed, so
            # the link cannot be replayed). The interceptor audits the refusal.
            call = context.current_call.get()
            if call is not None:
                call.detail = "callback user is not the user who began the flow"
            log.warning("authorization for provider %s refused: user mismatch", flow.provider)
            raise AuthorizationUserMismatch(
                "this authorization flow was begun by another user than the one whose session "
                "received the callback; nothing was stored, start a new flow",
                provider=flow.provider,
            )
        context.check_owner(flow.user_id, flow.provider)
        if error:
            # The user (or the provider) refused; the flow is closed either way, so a retry
            # has to start over with BeginAuthorization.
            provider_error, detail = _provider_error(error, error_description)
            raise AuthorizationFlowInvalid(
                f"{flow.provider} did not authorize the broker: {provider_error}{detail}; "
                "start a new flow with BeginAuthorization",
                provider=flow.provider,
                provider_error=provider_error,
            )

        profile = self.registry.resolve(flow.provider, flow.metadata)
        verifier = (
            None
            if flow.verifier_ct is None
            else self.cipher.decrypt(
                _flow_owner(flow.state_hash, flow.user_id, flow.provider, flow.account_id),
                VERIFIER_COLUMN,
                flow.verifier_ct,
            )
        )
        try:
            response = await self.client.exchange_code(profile, code, flow.redirect_uri, verifier)
        except GrantRejected as exc:
            # An unknown, used or expired code, or a verifier that does not match the challenge
            # (a code injected from another flow): the flow is spent, nothing to reauthorize.
            raise AuthorizationFlowInvalid(
                f"{exc.message}; the authorization code was not accepted, start a new flow "
                "with BeginAuthorization",
                **exc.metadata,
            ) from None
        # ProviderMisconfigured and ProviderUnavailable propagate as they are. The flow stays
        # consumed: the provider may have redeemed the code before the answer was lost, and
        # a second exchange of a code makes providers revoke what it issued (RFC 6749 §4.1.2).

        integration, created = await self._store(flow, profile.default_expires_in_seconds, response)
        log.info(
            "authorization completed: provider %s, integration %s (%s)",
            flow.provider,
            integration.id,
            "created" if created else "updated",
        )
        return integration, created

    async def _consume(self, key: str) -> flows.StoredFlow:
        now = self.clock()
        async with storage_errors(), self.engine.begin() as conn:
            # The conditional UPDATE comes first: it takes the row (or, on SQLite, the
            # database) write lock, so the read below cannot race another completion.
            if await flows.consume(conn, key, now):
                flow = await flows.get(conn, key)
                assert flow is not None
                await flows.strip(conn, key)
                return flow
            found = await flows.get(conn, key)
        if found is None:
            problem = "is unknown to this broker (never issued here, or purged)"
        elif found.consumed_at is not None:
            problem = "was already used; a state is good for one completion"
        else:
            problem = f"expired at {found.expires_at.isoformat(timespec='seconds')}"
        raise AuthorizationFlowInvalid(
            f"this authorization flow {problem}; start a new flow with BeginAuthorization"
        )

    async def _store(
        self, flow: flows.StoredFlow, profile_default: int | None, response: TokenResponse
    ) -> tuple[Integration, bool]:
        default = self.default_expires_in_seconds if profile_default is None else profile_default
        command = StoreCommand(
            user_id=flow.user_id,
            provider=flow.provider,
            # The provider's own account id (Slack's team) wins over what the caller guessed.
            account_id=response.account_id or flow.account_id or "",
            tokens=NewTokens(
                access_token=response.access_token,
                refresh_token=response.refresh_token,
                token_type=response.token_type,
                expires_at=response.expires_at(default),
                scopes=response.scopes if response.scopes is not None else flow.scopes,
                refresh_token_expires_at=(
                    response.refresh_token_expires_at() if response.refresh_token else None
                ),
            ),
            # What the provider's answer adds (Salesforce's instance_url) wins over the
            # caller's guess, as the account id does.
            metadata={**flow.metadata, **response.metadata},
        )
        for delay in (*_STORE_RETRY_DELAYS, None):
            try:
                return await self.integrations.store(command)
            except StorageUnavailable:
                if delay is None:
                    log.error(
                        "authorization for provider %s: tokens issued but the database is "
                        "unreachable; the user has to authorize again",
                        flow.provider,
                    )
                    raise
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- purge -----------------------------------------------------------------------------

    async def purge_expired(self) -> int:
        """Delete flows that expired or were completed more than PURGE_GRACE ago, and drop
        the payload of those that expired since; returns how many were deleted."""
        now = self.clock()
        cutoff = now - PURGE_GRACE
        async with storage_errors(), self.engine.begin() as conn:
            # Without this, a caller at its pending limit could still keep a grace period's
            # worth of full-size expired flows in the database.
            await flows.strip_expired(conn, now)
            return await flows.purge(conn, cutoff, cutoff)

    async def run_purger(self, interval_seconds: float = 60.0) -> None:
        """Purge old flows every ``interval_seconds`` until cancelled (a background task)."""
        await periodic.every(
            interval_seconds, self.purge_expired, "authorization flow purge", "%d purged"
        )
