"""Settings: a TOML file (``BROKER_CONFIG``) overlaid by ``BROKER_*`` environment variables.

Everything is validated at start-up; a bad value raises ConfigError naming the setting, e.g.
``database.url: must start with sqlite+aiosqlite:// or postgresql+asyncpg://``. Secrets are
``SecretStr`` so they never show up in a repr, a log line or an error.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import tomllib
import types
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from broker import egress
from broker.errors import ConfigError

log = logging.getLogger("broker.config")

METHODS = (
    "StoreIntegration",
    "GetAccessToken",
    "Disconnect",
    "GetIntegration",
    "ListIntegrations",
    "BeginAuthorization",
    "CompleteAuthorization",
    "CreateGrant",
    "RevokeGrant",
    "GetGrant",
    "ListGrants",
    "WatchIntegrationEvents",
    "ListIntegrationEvents",
    "Proxy",
)


def _host_port(value: str, example: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT, e.g. {example}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    listen: str = "127.0.0.1:50051"
    environment: str = "local"
    # Seconds in-flight calls get to finish after SIGTERM before they are cancelled.
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    health_check_interval_seconds: float = Field(default=2.0, gt=0)
    # The largest response (gRPC's send limit); requests have their own limit below.
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)
    # The largest request body. The largest valid request (a StoreIntegration with a
    # credential, every field at its limit) encodes to about 710 KiB; a bigger body is
    # refused by gRPC (RESOURCE_EXHAUSTED) before it is buffered whole.
    max_receive_bytes: int = Field(default=1024 * 1024, ge=64 * 1024, le=64 * 1024 * 1024)
    max_metadata_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)
    # Open client connections at most; more are closed as they are accepted. The soft
    # open-file limit is raised to fit (up to the hard limit), else this is lowered to fit.
    max_connections: int = Field(default=500, ge=1, le=1_000_000)
    # A connection that has not finished its TLS and HTTP/2 handshake by then is closed.
    handshake_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    # A connection with no call in flight for this long is closed (GOAWAY); clients reconnect
    # on their next call.
    max_connection_idle_seconds: float = Field(default=30.0, gt=0, le=86400)
    # HTTP/2 BDP probing grows each stream's receive window to the link's bandwidth-delay
    # product: faster large uploads over long links, but also megabytes a peer can make the
    # broker buffer per stream before any call is authenticated. Off: 64 KiB per stream.
    http2_bdp_probe: bool = False
    # Listening beyond loopback without TLS sends bearer tokens and access tokens in clear.
    allow_insecure: bool = False
    # Set by `broker serve --workers N` for its children: share the port, offset metrics.
    reuse_port: bool = False
    worker_index: int = Field(default=0, ge=0)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return _host_port(value, "127.0.0.1:50051")

    @field_validator("environment")
    @classmethod
    def _environment(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", value):
            raise ValueError("must be 1-63 lowercase letters, digits, '.', '_' or '-'")
        return value


class DatabaseSettings(_Section):
    url: SecretStr = SecretStr("sqlite+aiosqlite:///./.broker/broker.db")
    pool_size: int = Field(default=10, ge=1, le=200)
    # Seconds a query may take before the call fails with STORAGE_UNAVAILABLE.
    timeout_seconds: float = Field(default=5.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if not raw.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_secret_value().startswith("sqlite")


class KeysSettings(_Section):
    # A file with one "kid:base64key" per line; the first line's key encrypts. Mode 0600 only.
    file: Path | None = None
    # "kid:base64key,kid2:base64key" (BROKER_KEYS); wins over the command and the file.
    keys: SecretStr | None = None
    # A command whose standard output is the keyring (a secrets manager's CLI), so keys never
    # touch the disk. Split like a shell would, but run without one; wins over the file.
    # Env: BROKER_KEYS__COMMAND.
    command: str | None = None
    command_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # Environment variables the command gets beyond PATH, HOME, LANG, LC_*, TZ, TMPDIR,
    # USER and LOGNAME: exact names or NAME_PREFIX* patterns (e.g. ["VAULT_ADDR",
    # "VAULT_TOKEN"], ["AWS_*"]). BROKER_* variables are never passed on.
    command_env: list[str] = Field(default_factory=list)
    # Warn when a key has done this fraction of the 2^32 random-nonce encryptions that
    # NIST SP 800-38D allows per AES-GCM key; the default (1/4 = 2^30) leaves time to rotate.
    nonce_warn_fraction: float = Field(default=0.25, gt=0, le=1)
    # How often a serving broker adds its encryption counts to key_usage (and at shutdown).
    usage_flush_interval_seconds: float = Field(default=60.0, gt=0)
    # Refuse (DATA_LOSS CIPHERTEXT_INVALID) ciphertexts written before owner binding: they are
    # bound to their row but not to its user, provider, account or kind. Off by default so an
    # upgrade serves old rows; turn it on once `broker keys status` shows none left.
    require_owner_binding: bool = False

    @field_validator("command_env")
    @classmethod
    def _command_env(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*\*?", name):
                raise ValueError(
                    f"{name!r} must be a variable name, or a name prefix ending in * (AWS_*)"
                )
            if name.upper().startswith("BROKER_"):
                raise ValueError(f"{name!r}: the broker's own settings are never passed on")
        return value


class ProviderSettings(_Section):
    """One OAuth 2.0 provider; for a built-in every key is an optional override."""

    token_url: str | None = None
    # Other token endpoints a client_credentials or service_account credential may name in
    # its token_url (e.g. one per tenant). Default: none, only token_url: a caller never
    # chooses where the broker sends a secret.
    allowed_token_urls: list[str] = Field(default_factory=list)
    authorization_url: str | None = None
    revocation_url: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    # Name of the environment variable holding the client secret (preferred over client_secret).
    client_secret_env: str | None = None
    auth_method: Literal["client_secret_basic", "client_secret_post", "none"] | None = None
    redirect_uris: list[str] | None = None
    scopes: list[str] | None = None
    rotates_refresh_tokens: bool | None = None
    refresh_margin_seconds: float | None = Field(default=None, ge=0)
    # Overrides of refresh.max_concurrent_per_provider and
    # refresh.max_refreshes_per_second_per_provider for this provider.
    max_concurrent_refreshes: int | None = Field(default=None, ge=1, le=1000)
    max_refreshes_per_second: float | None = Field(default=None, gt=0)
    # Lifetime assumed when a token response has no expires_in; 0 means "never expires".
    default_expires_in_seconds: int | None = Field(default=None, ge=0)
    # How long the provider keeps an unused refresh token alive (Google: about six months,
    # Microsoft: 90 days). The background pass refreshes a grant whose refresh token has not
    # been used for half of it, even when nobody asks for its access token (keep-alive).
    # None: the provider's refresh tokens do not lapse from disuse (or it is not known).
    # Built-ins carry the documented value.
    refresh_token_idle_lifetime_seconds: int | None = Field(default=None, ge=2)
    body_encoding: Literal["form", "json"] | None = None
    pkce: bool | None = None
    extra_authorize_params: dict[str, str] | None = None
    extra_headers: dict[str, str] | None = None
    # Dotted path in the token response where the provider's account id is (e.g. "team.id").
    account_id_path: str | None = None
    # Credential kinds StoreIntegration accepts (authorization_code, api_key, basic,
    # client_credentials, service_account, github_app_installation). Without
    # authorization_code the provider needs no client_id.
    kinds: list[str] | None = None
    # REST API base URL (the GitHub App installation-token endpoint lives under it).
    api_url: str | None = None
    # Where Proxy may send this provider's API calls: a request's path is taken relative to
    # it and can never leave it. Built-ins have their documented API base; None: no proxying.
    api_base_url: str | None = None
    # Further API bases of the provider on other hosts, as full URLs; a Proxy request picks
    # one by naming its host (ProxyRequest.api_host). Default: none.
    api_hosts: list[str] = Field(default_factory=list)
    # Named request/response adapters for a provider that departs from RFC 6749, e.g.
    # ["nested_tokens:data", "comma_scopes"] (docs/providers.md lists them). For a built-in
    # this replaces the catalog's list. Default: the catalog's, none for a custom provider.
    adapters: list[str] | None = None
    # Values of the templates in the endpoints ("{subdomain}", "{tenant}", "{shop}"), each one
    # lowercase DNS label. A value set here is used for every integration; one left out comes
    # from each integration's metadata, else from the catalog's default.
    template_values: dict[str, str] | None = None
    # How long a refresh token stays valid from its issue however often it is used (e.g.
    # LinkedIn's 365 days), in seconds; None: unbounded or not known.
    refresh_token_lifetime_seconds: int | None = Field(default=None, ge=1)

    @field_validator("api_base_url")
    @classmethod
    def _api_base(cls, value: str | None) -> str | None:
        if value is not None:
            # A template ("{shop}") is checked as it will be once filled with a DNS label.
            problem = egress.problem(re.sub(r"\{[a-z][a-z0-9_]*\}", "x", value))
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator("api_hosts")
    @classmethod
    def _api_hosts(cls, value: list[str]) -> list[str]:
        for url in value:
            problem = egress.problem(url)
            if problem is not None:
                raise ValueError(f"{url!r}: {problem}")
        return value


# The SAN types a caller's tls_identity can name, and the gRPC auth-context property that
# lists a client certificate's SANs of that type.
TLS_IDENTITY_KINDS = {"dns": "peer_dns", "uri": "peer_uri", "email": "peer_email", "ip": "peer_ip"}


def split_tls_identity(value: str) -> tuple[str, str]:
    """``(kind, name)`` of a tls_identity; ValueError naming the accepted forms."""
    kind, sep, name = value.partition(":")
    if sep and kind in TLS_IDENTITY_KINDS and not name.startswith("//"):
        if not name:
            raise ValueError(f"{kind}: needs a name after it")
        return kind, name.lower() if kind == "dns" else name
    if "://" in value:
        return "uri", value
    if ":" in value or "@" in value or not value:
        raise ValueError(
            "must be dns:NAME, uri:URI, email:ADDRESS or ip:ADDRESS (a bare value is a DNS "
            "name; the subject CN is never used)"
        )
    return "dns", value.lower()


class CallerSettings(_Section):
    token_sha256: str | None = None
    # A client certificate's SAN, when mTLS is on: "dns:runner.internal", "uri:spiffe://…",
    # "email:…" or "ip:…". A bare value is a DNS name (a URI SAN if it has "://"); the
    # subject CN is never an identity.
    tls_identity: str | None = None
    methods: list[str] = Field(default_factory=lambda: list(METHODS))
    # None means every provider.
    providers: list[str] | None = None
    # Exact user ids this caller may touch; None means every user.
    users: list[str] | None = None
    # Workflow runners: no call without a grant (metadata x-broker-grant), and under a grant
    # only the grant's user and integrations.
    requires_grant: bool = False
    # Longest ttl this caller may give a grant it creates (seconds, or e.g. "PT1H").
    max_grant_ttl: timedelta = Field(default=timedelta(hours=1), gt=timedelta(0))
    # GetGrant, ListGrants and RevokeGrant reach grants other callers issued (still only
    # within this caller's users and providers); off: only the grants it issued itself.
    manage_all_grants: bool = False
    # Never hand this caller a token: GetAccessToken is refused (TOKEN_EXPOSURE_DENIED) and
    # it works through Proxy, where the credential stays in the broker.
    proxy_only: bool = False
    # HTTP methods this caller may send through Proxy; None: every method.
    proxy_methods: list[str] | None = None

    @field_validator("proxy_methods")
    @classmethod
    def _proxy_methods(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if any(not re.fullmatch(r"[A-Za-z]{1,16}", m) for m in value):
            raise ValueError('must be HTTP method names, e.g. ["GET", "POST"]')
        return [m.upper() for m in value]

    @field_validator("token_sha256")
    @classmethod
    def _sha(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("must be 64 lowercase hex characters (broker callers hash TOKEN)")
        return value

    @field_validator("tls_identity")
    @classmethod
    def _tls_identity(cls, value: str | None) -> str | None:
        if value is not None:
            split_tls_identity(value)
        return value

    @field_validator("users")
    @classmethod
    def _users(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not user or len(user) > 255 for user in value):
            raise ValueError("user ids must be 1-255 characters")
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(METHODS) - {"*"})
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {list(METHODS)}")
        return list(METHODS) if "*" in value else value


class RefreshSettings(_Section):
    # Refresh when a token has less than this left (or less than the caller's min_valid_for).
    margin_seconds: float = Field(default=300.0, ge=0)
    # Refresh ahead: a caller whose token is due but still has its min_valid_for and at least
    # this long left gets that token at once while the refresh runs in the background; only
    # callers the token cannot satisfy wait for the refresh. At margin_seconds or more, every
    # caller of a due token waits for its refresh.
    ahead_floor_seconds: float = Field(default=30.0, ge=0)
    # How long a provider request that was sent waits for its answer (the read timeout). It
    # runs on even after the caller's deadline: the answer may carry a rotated refresh token.
    provider_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    # Getting a connection (DNS, TCP, TLS), before anything is sent; only this phase is
    # retried at once, since a request that never left cannot have rotated anything.
    provider_connect_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # After a sent refresh got no usable answer (read timeout, connection dropped, 5xx other
    # than 503), the next refresh of that integration waits this long (docs/providers.md,
    # "Refresh safety").
    outcome_unknown_retry_seconds: float = Field(default=30.0, ge=0, le=3600)
    max_attempts: int = Field(default=3, ge=1, le=10)
    background: bool = True
    background_interval_seconds: float = Field(default=30.0, gt=0)
    # Lifetime assumed for a token response without expires_in (0 = never expires).
    default_expires_in_seconds: int = Field(default=3600, ge=0)
    # Per provider (providers.NAME.max_concurrent_refreshes overrides): refresh requests to
    # one provider's token endpoint at once from this broker; the rest queue (a storm of
    # expired tokens becomes a steady stream instead of hundreds of connections).
    max_concurrent_per_provider: int = Field(default=32, ge=1, le=1000)
    # Per provider (providers.NAME.max_refreshes_per_second overrides): refresh requests
    # started per second; 0 = no rate limit (a 429/503 Retry-After pauses a provider anyway).
    max_refreshes_per_second_per_provider: float = Field(default=0.0, ge=0)
    # After a failed refresh of any kind the integration waits before its next attempt (caller
    # or background): this many seconds after the first failure, doubling with each failure in
    # a row, at most `failure_backoff_max_seconds`, lengthened by up to a quarter at random.
    failure_backoff_seconds: float = Field(default=60.0, gt=0, le=3600)
    failure_backoff_max_seconds: float = Field(default=3600.0, gt=0, le=86400)
    # Attempts one background pass makes per provider; due integrations past it wait for the
    # next pass, so one provider's backlog cannot take a whole pass from the others.
    background_attempts_per_provider: int = Field(default=100, ge=1, le=100_000)
    # A refresh token with its own expiry (refresh_token_expires_in) that the provider cannot
    # renew (it does not rotate refresh tokens, or a refresh did not extend it) gets one
    # INTEGRATION_EXPIRING event this long before it lapses; on a rotating provider the
    # background pass first refreshes it, which renews it. Default: 7 days.
    expiring_notice_seconds: float = Field(default=7 * 86400.0, gt=0)
    # GetAccessToken and Proxy note in memory when an integration's access token was served;
    # every this many seconds the notes are written (one UPDATE per batch), so
    # Integration.last_used_at is precise to about this much.
    last_used_flush_seconds: float = Field(default=60.0, gt=0, le=3600)


class ProxySettings(_Section):
    """Proxy: provider API calls made by the broker on a caller's behalf."""

    # The largest request body a caller may send through Proxy. It travels inside a gRPC
    # request, so it must also fit server.max_receive_bytes (default 1 MiB) with the rest.
    max_request_bytes: int = Field(default=512 * 1024, ge=0, le=64 * 1024 * 1024)
    # The largest provider response body; reading stops past it (RESOURCE_EXHAUSTED). It goes
    # back inside a gRPC response: keep it under server.max_message_bytes (default 4 MiB).
    max_response_bytes: int = Field(default=3 * 1024 * 1024, ge=0, le=256 * 1024 * 1024)
    # One provider request, from sending to the last byte of its answer (and never beyond
    # the caller's deadline).
    timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    # Proxied requests to one provider at once from this broker; the rest queue until their
    # deadline. A 429/503 with Retry-After pauses the provider's proxied requests too.
    max_concurrent_per_provider: int = Field(default=64, ge=1, le=10_000)
    # The HTTP front (ANY /proxy/{provider}/{path}); empty: off.
    listen: str = ""

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return _host_port(value, "127.0.0.1:8081") if value else value


