"""Everything a broker process needs besides the gRPC server: keyring, engine, HTTP client,
providers, refresh engine and domain services. Built by ``open_runtime`` at start-up (never at
import) and shared by the server and the operator CLI."""

from __future__ import annotations

import os
from collections.abc import Callable, Container
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import anyio.lowlevel
import httpx
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.config import Settings
from broker.crypto import Keyring, load_keyring
from broker.domain.audit import Auditor
from broker.domain.authorization import AuthorizationService
from broker.domain.cache import IntegrationCache
from broker.domain.events import EventLog
from broker.domain.grants import GrantCache, GrantService
from broker.domain.integrations import IntegrationService
from broker.domain.proxy import ProxyService
from broker.domain.refresh import RefreshEngine
from broker.domain.refresh_store import no_session
from broker.domain.revocation import ProviderRevoker
from broker.domain.tokens import TokenCipher
from broker.domain.usage import UsageNotes
from broker.model import Clock, utcnow
from broker.providers.catalog import ALIASES, BUILTINS, ProviderRegistry, build_registry
from broker.providers.client import OAuthClient
from broker.storage import audit_log
from broker.storage.changes import ChangeWatcher
from broker.storage.engine import CHANNEL, GRANT_CHANNEL, asyncpg_dsn, create_engine, probe
from broker.storage.liveness import SessionLock
from broker.storage.reader import IntegrationReader, open_reader
from broker.storage.schema import verify
from broker.storage.sqlite_reader import SqliteReader, reader_for


def known_providers(registry: ProviderRegistry) -> Container[str]:
    """Names StoreIntegration accepts: configured providers and the built-in catalog (a built-in
    without a client can store tokens; refreshing them needs the client configured)."""
    return set(BUILTINS) | set(ALIASES) | set(registry.names())


@dataclass
class Runtime:
    settings: Settings
    keyring: Keyring
    engine: AsyncEngine
    http: httpx.AsyncClient
    registry: ProviderRegistry
    cipher: TokenCipher
    refresher: RefreshEngine
    revoker: ProviderRevoker
    service: IntegrationService
    authorization: AuthorizationService
    auditor: Auditor
    cache: IntegrationCache
    clock: Clock
    grants: GrantService
    events: EventLog
    proxy: ProxyService
    watcher: ChangeWatcher | None = None
    # PostgreSQL: GetAccessToken's read of a cache miss, on its own small pool.
    reader: IntegrationReader | None = None
    # A SQLite file: the same read with sqlite3, on the event loop when no lock is in the way.
    sqlite_reader: SqliteReader | None = None
    # PostgreSQL: this process's session lock, named on every refresh lease it takes; the
    # server holds it (SessionLock.run) for as long as it serves.
    session_lock: SessionLock | None = None

    def gauges(self) -> list[tuple[str, str, float]]:
        """Point-in-time values for the metrics endpoint (no labels, nothing secret)."""
        cache = self.cache
        looked_up = cache.hits + cache.misses
        pool: Any = self.engine.pool
        values = [
            ("broker_cache_entries", "Integrations held in the hot-path cache", float(len(cache))),
            ("broker_cache_hits", "Hot-path cache hits since start", float(cache.hits)),
            ("broker_cache_misses", "Hot-path cache misses since start", float(cache.misses)),
            (
                "broker_cache_hit_ratio",
                "Hits over lookups since start",
                cache.hits / looked_up if looked_up else 0.0,
            ),
            ("broker_cache_available", "1 while invalidations can be heard", float(cache.active)),
        ]
        if hasattr(pool, "checkedout"):
            values.append(
                ("broker_db_pool_checked_out", "Connections in use", float(pool.checkedout()))
            )
            values.append(("broker_db_pool_size", "Pool size", float(pool.size())))
        if self.reader is not None:
            size, idle = self.reader.connections()
            values.append(
                ("broker_db_read_pool_size", "GetAccessToken read connections open", size)
            )
            values.append(
                ("broker_db_read_pool_checked_out", "GetAccessToken reads in flight", size - idle)
            )
        return values

    async def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        await self.http.aclose()
        await self.auditor.close(self.settings.database.timeout_seconds)
        if self.reader is not None:
            await self.reader.close()
        if self.sqlite_reader is not None:
            await self.sqlite_reader.close()
        await self.engine.dispose()


