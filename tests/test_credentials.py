"""broker.domain.credentials: validation, stored form and headers, without a server."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.domain import credentials
from broker.errors import InvalidArgument
from broker.model import Credential, Kind

_TEXT = st.text(max_size=40) | st.sampled_from(["", "https://x.test/t", "http://[::1", "-----"])
_FIELDS = st.dictionaries(
    st.sampled_from(
        [
            "key", "header", "query_parameter", "prefix", "username", "password",
            "client_id", "client_secret", "scopes", "audience", "resource", "token_url",
            "auth_method", "private_key", "key_id", "issuer", "subject", "json_key",
            "app_id", "installation_id", "repositories", "permissions",
        ]
    ),
    _TEXT
    | st.lists(_TEXT, max_size=3)
    | st.dictionaries(_TEXT, _TEXT, max_size=2)
    | st.just(json.dumps({"type": "service_account", "private_key": 5, "client_email": {}})),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from([k for k in Kind if k is not Kind.AUTHORIZATION_CODE]), fields=_FIELDS)
def test_hostile_fields_are_invalid_argument_or_accepted(
    kind: Kind, fields: dict[str, Any]
) -> None:
    try:
        checked = credentials.validate(Credential(kind, fields))
    except InvalidArgument as exc:
        field = exc.field
    else:
        field = ""
    if field:
        assert field.startswith(f"credential.{kind.value}"), field
        return
    # Whatever was accepted round-trips through the stored form.
    assert credentials.load(kind, credentials.dump(checked)).fields == checked.fields


def test_repr_hides_the_secret() -> None:
    cred = Credential(Kind.BASIC, {"username": "u", "password": "hunter2"})
    assert "hunter2" not in repr(cred)
    assert "hunter2" not in str(cred)


@pytest.mark.parametrize(
    ("fields", "headers", "query"),
    [
        ({"key": "k", "header": "X-Key"}, {"X-Key": "k"}, {}),
        (
            {"key": "k", "header": "Authorization", "prefix": "Bearer "},
            {"Authorization": "Bearer k"},
            {},
        ),
        ({"key": "k", "query_parameter": "api_key"}, {}, {"api_key": "k"}),
    ],
)  # fmt: skip
def test_api_key_material(
    fields: dict[str, Any], headers: dict[str, str], query: dict[str, str]
) -> None:
    checked = credentials.validate(Credential(Kind.API_KEY, fields))
    assert credentials.static_material(checked) == ("k", headers, query)


def test_bearer_scheme_is_normalised() -> None:
    assert credentials.bearer_headers("bearer", "t") == {"Authorization": "Bearer t"}
    assert credentials.bearer_headers("MAC", "t") == {"Authorization": "MAC t"}