class TlsSettings(_Section):
    cert_file: Path | None = None
    key_file: Path | None = None
    # CA bundle that signs client certificates; set it to require mTLS.
    client_ca_file: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @field_validator("key_file")
    @classmethod
    def _pair(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if (value is None) != (info.data.get("cert_file") is None):
            raise ValueError("cert_file and key_file go together")
        return value


class CacheSettings(_Section):
    """In-memory cache of the GetAccessToken hot path (invalidated across replicas through
    PostgreSQL LISTEN/NOTIFY; bypassed whenever that channel is down)."""

    enabled: bool = True
    # About 1.4 KiB per entry (ciphertexts and metadata): 50,000 keeps a broker under 200 MiB.
    max_entries: int = Field(default=50_000, ge=1)


class AuditSettings(_Section):
    # Events of concurrent calls are written in one transaction (group commit); each call
    # still waits until its own event is durable before its response leaves.
    group_commit: bool = True
    max_batch: int = Field(default=512, ge=1, le=10_000)
    # Adaptive window: a batch waits up to `max_delay_ms` for more events only while the broker
    # is busy: `siblings` calls in flight, or events arriving fast enough that `siblings` more
    # are due within the window (0 turns the window off).
    max_delay_ms: float = Field(default=3.0, ge=0, le=50)
    siblings: int = Field(default=2, ge=1, le=10_000)
    # ... and only while this process uses at least this many cores of CPU: with CPU to spare
    # the window would only add its wait to each call (0: the arrival rate alone decides).
    busy_cpu: float = Field(default=0.5, ge=0, le=64)
    # When a call's event counts as written, for the events written by themselves (every
    # call that changes nothing; a change's event commits with the change, whatever this says).
    # "commit": committed and flushed to disk before the response leaves (PostgreSQL's
    # synchronous_commit as the server sets it; SQLite synchronous=FULL). "write": committed
    # without waiting for the flush (PostgreSQL synchronous_commit=off; SQLite
    # synchronous=NORMAL): a broker crash loses nothing, a crash of the database server or its
    # machine may lose the last moments of events (docs/audit.md gives the window). A write
    # that fails fails the call in both modes.
    durability: Literal["commit", "write"] = "commit"


class EventsSettings(_Section):
    """Integration events (the outbox), their readers and their retention."""

    retention_days: float = Field(default=30.0, gt=0)
    purge_interval_seconds: float = Field(default=3600.0, gt=0)
    # How often watches and webhook dispatchers look for new events when nothing woke them
    # (SQLite has no NOTIFY: this is its short poll; on PostgreSQL a safety net).
    poll_seconds: float = Field(default=1.0, gt=0, le=60)
    heartbeat_seconds: float = Field(default=15.0, gt=0, le=3600)
    # Consecutive transient refresh failures that make one REFRESH_FAILED event.
    refresh_failure_threshold: int = Field(default=3, ge=1, le=1000)
    # Open WatchIntegrationEvents streams one caller may have on one broker process; the
    # next is refused RESOURCE_EXHAUSTED (CALLER_STREAM_LIMIT).
    max_streams_per_caller: int = Field(default=100, ge=1)
    # Open WatchIntegrationEvents streams on one broker process, all callers together; the
    # next is refused RESOURCE_EXHAUSTED (STREAM_LIMIT).
    max_streams: int = Field(default=1000, ge=1)
    # Recent events kept in memory for this process's streams (one database poll feeds
    # them all); a stream further behind catches up by reading from its own cursor.
    stream_buffer_events: int = Field(default=4096, ge=1, le=1_000_000)


class AuthorizationSettings(_Section):
    """BeginAuthorization's flows: how long they live and how much of them a caller may
    keep in the database before they are completed."""

    # A user who has not come back from the provider's consent page by then starts over.
    flow_ttl_seconds: float = Field(default=600.0, ge=10, le=86400)
    # Unfinished, unexpired flows one caller may have; the next is RESOURCE_EXHAUSTED
    # (FLOW_LIMIT) until some complete or expire.
    max_pending_flows_per_caller: int = Field(default=1000, ge=1)
    # Largest flow metadata (as JSON) BeginAuthorization accepts; larger is INVALID_ARGUMENT.
    # It is stored with the flow until the flow completes or expires.
    max_metadata_bytes: int = Field(default=8 * 1024, ge=0, le=64 * 1024)
    # Most scopes one BeginAuthorization may ask for; more is INVALID_ARGUMENT.
    max_scopes: int = Field(default=64, ge=1, le=256)
    # Longest scope (characters) BeginAuthorization accepts; longer is INVALID_ARGUMENT.
    max_scope_length: int = Field(default=256, ge=1, le=1024)


class WebhookSettings(_Section):
    """One webhook endpoint: matching events POSTed as JSON, signed per Standard Webhooks."""

    url: str
    # Environment variable with the signing secret ("whsec_" + base64, Standard Webhooks).
    secret_env: str
    # Event types and providers delivered; None: all.
    types: list[str] | None = None
    providers: list[str] | None = None
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    # Exponential backoff with jitter from the first delay up to the longest, for retry_for
    # seconds after the event was queued (default a day); then the delivery is FAILED.
    retry_first_seconds: float = Field(default=5.0, gt=0)
    retry_max_seconds: float = Field(default=3600.0, gt=0)
    retry_for_seconds: float = Field(default=86400.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        # Checked by the parser that sends it: a check of its own could read another host.
        problem = egress.problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class MetricsSettings(_Section):
    # HOST:PORT for the Prometheus endpoint; off when unset.
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        return None if value is None else _host_port(value, "127.0.0.1:9464")


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    # One line per RPC (caller, method, code, latency) at this level; DEBUG keeps the hot
    # path quiet in production, INFO makes it an access log.
    access_log_level: Literal["DEBUG", "INFO"] = "DEBUG"


class Settings(_Section):
    server: ServerSettings = ServerSettings()
    database: DatabaseSettings = DatabaseSettings()
    keys: KeysSettings = KeysSettings()
    refresh: RefreshSettings = RefreshSettings()
    logging: LoggingSettings = LoggingSettings()
    tls: TlsSettings = TlsSettings()
    cache: CacheSettings = CacheSettings()
    audit: AuditSettings = AuditSettings()
    metrics: MetricsSettings = MetricsSettings()
    events: EventsSettings = EventsSettings()
    authorization: AuthorizationSettings = AuthorizationSettings()
    proxy: ProxySettings = ProxySettings()
    webhooks: dict[str, WebhookSettings] = Field(default_factory=dict)
    providers: dict[str, ProviderSettings] = Field(default_factory=dict)
    callers: dict[str, CallerSettings] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _proxy_fits(self) -> Settings:
        # A proxied body rides inside one gRPC message: a cap the transport would refuse
        # first would answer with gRPC's own error instead of the proxy's, naming no setting.
        room = 64 * 1024  # the rest of the message: headers, status
        if self.proxy.max_request_bytes > self.server.max_receive_bytes - room:
            raise ValueError(
                "proxy.max_request_bytes must be at least 64 KiB below server.max_receive_bytes"
            )
        if self.proxy.max_response_bytes > self.server.max_message_bytes - room:
            raise ValueError(
                "proxy.max_response_bytes must be at least 64 KiB below server.max_message_bytes"
            )
        return self


# Short names for the settings operators set most; any setting also works as
# BROKER_<SECTION>__<KEY>, e.g. BROKER_REFRESH__MARGIN_SECONDS=120.
_SHORTCUTS = {
    "BROKER_LISTEN": ("server", "listen"),
    "BROKER_ENVIRONMENT": ("server", "environment"),
    "BROKER_DATABASE_URL": ("database", "url"),
    "BROKER_KEYS": ("keys", "keys"),
    "BROKER_KEYS_FILE": ("keys", "file"),
    "BROKER_KEYS_COMMAND": ("keys", "command"),
    "BROKER_LOG_LEVEL": ("logging", "level"),
    "BROKER_LOG_FORMAT": ("logging", "format"),
    "BROKER_METRICS_LISTEN": ("metrics", "listen"),
    "BROKER_TLS_CERT_FILE": ("tls", "cert_file"),
    "BROKER_TLS_KEY_FILE": ("tls", "key_file"),
    "BROKER_TLS_CLIENT_CA_FILE": ("tls", "client_ca_file"),
}


# BROKER_* variables that are not settings: the file to read, and the test and benchmark
# harnesses' database URLs.
_OTHER_VARIABLES = {"BROKER_CONFIG", "BROKER_TEST_DATABASE_URL", "BROKER_BENCH_DATABASE_URL"}


def _suggest(name: str, known: list[str], prefix: str = "") -> str:
    """ "; did you mean X?" when one of ``known`` is close to ``name`` (compared without the
    common ``prefix``, so BROKER_TOKEN is not taken for BROKER_LISTEN), else ""."""
    stems = {k.removeprefix(prefix): k for k in known}
    close = difflib.get_close_matches(name.removeprefix(prefix), list(stems), n=1, cutoff=0.8)
    return f"; did you mean {stems[close[0]]}?" if close else ""


def _known_variables() -> list[str]:
    names = [*_SHORTCUTS, *_OTHER_VARIABLES]
    for section, field in Settings.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            names += [f"BROKER_{section}__{key}".upper() for key in model.model_fields]
    return names


def _overlay_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[tuple[str, str], str]:
    """Copy BROKER_* variables into ``data``; returns which variable set which setting.

    A name that is no setting but looks like one (``BROKER_DATABSE_URL``) is an error: ignoring
    it would quietly fall back to a default, e.g. SQLite instead of the PostgreSQL meant.
    Other unknown names are reported and ignored."""
    origin: dict[tuple[str, str], str] = {}
    for name, value in env.items():
        if name in _SHORTCUTS:
            section, key = _SHORTCUTS[name]
        elif name.startswith("BROKER_") and "__" in name:
            section, _, key = name[len("BROKER_") :].lower().partition("__")
            if section in {"providers", "callers", "webhooks"} or "__" in key:
                continue
        elif name.startswith("BROKER_") and name not in _OTHER_VARIABLES:
            hint = _suggest(name, _known_variables(), "BROKER_")
            if hint:
                raise ConfigError(f"{name}: not a broker setting{hint}")
            log.warning("ignoring environment variable %s: not a broker setting", name)
            continue
        else:
            continue
        data.setdefault(section, {})[key] = value
        origin[(section, key)] = name
    return origin


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The settings model that holds the last part of ``loc`` (None if it cannot be told)."""
    model: Any = Settings
    for part in loc[:-1]:
        if isinstance(model, type) and issubclass(model, BaseModel):
            field = model.model_fields.get(str(part))
            if field is None:
                return None
            model = field.annotation
        elif get_origin(model) is dict:
            model = get_args(model)[1]  # a provider's or caller's name: its value's model
        else:
            return None
        if get_origin(model) in (Union, types.UnionType):  # X | None
            model = next(a for a in get_args(model) if a is not type(None))
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _describe(error: ValidationError, origin: Mapping[tuple[str, str], str]) -> str:
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        where = ".".join(str(part) for part in loc) or "settings"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            model = _model_at(loc)
            known = list(model.model_fields) if model is not None else []
            message = "unknown setting" + _suggest(str(loc[-1]), known)
        variable = origin.get((str(loc[0]), str(loc[1]))) if len(loc) == 2 else None
        if variable is not None:
            message += f" (from {variable})"
        lines.append(f"{where}: {message}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _read_file(path: str | Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"BROKER_CONFIG: file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"BROKER_CONFIG: {path} is a directory, not a TOML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"BROKER_CONFIG: {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"BROKER_CONFIG: {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"BROKER_CONFIG: cannot read {path}: {exc.strerror}") from None


def load_settings(
    env: Mapping[str, str] | None = None, config_path: str | Path | None = None
) -> Settings:
    """Read the TOML file (if any) and the environment; raise ConfigError naming bad settings."""
    env = os.environ if env is None else env
    path = config_path or env.get("BROKER_CONFIG")
    data = _read_file(path) if path else {}
    origin = _overlay_env(data, env)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from None
