"""Server processes the bench starts, and their peak RSS read from /proc (no psutil)."""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

_SERVING = re.compile(r"broker serving on [^:]+:(\d+)")

# Settings the bench decides for every broker it starts; the same names in the caller's
# environment would silently point the broker elsewhere (another database, another keyring),
# so they are removed. Tuning knobs (BROKER_AUDIT__…, BROKER_CACHE__MAX_ENTRIES, …) pass through.
_OWNED = re.compile(
    r"BROKER_(CONFIG|DATABASE_URL|KEYS|KEYS_FILE|LISTEN|ENVIRONMENT|LOG_LEVEL|LOG_FORMAT"
    r"|TLS_\w+|DATABASE__URL|KEYS__\w+|SERVER__(LISTEN|ENVIRONMENT)|TLS__\w+"
    r"|LOGGING__\w+|CACHE__ENABLED|REFRESH__BACKGROUND)"
)


def broker_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _OWNED.fullmatch(k)}
    # INFO and text: the start-up line carrying the port is what start() waits for.
    env.update({"BROKER_LOG_LEVEL": "INFO", "BROKER_LOG_FORMAT": "text"})
    env.update(extra)
    return env


def run_cli(config: Path, env: Mapping[str, str], *args: str, timeout: float = 300) -> str:
    """``python -m broker --config CONFIG ARGS`` to completion (e.g. migrate)."""
    done = subprocess.run(
        [sys.executable, "-m", "broker", "--config", str(config), *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"broker {' '.join(args)} exited with {done.returncode}: {done.stderr.strip()[-2000:]}"
        )
    return done.stdout


class BrokerServer:
    """``python -m broker --config CONFIG serve`` as a subprocess; the port comes from its log.

    stderr is drained by a thread for the whole life of the process (a full pipe would stall
    the broker) and its last lines are kept for error messages."""

    def __init__(
        self,
        config: Path,
        env: Mapping[str, str],
        extra_args: tuple[str, ...] = (),
        variant: str | None = None,
    ):
        self.config = config
        self.env = dict(env)
        self.extra_args = extra_args
        # The bench-only ceiling brokers (broker_devtools.bench.ceiling) instead of `broker serve`.
        self.variant = variant
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 120.0) -> BrokerServer:
        if self.variant is None:
            command = ["-m", "broker", "--config", str(self.config), "serve", *self.extra_args]
        else:
            command = ["-m", "broker_devtools.bench.ceiling", "--config", str(self.config),
                       "--variant", self.variant]  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, *command],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, name="broker-stderr", daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout) or not self.port:
            self.stop()
            raise RuntimeError("broker did not start:\n  " + "\n  ".join(list(self.log)[-20:]))
        return self

    def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip())
            match = _SERVING.search(line)
            if match and not self._ready.is_set():
                self.port = int(match.group(1))
                self._ready.set()
        self._ready.set()  # exited: wake start() up

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (graceful shutdown), SIGKILL if it does not exit in time; the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(2)
        return proc.returncode


# -- CPU and peak RSS ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its descendants so far (from /proc; 0 if gone)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for member in [pid, *_descendants(pid)]:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{member}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds of each of ``pids`` still running (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def is_postgres(pid: int) -> bool:
    """True when ``pid`` is a PostgreSQL process on this machine (not one of another pid
    namespace or host that only shares the number)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() in ("postgres", "postmaster")
    except OSError:
        return False


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two ``cpu_by_pid`` readings: what each process that lived through
    the window used, all of what one that appeared used; one that ended is lost with its
    last stretch (rare: the broker keeps its connections)."""
    return sum(value - before.get(pid, 0.0) for pid, value in after.items())


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM (peak resident set) of ``pid`` and of its descendants, summed, in MiB.

    One process unless the server forks workers; then the sum is what the machine pays."""
    total_kib = 0
    found = False
    for member in [pid, *_descendants(pid)]:
        kib = _vm_hwm_kib(member)
        if kib is not None:
            total_kib += kib
            found = True
    return total_kib / 1024 if found else None


def _vm_hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name may contain spaces and parentheses: split after the last ")".
            stat = (entry / "stat").read_text()
            ppid = int(stat.rpartition(")")[2].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out.extend(children)
        todo.extend(children)
    return out
