"""Start-up and shutdown: everything (engine, HTTP client, server) is created here, never at
import. Graceful shutdown: health goes NOT_SERVING, no new background work is claimed, in-flight
calls get the grace period while every provider call already sent runs to its end and is stored
(bounded by the provider timeout), then connections and engines close."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Container
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from broker import metrics
from broker.api.credentialbroker.v1 import broker_pb2, broker_pb2_grpc
from broker.config import Settings
from broker.domain.events import WAKEUP
from broker.domain.integrations import IntegrationService
from broker.domain.key_usage import flush_periodically
from broker.domain.refresh import RefreshEngine
from broker.domain.rotation import report_row_bound
from broker.domain.webhooks import WebhookDispatcher, build_endpoints
from broker.errors import ConfigError
from broker.model import Clock, utcnow
from broker.providers.catalog import ALIASES
from broker.runtime import Runtime, open_runtime
from broker.server import transport
from broker.server.callers import CallerRegistry
from broker.server.http_front import HttpFront
from broker.server.interceptors import AuthInterceptor
from broker.server.servicer import CredentialBrokerServicer
from broker.storage import repository
from broker.storage.engine import write_transaction
from broker.storage.liveness import SessionLock
from broker.storage.notify import InvalidationListener

log = logging.getLogger("broker.server")
T = TypeVar("T")

SERVICE_NAME = broker_pb2.DESCRIPTOR.services_by_name["CredentialBroker"].full_name


@dataclass
class Broker:
    settings: Settings
    server: grpc.aio.Server
    health: HealthServicer
    runtime: Runtime
    port: int
    interceptor: AuthInterceptor
    listener: InvalidationListener | None = None
    webhooks: WebhookDispatcher | None = None
    stop_metrics: Callable[[], None] | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # Passes that call providers: told to stop and awaited, never cancelled mid-call.
    provider_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stop_passes: asyncio.Event = field(default_factory=asyncio.Event)
    # Cancelled last: it proves to other replicas that our leases are alive.
    session_lock: SessionLock | None = None
    session_task: asyncio.Task[None] | None = None
    # The HTTP front of Proxy (proxy.listen), and the port it got.
    http_front: HttpFront | None = None
    proxy_port: int | None = None

    @property
    def engine(self) -> AsyncEngine:
        return self.runtime.engine

    @property
    def service(self) -> IntegrationService:
        return self.runtime.service

    @property
    def refresher(self) -> RefreshEngine:
        return self.runtime.refresher

    async def stop(self, grace: float | None = None) -> None:
        grace = self.settings.server.shutdown_grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self.stop_metrics is not None:
            # Its shutdown blocks until the HTTP thread notices: keep the event loop free.
            await _bounded("metrics endpoint", asyncio.to_thread(self.stop_metrics), 5)
            self.stop_metrics = None
        self.stop_passes.set()
        self.refresher.stop_claiming()
        # Callers still waiting on a provider when the grace ends would be CANCELLED with the
        # server: answer them UNAVAILABLE a little before, while their refreshes go on.
        loop = asyncio.get_running_loop()
        self.refresher.answer_callers_by(loop.time() + max(0.0, grace - min(1.0, grace / 5)))
        self.runtime.revoker.stop_claiming()
        # Open event streams end now, with status OK, rather than at the end of the grace.
        self.runtime.events.close()
        if self.http_front is not None:
            await self.http_front.stop()
        await asyncio.gather(self.server.stop(grace), self._drain())
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            _, pending = await asyncio.wait(self.tasks, timeout=10)
            for task in pending:
                # Shutdown must finish; say which background task would not.
                log.error("shutdown: background task %s did not stop", task.get_name())
        if self.webhooks is not None:
            with contextlib.suppress(Exception):
                await _bounded("releasing webhook leases", self.webhooks.release(), 5)
            await self.webhooks.close()
        # Tokens a provider issued that the database has not taken yet: one last try.
        unsaved = await _bounded(
            "last store of refreshed tokens", self.refresher.flush_unsaved(), 10
        )
        if unsaved:
            log.error("shutting down with refreshed tokens that could not be stored")
        usage = self.runtime.service.usage
        if usage is not None:
            # Last-use times noted since the last write (a failure only loses their precision).
            with contextlib.suppress(Exception):
                await _bounded("last-use write", usage.flush(), 5)
        if self.session_task is not None:
            self.session_task.cancel()
            await asyncio.wait([self.session_task], timeout=5)
        await _bounded("closing the database engine and HTTP client", self.runtime.close(), 10)

    async def _drain(self) -> None:
        """Let provider calls already sent finish and be stored: the background passes end
        their current step (claimed work not started is given back), then every flight left
        (callers' included) gets the provider timeout plus the store retries."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        settings = self.settings.refresh
        bound = settings.provider_timeout_seconds + 15
        in_flight = self.refresher.in_flight
        if self.provider_tasks:
            _, pending = await asyncio.wait(self.provider_tasks, timeout=bound)
            for task in pending:
                log.error("shutdown: %s still running after %.0f s", task.get_name(), bound)
                task.cancel()
        waited, left = await self.refresher.drain(max(1.0, bound - (loop.time() - began)))
        drained = max(in_flight, waited)
        if drained or left:
            log.info(
                "shutdown: drained %d refresh(es) in flight in %.1f s; %d still running",
                drained - left,
                loop.time() - began,
                left,
            )

    def reload_callers(self, settings: Settings) -> None:
        """SIGHUP: new caller policies take effect for new calls; on error the old stay."""
        registry = CallerRegistry(settings.callers, ALIASES, self.runtime.service.providers)
        if not len(registry):
            raise ConfigError("callers: the new configuration has no caller; keeping the old one")
        self.interceptor.registry = registry
        log.info("caller policies reloaded: %d caller(s)", len(registry))

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


async def start(settings: Settings, *, clock: Clock = utcnow) -> Broker:
    """Build and start a broker; raises ConfigError if it must not serve this configuration."""

    def caller_names() -> Container[str]:
        # The interceptor is built below, before the server takes any call; its registry
        # follows SIGHUP reloads.
        return interceptor.registry.names

    # Audience names are checked against the callers in force.
    runtime = await open_runtime(settings, clock=clock, callers=caller_names)
    try:
        callers = CallerRegistry(settings.callers, ALIASES, runtime.service.providers)
    except ConfigError:
        await runtime.close()
        raise
    if not len(callers):
        await runtime.close()
        raise ConfigError(
            "callers: no caller is configured, so nobody could call this broker; add "
            "[callers.NAME] with token_sha256 (see `broker callers new NAME`)"
        )
    interceptor = AuthInterceptor(
        callers,
        runtime.auditor,
        logging.INFO if settings.logging.access_log_level == "INFO" else logging.DEBUG,
        grants=runtime.grants,
    )
    cap = transport.connection_cap(settings.server)
    server = grpc.aio.server(options=transport.server_options(settings.server, cap))
    # Every service goes through the guard (authentication, policy, audit, access log),
    # wrapped once at registration.
    guarded: Any = interceptor.guarding(server)
    broker_pb2_grpc.add_CredentialBrokerServicer_to_server(
        CredentialBrokerServicer(
            runtime.service, runtime.authorization, runtime.grants, runtime.events, runtime.proxy
        ),
        guarded,
    )
    health_servicer = HealthServicer()
    for name in ("", SERVICE_NAME):
        # open_runtime has just talked to the database; the watcher takes over from here.
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, guarded)
    # What reflection.enable_server_reflection does for an aio server (it tells one by its
    # class, and the registrar is not one).
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer(  # type: ignore[attr-defined]
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        ),
        guarded,
    )
    try:
        port = _listen(server, settings)
    except (RuntimeError, ConfigError) as exc:
        await runtime.close()
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"server.listen: cannot listen on {settings.server.listen}") from None
    try:
        webhooks = await _webhooks(settings, runtime)
    except BaseException:
        await runtime.close()
        raise
    await server.start()
    broker = Broker(settings, server, health_servicer, runtime, port, interceptor)
    if settings.database.is_sqlite:
        # One process owns the file: leases left in it belong to a broker that died.
        async with write_transaction(runtime.engine) as conn:
            stale = await repository.release_all_leases(conn)
        if stale:
            log.warning("took over %d refresh lease(s) left by a previous broker", stale)
    else:
        lock = runtime.session_lock
        assert lock is not None  # built by open_runtime on PostgreSQL
        broker.session_lock = lock
        broker.session_task = asyncio.create_task(lock.run(), name="lease-session")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lock.held.wait(), settings.database.timeout_seconds)
    if settings.proxy.listen:
        try:
            await _start_http_front(broker, settings)
        except ConfigError:
            await broker.stop(0)
            raise
    broker.webhooks = webhooks
    if webhooks is not None:
        broker.tasks.append(asyncio.create_task(webhooks.run(), name="webhooks"))
    broker.tasks.append(
        asyncio.create_task(
            runtime.events.run_purger(settings.events.purge_interval_seconds),
            name="event-retention",
        )
    )
    broker.tasks.append(asyncio.create_task(broker._watch_database(), name="health-watch"))
    if not settings.database.is_sqlite:
        # Also needed with the cache off: it carries the wake-ups of event readers.
        broker.listener = InvalidationListener(
            settings.database.url.get_secret_value(),
            runtime.cache,
            grants=runtime.grants.cache,
            on_event=WAKEUP.notify,
        )
        broker.tasks.append(asyncio.create_task(broker.listener.run(), name="cache-listener"))
    if settings.refresh.background:
        broker.provider_tasks.append(
            asyncio.create_task(
                runtime.refresher.run_background(broker.stop_passes), name="background-refresh"
            )
        )
        broker.provider_tasks.append(
            asyncio.create_task(
                runtime.revoker.run_background(
                    settings.refresh.background_interval_seconds, broker.stop_passes
                ),
                name="revocation-retries",
            )
        )
    broker.tasks.append(
        asyncio.create_task(
            flush_periodically(
                runtime.engine,
                runtime.keyring,
                settings.keys.usage_flush_interval_seconds,
                settings.keys.nonce_warn_fraction,
            ),
            name="key-usage-flush",
        )
    )
    broker.tasks.append(
        # A full scan of the ciphertext columns: off the start-up path.
        asyncio.create_task(
            report_row_bound(runtime.engine, required=settings.keys.require_owner_binding),
            name="owner-binding-report",
        )
    )
    usage = runtime.service.usage
    if usage is not None:
        broker.tasks.append(asyncio.create_task(usage.run_periodically(), name="last-use-write"))
    broker.tasks.append(asyncio.create_task(runtime.authorization.run_purger(), name="flow-purger"))
    broker.tasks.append(asyncio.create_task(runtime.grants.run_purger(), name="grant-purger"))
    if settings.metrics.listen:
        try:
            broker.stop_metrics = metrics.serve(
                _offset_port(settings.metrics.listen, settings.server.worker_index),
                lambda: [*runtime.gauges(), *transport.gauges(port, cap)],
            )
        except OSError as exc:
            await broker.stop(0)
            raise ConfigError(
                f"metrics.listen: cannot listen on {settings.metrics.listen}: {exc.strerror}"
            ) from None
    host = settings.server.listen.rpartition(":")[0]
    log.info(
        "broker serving on %s:%d (environment %r, %d caller(s), key %s)",
        host,
        port,
        settings.server.environment,
        len(callers),
        runtime.keyring.primary_id,
    )
    return broker


