"""Broker *processes* for tests whose guarantee is about replicas (or about the real CLI),
and what starting one needs: a TOML file, a free port, an environment without BROKER_*."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from broker.server.callers import hash_token
from tests.helpers.settings import ADMIN_TOKEN, ENVIRONMENT, KEYS

_SERVING = re.compile(r"broker serving on [^:]+:(\d+)")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """A TOML file from nested dicts (two levels: [section] and [section.name])."""
    lines: list[str] = []
    for section, values in data.items():
        flat = {k: v for k, v in values.items() if not isinstance(v, dict)}
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        if flat:
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in flat.items()]
        for name, table in nested.items():
            lines.append(f"[{section}.{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class BrokerProcess:
    """``python -m broker serve`` in a subprocess; ``port`` is read from its start-up log."""

    def __init__(
        self,
        config: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        preexec: Callable[[], None] | None = None,
    ):
        self.config = config
        # Run in the child before exec (e.g. resource.setrlimit for a lower open-file limit).
        self.preexec = preexec
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 20.0) -> BrokerProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker",
            "--config",
            str(self.config),
            "serve",
            env=self.env,
            cwd=self.cwd,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=self.preexec,
        )
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(ready))
        try:
            self.port = await asyncio.wait_for(ready, timeout)
        except (TimeoutError, RuntimeError):
            await self.kill()
            raise RuntimeError("broker process did not start:\n" + "\n".join(self.log)) from None
        return self

    async def _read(self, ready: asyncio.Future[int]) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            match = _SERVING.search(line)
            if match and not ready.done():
                ready.set_result(int(match.group(1)))
        if not ready.done():
            ready.set_exception(RuntimeError("exited"))

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful shutdown) and the exit code."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            await self.kill()
            raise
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 2)
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def run_cli(
    database_url: str, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """``python -m broker ARGS`` against that database (test keys and environment):
    exit code, stdout, stderr."""
    full = {
        **os.environ,
        "BROKER_DATABASE_URL": database_url,
        "BROKER_KEYS": KEYS,
        "BROKER_ENVIRONMENT": ENVIRONMENT,
        **(env or {}),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        *args,
        env=full,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def replica_set(
    directory: Path,
    database_url: str,
    sections: dict[str, Any],
    env: dict[str, str],
    count: int = 3,
) -> AsyncIterator[list[BrokerProcess]]:
    """``count`` broker processes on one database, the test admin as their caller; each must
    shut down gracefully (exit 0) at the end."""

    config = write_toml(
        directory / "broker.toml",
        {
            "server": {"listen": "127.0.0.1:0", "environment": ENVIRONMENT},
            "database": {"url": database_url},
            "callers": {"admin": {"token_sha256": hash_token(ADMIN_TOKEN)}},
            **sections,
        },
    )
    processes = [BrokerProcess(config, env) for _ in range(count)]
    await asyncio.gather(*(p.start() for p in processes))
    try:
        yield processes
    finally:
        codes = await asyncio.gather(*(p.stop() for p in processes))
    assert codes == [0] * count, "graceful shutdown exits 0"


VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This machine's environment minus any BROKER_* setting that would leak into the broker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env
