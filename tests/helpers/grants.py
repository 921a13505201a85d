"""Run-scoped grants: the callers that issue and use them, and the grant header."""

from __future__ import annotations

from typing import Any

from broker.server.callers import hash_token
from tests.helpers.settings import ADMIN_TOKEN

GRANT_RUNNER_TOKEN = "grant-runner-token"


OTHER_TOKEN = "other-runner-token"


LIMITED_TOKEN = "limited-issuer-token"


PLAIN_TOKEN = "plain-reader-token"


TENANT_TOKEN = "tenant-a-token"


GRANT_RUNNER = (("authorization", f"Bearer {GRANT_RUNNER_TOKEN}"),)


def grant_callers() -> dict[str, Any]:
    return {
        "admin": {"token_sha256": hash_token(ADMIN_TOKEN)},
        # Every method configured, yet under requires_grant it can only read under a grant.
        "runner": {"token_sha256": hash_token(GRANT_RUNNER_TOKEN), "requires_grant": True},
        "other-runner": {
            "token_sha256": hash_token(OTHER_TOKEN),
            "requires_grant": True,
            "methods": ["GetAccessToken"],
        },
        # An issuer that may read only twitter, and give grants of at most 10 minutes.
        "limited": {
            "token_sha256": hash_token(LIMITED_TOKEN),
            "providers": ["twitter"],
            "max_grant_ttl": 600,
        },
        "plain": {"token_sha256": hash_token(PLAIN_TOKEN), "methods": ["GetAccessToken"]},
        # Tied to one user, like a session's row-level security.
        "tenant": {"token_sha256": hash_token(TENANT_TOKEN), "users": ["user-a"]},
    }


def with_grant(credentials: tuple[tuple[str, str], ...], token: str) -> tuple[Any, ...]:
    return (*credentials, ("x-broker-grant", token))
