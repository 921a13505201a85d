"""Prometheus metrics (prometheus-client), served on their own HTTP port when
``metrics.listen`` is set. Labels are methods, codes, providers and outcomes — never a user
id, integration id or token, so cardinality stays bounded and nothing secret is exported."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

RPCS = Counter("broker_rpc_total", "RPCs handled, by method and status code", ["method", "code"])
RPC_LATENCY = Histogram(
    "broker_rpc_latency_seconds",
    "RPC latency as seen by the server",
    ["method"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
REFRESHES = Counter(
    "broker_refresh_total",
    "Provider refresh calls, by provider and outcome",
    ["provider", "outcome"],
)
KEEPALIVE = Counter(
    "broker_keepalive_refresh_total",
    "Keep-alive refreshes of refresh tokens nobody used (idle, or renewed before they "
    "lapse), by provider and outcome (ok, failed)",
    ["provider", "outcome"],
)
LAST_USED_FLUSHES = Counter(
    "broker_last_used_rows_written_total",
    "Integrations whose last_used_at the batched write updated",
)
REFRESH_SKIPPED = Counter(
    "broker_refresh_skipped_total",
    "Refreshes not attempted, by provider and reason: budget (the background pass's attempts "
    "for that provider were spent), cool_down (a caller met an integration backing off after "
    "a failure)",
    ["provider", "reason"],
)
REFRESH_CALLERS = Counter(
    "broker_refresh_callers_total",
    "Calls that met a token due for refresh, by provider and outcome: waited (the token could "
    "not satisfy the caller: it waited on the refresh), ahead (answered at once with the "
    "token it still satisfied, the refresh run in the background)",
    ["provider", "outcome"],
)
REFRESH_BACKOFF = Histogram(
    "broker_refresh_backoff_seconds",
    "Wait set after a failed refresh before that integration's next attempt, by provider",
    ["provider"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 86400),
)
AUDIT_BATCH = Histogram(
    "broker_audit_batch_size",
    "Audit events committed per transaction (group commit)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
READ_LOCK_WAITS = Counter(
    "broker_db_read_lock_waits_total",
    "Reads by integration id that met a SQLite lock and waited for it off the event loop",
)
READ_BATCH = Histogram(
    "broker_read_batch_size",
    "Reads by integration id answered per statement (the coalesced cold read)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)

REQUESTS_TOO_LARGE = Counter(
    "broker_requests_too_large_total",
    "Authenticated calls whose request body gRPC refused for being over "
    "server.max_receive_bytes (a call that carried no body at all is counted too)",
    ["method"],
)


Source = Callable[[], Iterable[tuple[str, str, float]]]


class _Gauges(Collector):
    """Values read when Prometheus scrapes: cache and database pool state."""

    def __init__(self) -> None:
        self.sources: list[Source] = []

    def collect(self) -> Iterable[Any]:
        for source in list(self.sources):
            for name, documentation, value in source():
                family = GaugeMetricFamily(name, documentation)
                family.add_metric([], value)
                yield family


_GAUGES = _Gauges()
REGISTRY.register(_GAUGES)


def serve(listen: str, source: Source) -> Callable[[], None]:
    """Start the metrics HTTP server (a daemon thread); returns a function that stops it."""
    _GAUGES.sources.append(source)
    host, _, port = listen.rpartition(":")
    server, thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1")

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=2)
        if source in _GAUGES.sources:
            _GAUGES.sources.remove(source)

    return stop


CALLER_TEXT_CLEANED = Counter(
    "broker_caller_text_cleaned_total",
    "Caller-supplied free text (a Disconnect reason) cut to its length limit or stripped of "
    "control characters before it was stored and sent in events, by field and what was done",
    ["field", "action"],
)
EVENTS_WRITTEN = Counter(
    "broker_events_written_total", "Integration events committed, by type", ["type"]
)
WEBHOOK_DELIVERIES = Counter(
    "broker_webhook_deliveries_total",
    "Webhook delivery attempts, by endpoint and outcome (delivered, retry, failed)",
    ["endpoint", "outcome"],
)
WEBHOOK_LAG = Histogram(
    "broker_webhook_delivery_lag_seconds",
    "From an event's commit to its successful webhook delivery",
    ["endpoint"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 21600, 86400),
)
WATCH_STREAMS = Gauge(
    "broker_watch_streams_open", "WatchIntegrationEvents streams open on this process"
)
WATCH_REFUSED = Counter(
    "broker_watch_streams_refused_total",
    "WatchIntegrationEvents streams refused by a limit (per_caller, total)",
    ["limit"],
)
EVENT_POLLS = Counter(
    "broker_event_poll_queries_total",
    "Queries of the shared event poller that feeds every stream of this process",
)
EVENT_CATCH_UPS = Counter(
    "broker_event_stream_catch_up_reads_total",
    "Reads a stream made from its own cursor (it started, or fell, behind the shared buffer)",
)
FLOWS_REFUSED = Counter(
    "broker_authorization_flows_refused_total",
    "BeginAuthorization calls refused by a limit (pending_per_caller)",
    ["limit"],
)

PROXY_REQUESTS = Counter(
    "broker_proxy_requests_total",
    "Provider API requests sent by Proxy, by provider and outcome (the HTTP status class, "
    "or error)",
    ["provider", "outcome"],
)
PROXY_TOO_LARGE = Counter(
    "broker_proxy_too_large_total",
    "Proxy calls refused for a body over proxy.max_request_bytes or proxy.max_response_bytes",
    ["direction"],
)
PROXY_REPLAYS = Counter(
    "broker_proxy_replays_total",
    "Proxied requests replayed once after a 401 and a forced refresh, by provider",
    ["provider"],
)
