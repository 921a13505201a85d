"""``broker serve --workers N``: N broker processes sharing one port (SO_REUSEPORT), so the
kernel spreads connections over every core. Each worker is a complete broker; the replica
guarantees (refresh leases, cache invalidation by NOTIFY) are what keep them consistent, which
is why workers need PostgreSQL. The parent only forwards signals and waits."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from broker.config import Settings
from broker.errors import ConfigError

log = logging.getLogger("broker.workers")


def check(settings: Settings, workers: int) -> None:
    if workers < 2:
        return
    if settings.database.is_sqlite:
        raise ConfigError(
            "--workers: SQLite serves one process; use PostgreSQL (database.url) for workers"
        )
    if settings.server.listen.rpartition(":")[2] == "0":
        raise ConfigError("--workers: server.listen needs a fixed port to share")


def run(settings: Settings, workers: int, config: str | None) -> int:
    check(settings, workers)
    base = [sys.executable, "-m", "broker"] + (["--config", config] if config else []) + ["serve"]
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for index in range(workers):
        env = {
            **os.environ,
            "BROKER_SERVER__REUSE_PORT": "true",
            "BROKER_SERVER__WORKER_INDEX": str(index),
        }
        children.append(subprocess.Popen(base, env=env))
    log.info("started %d workers on %s", workers, settings.server.listen)
    code = 0
    while any(child.poll() is None for child in children):
        for child in children:
            status = child.poll()
            if status is not None and status != 0 and not stopping:
                # A worker died on its own: take the others down too rather than run degraded
                # without anyone noticing; the supervisor (systemd, Kubernetes) restarts us.
                log.error("worker %d exited with %d; stopping the others", child.pid, status)
                code = status
                stopping = True
                forward(signal.SIGTERM, None)
        time.sleep(0.2)
    return code or max((child.returncode or 0) for child in children)
