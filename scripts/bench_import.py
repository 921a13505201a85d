"""How fast ``broker import`` moves an application's integrations table: ROWS rows of the seed
schema in a fresh PostgreSQL database, imported by a real ``python -m broker import`` process
into a fresh broker database; prints rows/s and the import process's peak RSS.

    python scripts/bench_import.py postgresql://postgres@127.0.0.1:5432/postgres [ROWS]
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

SEED = """
CREATE TABLE integrations (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id text NOT NULL, provider text NOT NULL, status text NOT NULL DEFAULT 'connected',
    access_token text, refresh_token text,
    created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz, scopes text[], metadata jsonb,
    disconnected_at timestamptz, disconnect_reason text
)
"""


async def prepare(admin_url: str, rows: int) -> tuple[str, str, list[str]]:
    tag = uuid.uuid4().hex[:8]
    source, target = f"bench_app_{tag}", f"bench_broker_{tag}"
    admin = await asyncpg.connect(admin_url)
    for name in (source, target):
        await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    base = admin_url.rsplit("/", 1)[0]
    conn = await asyncpg.connect(f"{base}/{source}")
    await conn.execute(SEED)
    await conn.execute(
        """INSERT INTO integrations (user_id, provider, access_token, refresh_token, expires_at,
               scopes, metadata)
           SELECT 'user-' || n, CASE WHEN n % 2 = 0 THEN 'google' ELSE 'slack' END,
                  'at-' || md5(n::text), 'rt-' || md5(n::text || 'r'),
                  CASE WHEN n % 5 = 0 THEN NULL ELSE now() + interval '1 hour' END,
                  ARRAY['read', 'write'], jsonb_build_object('n', n)
           FROM generate_series(1, $1) AS n""",
        rows,
    )
    await conn.close()
    return f"{base}/{source}", f"{base}/{target}", [source, target]


async def drop(admin_url: str, names: list[str]) -> None:
    admin = await asyncpg.connect(admin_url)
    for name in names:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


def main() -> None:
    admin_url = sys.argv[1]
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    source, target, names = asyncio.run(prepare(admin_url, rows))
    from broker.crypto.keys import generate_key

    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "BROKER_DATABASE_URL": target.replace("postgresql://", "postgresql+asyncpg://", 1),
            "BROKER_KEYS": generate_key("bench"),
            "BROKER_ENVIRONMENT": "bench",
        }
        subprocess.run(
            [sys.executable, "-m", "broker", "migrate"], env=env, check=False, capture_output=True
        )
        report = Path(tmp) / "report.jsonl"
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "broker", "import", "--from", source, "--report", str(report)],
            env=env,
            capture_output=True,
            text=True,
        )
        elapsed = time.monotonic() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    asyncio.run(drop(admin_url, names))
    print(done.stdout.strip(), done.stderr.strip()[-500:] if done.returncode else "")
    print(
        f"{rows} rows in {elapsed:.1f} s: {rows / elapsed:.0f} rows/s, "
        f"peak RSS of the import process {peak_kib / 1024:.0f} MiB (exit {done.returncode})"
    )


if __name__ == "__main__":
    main()
