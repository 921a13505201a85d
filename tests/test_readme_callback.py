"""The "Wiring a web backend's callback route" handlers of docs/authorization.md run as written,
with only the client's imports, against a real broker and the fake authorization server:
connect, the user's consent, the callback; a replayed callback and another user's callback get
the page's answers."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from broker.server.app import Broker, start
from broker.server.callers import hash_token
from tests.helpers.fakes import FakeAuthServer
from tests.helpers.settings import make_settings

PAGE = Path(__file__).resolve().parent.parent / "docs" / "authorization.md"
TOKEN = "cb_readme-web-backend"


def handlers() -> str:
    text = PAGE.read_text()
    start = text.index("## Wiring a web backend's callback route")
    end = text.find("\n## ", start + 1)
    (code,) = re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.S)
    return str(code)


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture
async def broker(database_url: str, fake: FakeAuthServer) -> AsyncIterator[Broker]:
    code = handlers()
    redirect = re.search(r'REDIRECT_URI = "([^"]+)"', code)
    assert redirect
    settings = make_settings(
        database_url,
        callers={"web": {"token_sha256": hash_token(TOKEN)}},
        providers={
            "acme": {
                "token_url": fake.token_url,
                "authorization_url": fake.authorization_url,
                "client_id": fake.client_id,
                "client_secret": fake.client_secret,
                "redirect_uris": [redirect.group(1)],
                "scopes": ["read"],
            }
        },
        refresh={"background": False},
    )
    running = await start(settings)
    yield running
    await running.stop(0)


def callback_query(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def test_the_callback_handlers_run_as_written(broker: Broker) -> None:
    code = handlers()
    assert not re.search(r"^(from|import) broker\b", code, re.M), "client imports only"
    code = code.replace('BROKER = "127.0.0.1:50051"', f'BROKER = "127.0.0.1:{broker.port}"')
    code = code.replace('TOKEN = "cb_..."', f'TOKEN = "{TOKEN}"')
    module: dict[str, Any] = {}
    exec(compile(code, "authorization.md", "exec"), module)  # noqa: S102 - the page's own code
    await module["on_startup"]()
    try:
        url = await module["connect"]("user-1")
        async with httpx.AsyncClient(follow_redirects=False) as http:
            consented = await http.get(url)
        assert consented.status_code == 302, consented.text
        query = {
            k: v[0] for k, v in parse_qs(urlsplit(consented.headers["location"]).query).items()
        }
        status, text = await module["callback"]("user-1", query)
        assert status == 200, text
        assert text.startswith("Connected acme (integration ")
        replayed = await module["callback"]("user-1", query)
        assert replayed[0] == 400

        other = await module["connect"]("user-1")
        async with httpx.AsyncClient(follow_redirects=False) as http:
            location = (await http.get(other)).headers["location"]
        stolen = callback_query(location)
        assert (await module["callback"]("user-2", stolen))[0] == 403
    finally:
        await module["broker"].close()
