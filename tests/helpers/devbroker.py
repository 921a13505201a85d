"""A ``broker serve --dev`` process, as a developer starts one from a shell."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers.processes import clean_env
from tests.helpers.waiting import block_until


class DevBroker:
    """One `python -m broker serve --dev` process; stdout is collected as it arrives."""

    def __init__(
        self, cwd: Path, port: int, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> None:
        self.cwd = cwd
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.stderr_path = cwd.parent / f"broker-{port}-{time.monotonic_ns()}.log"
        self._stderr = self.stderr_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--dev", *args],
            cwd=cwd,
            env=clean_env(BROKER_LISTEN=f"127.0.0.1:{port}", **(env or {})),
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.lines: list[str] = []
        assert self.process.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,))
        self._reader.start()
        self.channel = grpc.insecure_channel(self.address)

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self.lines)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def health(self, service: str = "") -> int | None:
        try:
            response = health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1
            )
        except grpc.RpcError:
            return None
        return int(response.status)

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, f"broker exited early:\n{self.stderr}"
            return self.health() == SERVING and "grpcurl" in self.stdout

        block_until(ready, "the dev broker to serve and print its banner")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 8.0) -> int:
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            self.kill()
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=5)
        self._stderr.close()


SERVING = health_pb2.HealthCheckResponse.SERVING
