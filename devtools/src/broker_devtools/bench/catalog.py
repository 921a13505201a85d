"""The scenario names and groups (no heavy imports: the ``broker`` CLI reads them to build its
help text, and must stay quick to start)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    dataset: str | None  # the seeded data it needs (shared between scenarios)


SCENARIOS = (
    Scenario("echo", "bare grpc.aio server, constant response of the broker's size", None),
    Scenario("no-broker", "in-process asyncpg fetchrow + AES-GCM decrypt", "pg"),
    Scenario("sqlite-hot", "GetAccessToken, SQLite, cache on, auth+audit", "sqlite"),
    Scenario("sqlite-cold", "GetAccessToken, SQLite, cache off, auth+audit", "sqlite"),
    Scenario("pg-hot", "GetAccessToken, PostgreSQL, cache on, auth+audit", "pg"),
    Scenario("pg-cold", "GetAccessToken, PostgreSQL, cache off, auth+audit", "pg"),
    # The measured ceiling (bench-only brokers, broker_devtools.bench.ceiling): pg-hot less its
    # audit writes, and the server with its interceptors but GetAccessToken stubbed.
    Scenario("pg-hot-noaudit", "pg-hot, audit events to a null sink (bench-only)", "pg"),
    Scenario("pg-hot-stub", "broker server + interceptors, constant answer, no audit", "pg"),
    Scenario("echo-open", "echo floor at a fixed 500 calls/s (open loop)", None),
    Scenario("sqlite-open", "sqlite-hot at a fixed 500 calls/s (open loop)", "sqlite"),
    Scenario("pg-open", "pg-hot at a fixed 500 calls/s (open loop)", "pg"),
    # pg-open's ceiling at the same rate: where its p50 goes (the latency breakdown).
    Scenario("pg-open-noaudit", "pg-open, audit events to a null sink (bench-only)", "pg"),
    Scenario("pg-open-stub", "pg-open's server + interceptors, constant answer", "pg"),
    Scenario("sqlite-hot-grant", "sqlite-hot, runner presenting a grant per user", "sqlite"),
    Scenario("pg-hot-grant", "pg-hot, runner presenting a grant per user", "pg"),
    Scenario("refresh-storm", "all expired at once, provider answers in 50 ms", "storm"),
    Scenario("scale-10k-hot", "PostgreSQL hot, 10,000 stored", "scale-10k"),
    Scenario("scale-10k-cold", "PostgreSQL cold, 10,000 stored", "scale-10k"),
    Scenario("scale-1m-hot", "PostgreSQL hot, 1,000,000 stored, cache filled", "scale-1m"),
    Scenario("scale-1m-cold", "PostgreSQL cold, 1,000,000 stored", "scale-1m"),
)
NAMES = tuple(s.name for s in SCENARIOS)
GROUPS = {
    "all": NAMES,
    "sqlite": ("sqlite-hot", "sqlite-cold"),
    "pg": ("pg-hot", "pg-cold"),
    "postgres": ("pg-hot", "pg-cold"),
    "storm": ("refresh-storm",),
    # pg-hot next to its ceiling, with the echo floor: the per-call CPU breakdown.
    "ceiling": ("echo", "pg-hot", "pg-hot-noaudit", "pg-hot-stub"),
    "open": ("echo-open", "sqlite-open", "pg-open", "pg-open-noaudit", "pg-open-stub"),
    # Under a grant against without one: the cost of grants on the hot path.
    "grant": ("sqlite-hot", "sqlite-hot-grant", "pg-hot", "pg-hot-grant"),
    "scale": ("scale-10k-hot", "scale-10k-cold", "scale-1m-hot", "scale-1m-cold"),
    "scale-10k": ("scale-10k-hot", "scale-10k-cold"),
    "scale-1m": ("scale-1m-hot", "scale-1m-cold"),
    "hot": ("sqlite-hot", "pg-hot", "scale-10k-hot", "scale-1m-hot"),
    "cold": ("sqlite-cold", "pg-cold", "scale-10k-cold", "scale-1m-cold"),
}


# The audit durabilities a broker scenario runs in (``audit.durability``): each audited
# scenario runs once in each; the "write" run's result is named with this suffix
# ("pg-hot+write"), the "commit" run's (the default) keeps the plain name.
DURABILITIES = ("commit", "write")
WRITE = "+write"
# Scenarios whose broker writes no audit events: run once, whatever the durability.
_UNAUDITED = ("echo", "echo-open", "no-broker")


def audited(name: str) -> bool:
    """Whether the scenario's broker writes audit events (so its durability matters)."""
    return name not in _UNAUDITED and not name.endswith(("-noaudit", "-stub"))


def base_name(name: str) -> str:
    """The scenario a result is of ("pg-hot+write" -> "pg-hot")."""
    return name.removesuffix(WRITE)


def select(names: Sequence[str]) -> list[str]:
    """Scenario names (or group names) to run, in the standard order; ValueError if unknown."""
    wanted: set[str] = set()
    for name in names:
        if name in GROUPS:
            wanted.update(GROUPS[name])
        elif name in NAMES:
            wanted.add(name)
        else:
            raise ValueError(
                f"unknown scenario {name!r}; known: {', '.join(NAMES)} "
                f"(groups: {', '.join(GROUPS)})"
            )
    return [n for n in NAMES if n in wanted]