async def _start_http_front(broker: Broker, settings: Settings) -> None:
    """``ANY /proxy/{provider}/{path}`` on proxy.listen, plain HTTP: loopback only unless
    server.allow_insecure (caller tokens travel in its headers)."""
    # Workers share the port as they share the gRPC one (SO_REUSEPORT).
    listen = settings.proxy.listen
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host not in LOOPBACK:
        if not settings.server.allow_insecure:
            raise ConfigError(
                f"proxy.listen: {listen} is not a loopback address and the HTTP front has no "
                "TLS; set server.allow_insecure = true to accept plaintext (caller tokens and "
                "provider answers would cross the network in clear)"
            )
        log.warning("HTTP proxy front on %s WITHOUT TLS", listen)
    front = HttpFront(broker.interceptor, broker.runtime.proxy, settings.proxy)
    try:
        broker.proxy_port = await front.start(host, int(port), settings.server.reuse_port)
    except OSError as exc:
        raise ConfigError(f"proxy.listen: cannot listen on {listen}: {exc.strerror}") from None
    broker.http_front = front
    log.info("HTTP proxy front on %s:%d", host, broker.proxy_port)


async def _webhooks(settings: Settings, runtime: Runtime) -> WebhookDispatcher | None:
    if not settings.webhooks:
        return None
    dispatcher = WebhookDispatcher(
        runtime.engine,
        build_endpoints(settings.webhooks, os.environ, ALIASES),
        runtime.clock,
        owner=runtime.refresher.owner,
        poll_seconds=settings.events.poll_seconds,
    )
    try:
        await dispatcher.prepare()
    except BaseException:
        await dispatcher.close()
        raise
    return dispatcher