async def open_runtime(
    settings: Settings,
    *,
    clock: Clock = utcnow,
    check_database: bool = True,
    callers: Callable[[], Container[str]] | None = None,
) -> Runtime:
    """Build the runtime; with ``check_database`` refuse an unknown schema, another
    environment's database or rows under keys this keyring lacks (ConfigError). ``callers``:
    the names of the callers in force (the server's), against which grant audiences are
    checked."""
    keyring = load_keyring(settings.keys)
    registry = build_registry(settings.providers, os.environ)
    engine = create_engine(settings.database)
    if check_database:
        try:
            await probe(engine, settings.database.timeout_seconds)
            await verify(engine, settings.server.environment, keyring.ids)
        except BaseException:
            await engine.dispose()
            raise
    # One HTTP client (one connection pool) for every provider call this process makes.
    http = httpx.AsyncClient(
        timeout=settings.refresh.provider_timeout_seconds,
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        follow_redirects=False,
    )
    # httpx reaches the network through anyio, which imports its asyncio backend on first use:
    # ~0.1 s with the event loop held. Done here, not in the first provider request, where it
    # would stall every call in flight (a refresh storm right after a start).
    await anyio.lowlevel.checkpoint()
    cipher = TokenCipher(
        keyring,
        settings.server.environment,
        require_owner_binding=settings.keys.require_owner_binding,
    )
    client = OAuthClient(
        http,
        settings.refresh.provider_timeout_seconds,
        connect_timeout=settings.refresh.provider_connect_timeout_seconds,
        clock=clock,
    )
    # SQLite means one process: its own writes are all there is to hear about. On PostgreSQL
    # the cache stays bypassed until the invalidation listener is connected.
    cache = IntegrationCache(
        settings.cache.max_entries,
        enabled=settings.cache.enabled,
        available=settings.database.is_sqlite,
    )
    reader = None
    session_lock = None
    if not settings.database.is_sqlite:
        reader = await open_reader(asyncpg_dsn(engine.url), settings.database)
        # Held once the server runs it (broker.server.app); until then leases are bounded by
        # their time alone, as the operator CLI's always are.
        session_lock = SessionLock(settings.database.url.get_secret_value())
    sqlite_reader = reader_for(engine, settings.database.timeout_seconds)
    refresher = RefreshEngine(
        engine,
        cipher,
        registry,
        client,
        settings.refresh,
        clock,
        invalidate=cache.invalidate,
        session=no_session if session_lock is None else session_lock.session,
        failure_threshold=settings.events.refresh_failure_threshold,
    )
    revoker = ProviderRevoker(
        engine,
        cipher,
        registry,
        client,
        clock,
        owner=refresher.owner,
        lease=refresher.lease,
        invalidate=cache.invalidate,
    )
    service = IntegrationService(
        engine=engine,
        cipher=cipher,
        providers=known_providers(registry),
        clock=clock,
        refresher=refresher,
        revoker=revoker,
        aliases=ALIASES,
        profiles=registry,
        cache=cache,
        reader=sqlite_reader if sqlite_reader is not None else reader,
        usage=UsageNotes(engine, clock, settings.refresh.last_used_flush_seconds),
    )
    grant_cache = GrantCache(
        settings.cache.max_entries,
        enabled=settings.cache.enabled,
        available=settings.database.is_sqlite,
    )
    grants = GrantService(engine, service, grant_cache, clock, callers=callers)
    watcher = _change_watcher(settings, cache, grant_cache)
    authorization = AuthorizationService(
        engine,
        cipher,
        registry,
        client,
        service,
        clock,
        default_expires_in_seconds=settings.refresh.default_expires_in_seconds,
        limits=settings.authorization,
    )
    return Runtime(
        settings=settings,
        keyring=keyring,
        engine=engine,
        http=http,
        registry=registry,
        cipher=cipher,
        refresher=refresher,
        revoker=revoker,
        service=service,
        authorization=authorization,
        auditor=Auditor(
            engine,
            clock,
            group_commit=settings.audit.group_commit,
            max_batch=settings.audit.max_batch,
            max_delay=settings.audit.max_delay_ms / 1000,
            siblings=settings.audit.siblings,
            busy_cpu=settings.audit.busy_cpu,
            sink=audit_log.sink_for(
                engine, settings.database.timeout_seconds, settings.audit.durability
            ),
        ),
        cache=cache,
        clock=clock,
        grants=grants,
        watcher=watcher,
        reader=reader,
        sqlite_reader=sqlite_reader,
        proxy=ProxyService(service, registry, BUILTINS, http, refresher.throttle, settings.proxy),
        session_lock=session_lock,
        events=EventLog(
            engine,
            clock,
            retention=timedelta(days=settings.events.retention_days),
            poll_seconds=settings.events.poll_seconds,
            heartbeat_seconds=settings.events.heartbeat_seconds,
            max_streams_per_caller=settings.events.max_streams_per_caller,
            max_streams=settings.events.max_streams,
            stream_buffer_events=settings.events.stream_buffer_events,
        ),
    )


def _change_watcher(
    settings: Settings, cache: IntegrationCache, grant_cache: GrantCache
) -> ChangeWatcher | None:
    """SQLite: hear the writes of other processes on the same file (the CLI) before each
    cache lookup; PostgreSQL has its NOTIFY listener instead."""
    database = make_url(settings.database.url.get_secret_value()).database
    if not settings.database.is_sqlite or not database or database == ":memory:":
        return None

    def flush() -> None:
        cache.flush()
        grant_cache.flush()

    watcher = ChangeWatcher(
        database, {CHANNEL: cache.invalidate, GRANT_CHANNEL: grant_cache.invalidate}, flush
    )
    cache.before_read = grant_cache.before_read = watcher.poll
    return watcher
