"""Integration events: the settings the event tests share, storing integrations that emit
them, and reading them back (paged list, background stream, resuming stream)."""

from __future__ import annotations

import asyncio
from typing import Any

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import Settings
from broker.server.callers import hash_token
from tests.helpers.fakes import FakeAuthServer
from tests.helpers.providers import endpoints
from tests.helpers.settings import ADMIN, make_settings
from tests.helpers.waiting import eventually

EVENTS_CALLBACK = "https://app.example.test/oauth/callback"


def event_settings(database_url: str, fake: FakeAuthServer, **overrides: Any) -> Settings:
    provider = {
        **endpoints(fake),
        "redirect_uris": [EVENTS_CALLBACK],
        "rotates_refresh_tokens": True,
    }
    return make_settings(
        database_url,
        providers={"acme": provider, "other": {**provider}},
        callers={
            "admin": {"token_sha256": hash_token("admin-token-for-tests")},
            "acme-only": {
                "token_sha256": hash_token("acme-only-token"),
                "providers": ["acme"],
                "methods": ["WatchIntegrationEvents", "ListIntegrationEvents"],
            },
            "only-a": {
                "token_sha256": hash_token("only-a-token"),
                "users": ["a"],
                "methods": ["WatchIntegrationEvents", "ListIntegrationEvents"],
            },
            "runner": {
                "token_sha256": hash_token("runner-token-for-tests"),
                "methods": ["GetAccessToken"],
            },
        },
        # Failures follow each other at once: no back-off between them.
        refresh={
            "max_attempts": 1,
            "provider_timeout_seconds": 2,
            "background": False,
            "failure_backoff_seconds": 0.001,
        },
        events={"poll_seconds": 0.2, "heartbeat_seconds": 0.5, "refresh_failure_threshold": 2},
        **overrides,
    )


async def store(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    fake: FakeAuthServer,
    user: str = "user-1",
    provider: str = "acme",
    expires_in: int = 0,
    refresh: bool = True,
) -> str:
    access, refresh_token = fake.issue_grant()
    response = await stub.StoreIntegration(
        pb.StoreIntegrationRequest(
            user_id=user,
            provider=provider,
            access_token=access,
            refresh_token=refresh_token if refresh else "",
            expires_in_seconds=expires_in,
        ),
        metadata=ADMIN,
    )
    return response.integration.id


async def all_events(stub: pb_grpc.CredentialBrokerAsyncStub, **filters: Any) -> list[Any]:
    found: list[Any] = []
    token = ""
    while True:
        page = await stub.ListIntegrationEvents(
            pb.ListIntegrationEventsRequest(page_size=7, page_token=token, **filters),
            metadata=ADMIN,
        )
        found += page.events
        token = page.next_page_token
        if not token:
            return found


class Reader:
    """Reads a stream in the background, keeping events and heartbeats."""

    def __init__(self, stub: pb_grpc.CredentialBrokerAsyncStub, request: Any, md: Any = ADMIN):
        self.call = stub.WatchIntegrationEvents(request, metadata=md)
        self.events: list[Any] = []
        self.heartbeats = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for item in self.call:
            if item.HasField("event"):
                self.events.append(item.event)
            else:
                self.heartbeats += 1

    async def has(self, n: int) -> None:
        async def enough() -> bool:
            if self.task.done():
                self.task.result()
            return len(self.events) >= n

        await eventually(enough, f"{n} events on the stream")

    def stop(self) -> None:
        self.call.cancel()


async def read_resuming(
    stub: pb_grpc.CredentialBrokerAsyncStub, cursor: int, writers: asyncio.Future[Any]
) -> list[Any]:
    """Read a few events at a time, dropping the stream and resuming from the last id seen,
    until a stream opened after the writers were done has gone quiet (a heartbeat).

    Only such a stream proves nothing is left: its first read goes to the database, whereas a
    stream already open learns of another process's commit at the next poll, and may send a
    heartbeat before that poll."""
    seen: list[Any] = []
    while True:
        finished = writers.done()
        call = stub.WatchIntegrationEvents(
            pb.WatchIntegrationEventsRequest(after_event_id=cursor), metadata=ADMIN
        )
        taken, quiet = 0, False
        async for item in call:
            if not item.HasField("event"):
                quiet = True
                break
            seen.append(item.event)
            cursor = item.event.id
            taken += 1
            if taken == 7:
                break
        call.cancel()
        if quiet and finished:
            writers.result()  # a writer that failed fails the test here
            return seen
