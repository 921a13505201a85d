"""The operator's decrypt command: one long-lived child process that reads JSON lines
``{"ciphertext": "..."}`` on stdin and answers, in order, one line each: ``{"plaintext": "..."}``
or ``{"error": "..."}``. Any application's own scheme plugs in this way.

The child gets a minimal environment (no BROKER_* variables: the broker's keys and database
URL stay in the broker), plus the variables the operator names with ``--decrypt-env``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Sequence

from broker.sources import SourceError

# Passed through so an ordinary script runs (interpreter on PATH, locale, home directory).
_BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "SYSTEMROOT")
# A line holds one token of at most 64 KiB, base64 or hex: several times that is ample.
_LINE_LIMIT = 1024 * 1024


def child_environment(extra: Sequence[str]) -> dict[str, str]:
    names = [*_BASE_ENV, *(n for n in extra if not n.startswith("BROKER_"))]
    return {n: os.environ[n] for n in names if n in os.environ}


class DecryptCommand:
    def __init__(self, command: str, extra_env: Sequence[str] = ()) -> None:
        self.command = command
        self.env = child_environment(extra_env)
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        try:
            self._proc = await asyncio.create_subprocess_shell(
                self.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=self.env,
                limit=_LINE_LIMIT,
            )
        except OSError as exc:
            raise SourceError(f"--decrypt-command could not be started: {exc.strerror}") from None

    async def decrypt(self, ciphertexts: Sequence[str]) -> list[str | None]:
        """Plaintexts in order; None for each one the command could not decrypt."""
        if not ciphertexts:
            return []
        proc = self._proc
        if proc is None:
            await self.start()
            proc = self._proc
        assert proc is not None
        assert proc.stdin is not None
        assert proc.stdout is not None
        payload = "".join(json.dumps({"ciphertext": c}) + "\n" for c in ciphertexts).encode()

        async def write() -> None:
            assert proc.stdin is not None
            proc.stdin.write(payload)
            await proc.stdin.drain()

        async def read() -> list[str | None]:
            assert proc.stdout is not None
            answers: list[str | None] = []
            for _ in ciphertexts:
                line = await proc.stdout.readline()
                if not line:
                    code = None
                    with contextlib.suppress(TimeoutError):
                        code = await asyncio.wait_for(proc.wait(), 2)
                    raise SourceError(_exited(code))
                answers.append(_answer(line))
            return answers

        try:
            _, answers = await asyncio.gather(write(), read())
        except (BrokenPipeError, ConnectionResetError):
            raise SourceError(_exited(proc.returncode)) from None
        except ValueError:  # a line over the limit
            raise SourceError("--decrypt-command answered a line longer than 1 MiB") from None
        return answers

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _answer(line: bytes) -> str | None:
    try:
        answer = json.loads(line)
    except ValueError:
        return None
    if isinstance(answer, dict) and isinstance(answer.get("plaintext"), str):
        return str(answer["plaintext"])
    return None


def _exited(code: int | None) -> str:
    # Its stderr goes to the operator's terminal as it is; nothing of it is repeated here.
    how = "stopped answering" if code is None else f"exited with status {code}"
    return f"--decrypt-command {how} before answering every ciphertext"