async def _bounded(what: str, step: Awaitable[T], seconds: float) -> T | None:
    try:
        return await asyncio.wait_for(step, seconds)
    except TimeoutError:
        log.error("shutdown: %s did not finish within %.0f s; going on", what, seconds)
        return None


def _listen(server: grpc.aio.Server, settings: Settings) -> int:
    listen = settings.server.listen
    host = listen.rpartition(":")[0].strip("[]")
    tls = settings.tls
    if tls.enabled:
        assert tls.cert_file is not None
        assert tls.key_file is not None
        try:
            cert = tls.cert_file.read_bytes()
            key = tls.key_file.read_bytes()
            ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
        except OSError as exc:
            raise ConfigError(f"tls: cannot read {exc.filename}: {exc.strerror}") from None
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )
        return server.add_secure_port(listen, credentials)
    if host not in LOOPBACK:
        if not settings.server.allow_insecure:
            raise ConfigError(
                f"server.listen: {listen} is not a loopback address and TLS is off; configure "
                "[tls] cert_file/key_file, or set server.allow_insecure = true to accept "
                "plaintext (bearer tokens and access tokens would cross the network in clear)"
            )
        log.warning("listening on %s WITHOUT TLS: tokens cross the network in clear", listen)
    return server.add_insecure_port(listen)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _offset_port(listen: str, index: int) -> str:
    """Worker N of `serve --workers` serves metrics on the configured port + N."""
    host, _, port = listen.rpartition(":")
    return f"{host}:{int(port) + index}" if index else listen


async def run(
    settings: Settings,
    *,
    on_ready: Callable[[Broker], None] | None = None,
    reload: Callable[[], Settings] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully; SIGHUP reloads callers."""
    broker = await start(settings)
    # Everything built so far (modules, protobuf descriptors, the runtime) lives as long as
    # the process: moved out of the collector's generations, a full collection on a busy
    # broker walks only what serving allocates (shorter pauses, a steadier p99).
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def on_hup() -> None:
        try:
            broker.reload_callers(reload() if reload is not None else settings)
        except ConfigError as exc:
            log.error("SIGHUP: refused the new configuration, keeping the old one: %s", exc)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    if on_ready is not None:
        on_ready(broker)
    await stop.wait()
    log.info("shutting down: health NOT_SERVING, finishing in-flight calls")
    await broker.stop()
    log.info("stopped")
