"""Start-up and shutdown: everything (engine, HTTP client, server) is created here, never at
import. Graceful shutdown: health goes NOT_SERVING, in-flight calls get the grace period, then
connections and engines close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Container
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.api.credentialbroker.v1 import broker_pb2, broker_pb2_grpc
from broker.config import Settings
from broker.crypto import load_keyring
from broker.domain.service import Clock, IntegrationService, TokenCipher, utcnow
from broker.errors import ConfigError
import httpx

from broker.domain.authorization import AuthorizationService
from broker.domain.refresh import RefreshEngine
from broker.providers.catalog import ALIASES, BUILTINS, ProviderRegistry, build_registry
from broker.providers.client import OAuthClient
from broker.server.callers import CallerRegistry
from broker.server.interceptors import AuthInterceptor
from broker.server.servicer import CredentialBrokerServicer
from broker.storage import repository
from broker.storage.engine import create_engine
from broker.storage.schema import verify

log = logging.getLogger("broker.server")

SERVICE_NAME = broker_pb2.DESCRIPTOR.services_by_name["CredentialBroker"].full_name


@dataclass
class Broker:
    settings: Settings
    server: grpc.aio.Server
    engine: AsyncEngine
    health: health.aio.HealthServicer
    service: IntegrationService
    authorization: AuthorizationService
    port: int
    http: httpx.AsyncClient
    refresher: RefreshEngine
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self, grace: float | None = None) -> None:
        grace = self.settings.server.shutdown_grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Tokens a provider issued that the database has not taken yet: one last try.
        if await self.refresher.flush_unsaved():
            log.error("shutting down with refreshed tokens that could not be stored")
        await self.http.aclose()
        await self.engine.dispose()

    async def _watch_database(self) -> None:
        """Health is SERVING only while the database answers."""
        serving: bool | None = None
        while True:
            try:
                async with asyncio.timeout(self.settings.database.timeout_seconds):
                    async with self.engine.connect() as conn:
                        await repository.ping(conn)
                ok = True
            except Exception as exc:
                ok = False
                if serving is not False:
                    log.warning("database unreachable (%s); health NOT_SERVING", type(exc).__name__)
            if ok != serving:
                if ok and serving is False:
                    log.info("database reachable again; health SERVING")
                status = (
                    health_pb2.HealthCheckResponse.SERVING
                    if ok
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                for name in ("", SERVICE_NAME):
                    await self.health.set(name, status)
                serving = ok
            await asyncio.sleep(self.settings.server.health_check_interval_seconds)


def known_providers(registry: ProviderRegistry) -> Container[str]:
    """Names StoreIntegration accepts: configured providers and the built-in catalog (a built-in
    without a client can store tokens; refreshing them needs the client configured)."""
    return set(BUILTINS) | set(ALIASES) | set(registry.names())


async def start(settings: Settings, *, clock: Clock = utcnow) -> Broker:
    """Build and start a broker; raises ConfigError if it must not serve this configuration."""
    keyring = load_keyring(settings.keys)
    callers = CallerRegistry(settings.callers)
    if not len(callers):
        raise ConfigError(
            "callers: no caller is configured, so nobody could call this broker; add "
            "[callers.NAME] with token_sha256 (see `broker callers new NAME`)"
        )
    registry = build_registry(settings.providers, os.environ)
    engine = create_engine(settings.database)
    try:
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
    cipher = TokenCipher(keyring, settings.server.environment)
    refresher = RefreshEngine(
        engine,
        cipher,
        registry,
        OAuthClient(http, settings.refresh.provider_timeout_seconds, clock=clock),
        settings.refresh,
        clock,
    )
    service = IntegrationService(
        engine=engine,
        cipher=cipher,
        providers=known_providers(registry),
        clock=clock,
        refresher=refresher,
        aliases=ALIASES,
    )
    authorization = AuthorizationService(engine, cipher, registry, refresher.client, service, clock)
    limit = settings.server.max_message_bytes
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(callers)],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    broker_pb2_grpc.add_CredentialBrokerServicer_to_server(
        CredentialBrokerServicer(service, authorization), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        port = server.add_insecure_port(settings.server.listen)
    except RuntimeError:
        await engine.dispose()
        raise ConfigError(f"server.listen: cannot listen on {settings.server.listen}") from None
    await server.start()
    broker = Broker(
        settings, server, engine, health_servicer, service, authorization, port, http, refresher
    )
    broker.tasks.append(asyncio.create_task(broker._watch_database(), name="health-watch"))
    if settings.refresh.background:
        broker.tasks.append(
            asyncio.create_task(refresher.run_background(), name="background-refresh")
        )
    host = settings.server.listen.rpartition(":")[0]
    log.info(
        "broker serving on %s:%d (environment %r, %d caller(s), key %s)",
        host,
        port,
        settings.server.environment,
        len(callers),
        keyring.primary_id,
    )
    return broker


async def run(settings: Settings, *, on_ready: Callable[[Broker], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    broker = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready(broker)
    await stop.wait()
    log.info("shutting down: health NOT_SERVING, finishing in-flight calls")
    await broker.stop()
    log.info("stopped")
