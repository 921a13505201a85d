"""The ``broker`` command line run in-process against a configuration file of the test's."""

from __future__ import annotations

import asyncio
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.cli import main
from broker.server.callers import hash_token
from tests.helpers.processes import write_toml
from tests.helpers.settings import ADMIN_TOKEN, ENVIRONMENT, KEYS


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def config(tmp_path: Path, database_url: str, keys: str = KEYS, **server: Any) -> Path:
    # A file per call: a test holds several configurations at once.
    return write_toml(
        tmp_path / f"broker-{uuid.uuid4().hex[:8]}.toml",
        {
            "server": {"environment": ENVIRONMENT, **server},
            "database": {"url": database_url},
            "keys": {"keys": keys},
            "callers": {"admin": {"token_sha256": hash_token(ADMIN_TOKEN)}},
        },
    )


async def broker(
    capsys: pytest.CaptureFixture[str], cfg: Path, *argv: str, stdin: Any = None
) -> CliResult:
    capsys.readouterr()
    if stdin is not None:
        sys.stdin = stdin
    try:
        code = await asyncio.to_thread(main, ["--config", str(cfg), *argv])
    finally:
        sys.stdin = sys.__stdin__
    out, err = capsys.readouterr()
    return CliResult(code, out, err)
