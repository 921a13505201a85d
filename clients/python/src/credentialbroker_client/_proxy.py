"""``proxy()``: the broker calls the provider's API for you, with the integration's credential,
which never reaches this process. Arguments in, a small response object out."""

from __future__ import annotations

import json as jsonlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Required

from credentialbroker_client._proto.credentialbroker.v1 import broker_pb2
from credentialbroker_client._requests import _Selector

# Methods whose replay cannot do twice what was done once (RFC 9110 §9.2.2): only these are
# retried when the broker answers UNAVAILABLE (a POST may have reached the provider).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class ProxyArgs(_Selector, total=False):
    path: Required[str]  # relative to the provider's API base, e.g. "/v1/users/me"
    method: str  # default GET
    query: Mapping[str, str] | Sequence[tuple[str, str]]
    # HTTP headers for the provider (``headers`` is the broker call's own gRPC metadata).
    request_headers: Mapping[str, str]
    body: bytes | str
    json: Any  # sent as the body, with Content-Type: application/json
    api_host: str  # one of the provider's other API hosts (providers.NAME.api_hosts)


@dataclass(frozen=True)
class ProxyResponse:
    """The provider's answer: ``status``, ``headers`` (lower-case names), ``body``; and whether
    the broker ``refreshed`` the token for it."""

    status: int
    headers: dict[str, str]
    body: bytes = field(repr=False)
    refreshed: bool = False

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return jsonlib.loads(self.body)


def proxy_request(fields: dict[str, Any]) -> dict[str, Any]:
    """ProxyArgs (without the call options) → the ProxyRequest's fields."""
    fields = dict(fields)
    fields["method"] = str(fields.get("method") or "GET").upper()
    if "json" in fields:
        if "body" in fields:
            raise TypeError("give body or json, not both")
        fields["body"] = jsonlib.dumps(fields.pop("json")).encode()
        headers = dict(fields.get("request_headers") or {})
        if not any(name.lower() == "content-type" for name in headers):
            headers["Content-Type"] = "application/json"
        fields["request_headers"] = headers
    if isinstance(fields.get("body"), str):
        fields["body"] = fields["body"].encode()
    query = fields.get("query")
    if query is not None:
        pairs = query.items() if isinstance(query, Mapping) else query
        fields["query"] = [broker_pb2.QueryParameter(name=k, value=v) for k, v in pairs]
    return fields


def proxy_response(message: broker_pb2.ProxyResponse) -> ProxyResponse:
    return ProxyResponse(
        status=message.status,
        headers=dict(message.headers),
        body=message.body,
        refreshed=message.refreshed,
    )
