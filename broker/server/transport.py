"""The gRPC server's transport limits: request and response sizes, how many connections it
keeps and for how long, and the count of open connections for the metrics.

Each limit is a gRPC core channel argument, enforced before any Python code sees the
connection or the call: a peer that connects and sends nothing (or only the HTTP/2 preface)
is closed when the handshake timeout passes, one that sends no call is closed when the idle
timeout passes, and connections beyond the cap are closed as they are accepted — so however
many sockets a peer opens, the broker keeps file descriptors for its callers, its database
and its providers.
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Iterable
from typing import Any

from broker.config import ServerSettings

log = logging.getLogger("broker.server")

# Descriptors kept back from the connection cap: database pools, the provider and webhook
# HTTP clients, the metrics endpoint, the SQLite files and gRPC's own (epoll, wake-up fds).
FD_RESERVE = 128


def connection_cap(settings: ServerSettings) -> int:
    """``server.max_connections``, if the open-file limit allows it: the soft RLIMIT_NOFILE is
    raised (up to the hard limit) to make room, else the cap is lowered to what the limit
    leaves after the reserve. Past the limit, accept() fails with EMFILE and gRPC stops taking
    any connection, callers' included."""
    wanted = settings.max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < needed and hard != soft:
        raised = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    cap = cap_for(wanted, soft)
    if cap < wanted:
        log.warning(
            "server.max_connections is %d but the open-file limit is %d: serving at most %d "
            "connections (raise the limit: systemd LimitNOFILE=, ulimit -n)",
            wanted,
            soft,
            cap,
        )
    return cap


def cap_for(wanted: int, limit: int) -> int:
    """The connection cap that leaves the reserve free under an open-file ``limit``."""
    if limit == resource.RLIM_INFINITY:
        return wanted
    return min(wanted, max(limit - FD_RESERVE, limit // 2, 1))


def server_options(settings: ServerSettings, cap: int) -> list[tuple[str, Any]]:
    """The channel arguments of the broker's gRPC server."""
    return [
        ("grpc.max_receive_message_length", settings.max_receive_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_metadata_size", settings.max_metadata_bytes),
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
        ("grpc.max_allowed_incoming_connections", cap),
        # Covers TCP accept to the client's HTTP/2 SETTINGS frame, TLS included.
        ("grpc.server_handshake_timeout_ms", int(settings.handshake_timeout_seconds * 1000)),
        ("grpc.max_connection_idle_ms", int(settings.max_connection_idle_seconds * 1000)),
        ("grpc.http2.bdp_probe", 1 if settings.http2_bdp_probe else 0),
        # Keepalive enforcement: clients may not ping more often than every 10 s without
        # calls in flight; two strikes and the connection is closed (GOAWAY).
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        # Detect dead peers: ping an idle client every 2 minutes, drop it after 20 s.
        ("grpc.keepalive_time_ms", 120_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ]


def open_connections(port: int) -> int:
    """TCP connections this process holds on the gRPC ``port`` (Linux /proc; 0 elsewhere)."""
    try:
        inodes = _socket_inodes()
    except OSError:
        return 0
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows, None)
                count += sum(1 for row in rows if _ours(row.split(), port, inodes))
        except OSError:
            continue
    return count


def _socket_inodes() -> set[str]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


_ESTABLISHED = "01"


def _ours(fields: list[str], port: int, inodes: set[str]) -> bool:
    # sl, local_address (HEXIP:HEXPORT), rem_address, st, ..., inode (the tenth column)
    if len(fields) < 10 or fields[3] != _ESTABLISHED:
        return False
    return int(fields[1].rpartition(":")[2], 16) == port and fields[9] in inodes


def gauges(port: int, cap: int) -> Iterable[tuple[str, str, float]]:
    yield (
        "broker_grpc_connections",
        "Client connections open on the gRPC port",
        float(open_connections(port)),
    )
    yield (
        "broker_grpc_max_connections",
        "Connections the gRPC server keeps at most (server.max_connections, lowered to "
        "fit the open-file limit); more are closed as they are accepted",
        float(cap),
    )
