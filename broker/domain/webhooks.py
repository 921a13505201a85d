"""Webhooks: every matching integration event POSTed as JSON, signed per the Standard
Webhooks specification (the ``standardwebhooks`` package: ``webhook-id``, ``webhook-timestamp``,
``webhook-signature`` = HMAC-SHA256), retried from the database.

One background loop per endpoint. Each pass takes (or extends) the endpoint's lease, so one
broker of all replicas delivers to it at a time; queues the events committed since the
endpoint's cursor that match its filters; then sends the oldest undelivered one when it is
due. Later events wait for it, so an endpoint sees its events in order. A failure (non-2xx,
timeout, connection error) schedules the next attempt with exponential backoff and jitter;
after ``retry_for_seconds`` the delivery is FAILED and the next event goes. The state is in the
database, so a restarted broker resumes where the last one stopped. A delivery interrupted
mid-request (a crash, a stalled replica whose lease lapsed) may be sent again: ``webhook-id``
stays the same across attempts so a receiver can drop the duplicate.

The loops run beside the RPCs on their own HTTP client: a slow or dead endpoint delays only
its own queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine
from standardwebhooks.webhooks import Webhook

from broker import egress, metrics
from broker.config import WebhookSettings
from broker.domain.events import WAKEUP, Event, EventType, from_row
from broker.errors import ConfigError, StorageUnavailable
from broker.storage import events as event_store
from broker.storage import webhooks as store
from broker.storage.engine import storage_errors
from broker.storage.repository import utc

log = logging.getLogger("broker.webhooks")

Clock = Any


@dataclass(frozen=True)
class Endpoint:
    name: str
    settings: WebhookSettings
    signer: Webhook = field(repr=False)
    types: frozenset[str] | None
    providers: frozenset[str] | None

    @property
    def lease(self) -> timedelta:
        # Outlives one request; renewed before every send.
        return timedelta(seconds=self.settings.timeout_seconds * 2 + 5)

    def matches(self, event: Event) -> bool:
        return (self.types is None or event.type.value in self.types) and (
            self.providers is None or event.provider in self.providers
        )

    def backoff(self, attempts: int) -> timedelta:
        base = min(
            self.settings.retry_max_seconds,
            self.settings.retry_first_seconds * 2 ** min(attempts - 1, 30),
        )
        return timedelta(seconds=base * random.uniform(0.75, 1.25))


def build_endpoints(
    webhooks: Mapping[str, WebhookSettings],
    env: Mapping[str, str],
    aliases: Mapping[str, str] | None = None,
) -> list[Endpoint]:
    """Endpoints from the configuration; ConfigError names a missing or invalid secret (never
    showing it) or an unknown event type."""
    aliases = aliases or {}
    built = []
    for name, settings in sorted(webhooks.items()):
        secret = env.get(settings.secret_env)
        if not secret:
            raise ConfigError(
                f"webhooks.{name}.secret_env: environment variable {settings.secret_env} is "
                "not set (a Standard Webhooks secret: whsec_ followed by base64)"
            )
        try:
            signer = Webhook(secret)
        except Exception:
            raise ConfigError(
                f"webhooks.{name}.secret_env: {settings.secret_env} is not a Standard Webhooks "
                "secret (whsec_ followed by base64)"
            ) from None
        types = None
        if settings.types is not None:
            known = {t.value for t in EventType}
            unknown = sorted(set(settings.types) - known)
            if unknown:
                raise ConfigError(
                    f"webhooks.{name}.types: unknown event type(s) {unknown}; known: "
                    f"{sorted(known)}"
                )
            types = frozenset(settings.types)
        providers = (
            None
            if settings.providers is None
            else frozenset(aliases.get(p, p) for p in settings.providers)
        )
        built.append(Endpoint(name, settings, signer, types, providers))
    return built


def payload(event: Event) -> bytes:
    """The Standard Webhooks body shape: type, timestamp, data."""
    body = {
        "type": f"integration.{event.type.value.lower()}",
        "timestamp": event.occurred_at.isoformat(),
        "data": event.as_json(),
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def message_id(event: Event) -> str:
    """Stable across attempts and replicas, so receivers can drop duplicates."""
    return f"evt_{event.id}"


class WebhookDispatcher:
    def __init__(
        self,
        engine: AsyncEngine,
        endpoints: list[Endpoint],
        clock: Clock,
        owner: str,
        poll_seconds: float,
    ) -> None:
        self.engine = engine
        self.endpoints = endpoints
        self.clock = clock
        self.owner = owner
        self.poll_seconds = poll_seconds
        # Its own connection pool: a slow endpoint cannot starve provider calls.
        self.http = httpx.AsyncClient(follow_redirects=False)

    async def prepare(self) -> None:
        """Create missing endpoint rows, starting at the newest event."""
        async with storage_errors(), self.engine.begin() as conn:
            newest = await event_store.last_id(conn)
            for endpoint in self.endpoints:
                await store.ensure_endpoint(conn, endpoint.name, newest)

    async def run(self) -> None:
        await asyncio.gather(*(self._loop(e) for e in self.endpoints))

    async def _loop(self, endpoint: Endpoint) -> None:
        while True:
            wait = self.poll_seconds
            try:
                wait = await self.pass_once(endpoint)
            except StorageUnavailable:
                log.warning("webhook %s: database unavailable", endpoint.name)
            except Exception:
                log.exception("webhook %s: dispatch failed", endpoint.name)
            if wait > 0:
                await WAKEUP.wait(min(wait, self.poll_seconds))

    async def pass_once(self, endpoint: Endpoint) -> float:
        """Queue new events, send the head if due; returns seconds to wait (0: go on)."""
        now = self.clock()
        async with storage_errors(), self.engine.begin() as conn:
            if not await store.take_lease(
                conn, endpoint.name, self.owner, now, now + endpoint.lease
            ):
                return self.poll_seconds
            cursor = await store.cursor(conn, endpoint.name)
            rows = await event_store.page(conn, cursor, 500)
            if rows:
                found = [from_row(r) for r in rows]
                await store.enqueue(
                    conn,
                    endpoint.name,
                    [e.id for e in found if endpoint.matches(e)],
                    found[-1].id,
                    now,
                )
            head = await store.head(conn, endpoint.name)
            row = None if head is None else await event_store.get(conn, int(head.event_id))
        if head is None:
            return 0 if len(rows) == 500 else self.poll_seconds
        due: datetime | None = utc(head.next_attempt_at)
        assert due is not None
        if due > now:
            return float((due - now).total_seconds())
        if row is None:
            await self._mark(
                endpoint,
                int(head.event_id),
                {"state": store.FAILED, "last_error": "event purged before delivery"},
            )
            return 0
        await self._attempt(endpoint, from_row(row), int(head.attempts), head.created_at)
        return 0

    async def _attempt(
        self, endpoint: Endpoint, event: Event, attempts: int, queued_at: datetime
    ) -> None:
        status, error = await self.send(endpoint, event)
        now = self.clock()
        attempts += 1
        values: dict[str, Any] = {
            "attempts": attempts,
            "last_attempt_at": now,
            "last_status": status,
            "last_error": error,
        }
        if error is None:
            values.update(state=store.DELIVERED, delivered_at=now)
            metrics.WEBHOOK_DELIVERIES.labels(endpoint.name, "delivered").inc()
            metrics.WEBHOOK_LAG.labels(endpoint.name).observe(
                max(0.0, (now - event.occurred_at).total_seconds())
            )
        else:
            queued = utc(queued_at) or now
            give_up = now - queued >= timedelta(seconds=endpoint.settings.retry_for_seconds)
            if give_up:
                values["state"] = store.FAILED
                metrics.WEBHOOK_DELIVERIES.labels(endpoint.name, "failed").inc()
                log.error(
                    "webhook %s: event %d FAILED after %d attempts (%s); "
                    "`broker webhooks retry %s` sends it again",
                    endpoint.name,
                    event.id,
                    attempts,
                    error,
                    endpoint.name,
                )
            else:
                values["next_attempt_at"] = now + endpoint.backoff(attempts)
                metrics.WEBHOOK_DELIVERIES.labels(endpoint.name, "retry").inc()
                log.warning(
                    "webhook %s: event %d attempt %d failed (%s); retrying",
                    endpoint.name,
                    event.id,
                    attempts,
                    error,
                )
        await self._mark(endpoint, event.id, values)

    async def _mark(self, endpoint: Endpoint, event_id: int, values: dict[str, Any]) -> None:
        async with storage_errors(), self.engine.begin() as conn:
            await store.mark(conn, endpoint.name, event_id, values)

    async def send(self, endpoint: Endpoint, event: Event) -> tuple[int | None, str | None]:
        """One signed POST: (HTTP status, None) on 2xx, else (status or None, what failed)."""
        body = payload(event)
        msg_id = message_id(event)
        sent_at = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "user-agent": "credential-broker-webhooks",
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": endpoint.signer.sign(msg_id, sent_at, body.decode()),
        }
        try:
            response = await egress.send(
                self.http,
                "POST",
                endpoint.settings.url,
                content=body,
                headers=headers,
                timeouts=endpoint.settings.timeout_seconds,
            )
        except egress.Refused as exc:
            return None, f"url {exc}"
        except httpx.HTTPError as exc:
            return None, type(exc).__name__
        if 200 <= response.status_code < 300:
            return response.status_code, None
        return response.status_code, f"HTTP {response.status_code}"

    async def release(self) -> None:
        """Give the leases back at shutdown so another replica takes over at once."""
        async with storage_errors(), self.engine.begin() as conn:
            for endpoint in self.endpoints:
                await store.release_lease(conn, endpoint.name, self.owner)

    async def close(self) -> None:
        await self.http.aclose()
