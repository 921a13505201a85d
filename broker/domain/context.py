"""Who is calling and what the call touched, for one RPC.

The auth interceptor puts a ``Call`` into a contextvar; the domain checks the caller's policy
and notes which integration the call reached, so the audit event written at the end of the
call names it. Code outside an RPC (the CLI, background tasks) runs with no call: no policy
applies and nothing is noted.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from broker.errors import GrantScope, PermissionDenied
from broker.grant import Grant
from broker.model import Integration


@dataclass(frozen=True, slots=True)
class Caller:
    name: str
    methods: frozenset[str]
    providers: frozenset[str] | None  # None: every provider
    users: frozenset[str] | None = None  # None: every user
    requires_grant: bool = False
    max_grant_ttl: timedelta = timedelta(hours=1)
    # GetGrant, ListGrants and RevokeGrant see grants other callers issued (an operator's
    # caller); otherwise a caller manages only the grants it issued itself.
    manage_all_grants: bool = False
    # Never handed a token (GetAccessToken refused); works through Proxy only.
    proxy_only: bool = False
    # HTTP methods it may send through Proxy; None: every method.
    proxy_methods: frozenset[str] | None = None

    def may_call(self, method: str) -> bool:
        return method in self.methods

    def may_use(self, provider: str) -> bool:
        return self.providers is None or provider in self.providers

    def may_touch(self, user_id: str) -> bool:
        return self.users is None or user_id in self.users

    def may_see(self, integration: Integration) -> bool:
        return self.may_use(integration.provider) and self.may_touch(integration.user_id)


@dataclass(slots=True)
class Call:
    caller: Caller
    method: str
    request_id: str
    integration_id: str | None = None
    user_id: str | None = None
    provider: str | None = None
    detail: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    # The kind of credential the call reached (api_key, authorization_code, ...).
    credential_type: str | None = None
    # Writes a call's success event on a given connection (set by the interceptor when
    # auditing is on); ``audited`` once a mutation has done so inside its transaction.
    journal: Callable[[Call, Any], Awaitable[None]] | None = None
    audited: bool = False
    # The grant presented with this call (x-broker-grant), which narrows what it may read.
    grant: Grant | None = None
    # Audited: the grant the call was made under, or the one it created or revoked.
    grant_id: str | None = None
    run_id: str | None = None

    def note(self, integration: Integration) -> None:
        self.integration_id = integration.id
        self.user_id = integration.user_id
        self.provider = integration.provider
        self.credential_type = integration.credential_type.value

    def note_owner(self, user_id: str, provider: str | None = None) -> None:
        self.user_id = user_id or self.user_id
        self.provider = provider or self.provider


current_call: contextvars.ContextVar[Call | None] = contextvars.ContextVar(
    "current_call", default=None
)


def note_request(integration_id: str, user_id: str, provider: str) -> None:
    """What the caller asked for, recorded before the lookup so a failed one is audited too."""
    call = current_call.get()
    if call is not None:
        call.integration_id = integration_id or call.integration_id
        call.note_owner(user_id, provider or None)


async def audit_in(conn: Any) -> None:
    """Write the current call's audit event in the transaction of ``conn``, the one that
    makes the call's change: the change and its event commit together or not at all, so a
    call that fails (audit store down included) has written nothing. Called by every
    mutation as the last statement of its transaction; a retried transaction writes again."""
    call = current_call.get()
    if call is not None and call.journal is not None:
        await call.journal(call, conn)
        call.audited = True


def note(integration: Integration) -> None:
    call = current_call.get()
    if call is not None:
        call.note(integration)


def note_owner(user_id: str, provider: str | None = None) -> None:
    call = current_call.get()
    if call is not None:
        call.note_owner(user_id, provider)


def note_grant(grant_id: str, run_id: str) -> None:
    call = current_call.get()
    if call is not None:
        call.grant_id = grant_id
        call.run_id = run_id or None


def check_provider(provider: str) -> None:
    """PERMISSION_DENIED when the calling service may not use this provider."""
    call = current_call.get()
    if call is not None and not call.caller.may_use(provider):
        raise PermissionDenied(
            f"caller {call.caller.name!r} may not use provider {provider!r}",
            provider=provider,
        )


def check_owner(user_id: str, provider: str | None = None) -> None:
    """Before a lookup by owner: the caller's providers and users, and the grant's user (and
    providers, when the grant names no integration ids that could still match)."""
    call = current_call.get()
    if call is None:
        return
    if provider:
        check_provider(provider)
    if user_id and not call.caller.may_touch(user_id):
        raise PermissionDenied(f"caller {call.caller.name!r} may not touch user {user_id!r}")
    grant = call.grant
    if grant is None:
        return
    if user_id and user_id != grant.user_id:
        raise GrantScope(f"grant {grant.id} does not cover user {user_id!r}", grant_id=grant.id)
    if provider and not grant.integration_ids and provider not in grant.providers:
        raise GrantScope(
            f"grant {grant.id} does not cover provider {provider!r}", grant_id=grant.id
        )


def may_see(integration: Integration) -> bool:
    """Whether the caller's own policy (providers, users) reaches this integration."""
    call = current_call.get()
    return call is None or call.caller.may_see(integration)


def check_integration(integration: Integration) -> None:
    """After a lookup: the row itself against the caller's policy and the grant."""
    call = current_call.get()
    if call is None:
        return
    check_provider(integration.provider)
    if not call.caller.may_touch(integration.user_id):
        raise PermissionDenied(
            f"caller {call.caller.name!r} may not touch user {integration.user_id!r}"
        )
    grant = call.grant
    if grant is not None and not grant.covers(
        integration.id, integration.user_id, integration.provider
    ):
        raise GrantScope(
            f"grant {grant.id} does not cover integration {integration.id}",
            grant_id=grant.id,
        )


def allowed_providers() -> frozenset[str] | None:
    """The providers the current caller may see; None: all."""
    call = current_call.get()
    return None if call is None else call.caller.providers


def current_grant() -> Grant | None:
    call = current_call.get()
    return None if call is None else call.grant
