"""The Node client's tests' provider: the fake OAuth server and a fake provider API (the dev
tools' own test doubles), run in this process and steered over HTTP by the tests.

Prints one JSON line with the URLs and the client, then serves until stdin closes. Control
routes on the OAuth server (JSON answers):

- ``/_grant?scope=read&expires_in=S``: a new grant, ``{"access_token", "refresh_token"}``;
- ``/_fail?kind=unavailable&times=2&retry_after=1``: the next ``times`` requests to /token
  answer ``kind`` (``times=0``: every one until ``/_reset``);
- ``/_reset``: no more scripted failures;
- ``/_stats``: ``{"refresh_calls", "api_requests"}``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from broker_devtools.fakeapi import FakeApi
from broker_devtools.fakeauth import FakeAuthServer


def main() -> int:
    fake = FakeAuthServer(expires_in=3600, rotate=True)
    api = FakeApi()

    def grant(query: dict[str, str], _body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        expires = query.get("expires_in")
        access, refresh = fake.issue_grant(
            tuple(query.get("scope", "read").split()), int(expires) if expires else None
        )
        return 200, {"access_token": access, "refresh_token": refresh}

    def fail(query: dict[str, str], _body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        times = int(query.get("times", "1"))
        fake.fail_next(
            query["kind"],  # type: ignore[arg-type]
            times or None,
            retry_after=query.get("retry_after", "2"),
        )
        return 200, {}

    def reset(_query: dict[str, str], _body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        fake.reset_failures()
        return 200, {}

    def stats(_query: dict[str, str], _body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return 200, {"refresh_calls": fake.refresh_calls, "api_requests": len(api.requests)}

    fake.routes.update({"/_grant": grant, "/_fail": fail, "/_reset": reset, "/_stats": stats})
    with fake, api:
        print(
            json.dumps(
                {
                    "url": fake.url,
                    "token_url": fake.token_url,
                    "authorization_url": fake.authorization_url,
                    "revocation_url": fake.revocation_url,
                    "client_id": fake.client_id,
                    "client_secret": fake.client_secret,
                    "api_url": api.url,
                }
            ),
            flush=True,
        )
        sys.stdin.read()  # until the test runner goes away
    return 0


if __name__ == "__main__":
    sys.exit(main())
