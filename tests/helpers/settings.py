"""The test brokers' settings: one environment, one key, an admin and a runner caller."""

from __future__ import annotations

from typing import Any

from broker.config import Settings
from broker.crypto.keys import generate_key
from broker.server.callers import hash_token

ENVIRONMENT = "test"


ADMIN_TOKEN = "admin-token-for-tests"


RUNNER_TOKEN = "runner-token-for-tests"


ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


RUNNER = (("authorization", f"Bearer {RUNNER_TOKEN}"),)


KEYS = generate_key("test1")


def make_settings(database_url: str, **overrides: Any) -> Settings:
    data: dict[str, Any] = {
        "server": {
            "listen": "127.0.0.1:0",
            "environment": ENVIRONMENT,
            "health_check_interval_seconds": 0.2,
            "shutdown_grace_seconds": 1,
        },
        "database": {"url": database_url, "timeout_seconds": 2},
        "keys": {"keys": KEYS},
        "callers": {
            "admin": {"token_sha256": hash_token(ADMIN_TOKEN)},
            "runner": {"token_sha256": hash_token(RUNNER_TOKEN), "methods": ["GetAccessToken"]},
        },
        "refresh": {"background": False},
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
        else:
            data[section] = values
    return Settings.model_validate(data)
