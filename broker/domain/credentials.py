"""Credential kinds beyond the authorization code: validation at StoreIntegration,
the encrypted form of a credential, and the headers GetAccessToken hands out for each kind.

A credential is stored as one JSON object in the ``credential_ct`` column, AES-GCM encrypted
and bound to environment, row and column like the tokens. Static kinds (API key, Basic) are
served from it as they are; minted kinds (client credentials, service account, GitHub App
installation) keep their minted access token in ``access_token_ct`` and are renewed by the
refresh engine, which calls ``broker.providers.mint``.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker import egress
from broker.domain import validation
from broker.errors import InvalidArgument
from broker.model import Credential, Kind
from broker.providers.profile import ProviderProfile

# The column name bound into the credential's associated data.
CREDENTIAL = "credential"

# RFC 9110 field-name (token) and query parameter names a runner can apply safely.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
_PARAM_NAME = re.compile(r"[A-Za-z0-9_.~-]{1,128}")
_AUTH_METHODS = ("client_secret_basic", "client_secret_post")
_MAX_KEY = 16 * 1024
# Curves PyJWT signs with, by the algorithm name JWS gives them (RFC 7518 §3.4).
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}

TOKEN_TYPES = {Kind.API_KEY: "ApiKey", Kind.BASIC: "Basic"}


def token_type(kind: Kind) -> str:
    return TOKEN_TYPES.get(kind, "Bearer")


# -- validation ----------------------------------------------------------------------------


def validate(credential: Credential, profile: ProviderProfile | None = None) -> Credential:
    """The credential with its fields checked and normalised; InvalidArgument names the field.

    With the provider's ``profile``, a token endpoint the credential names must be one the
    operator configured for that provider (the broker mints at it again and again, with the
    credential's secret: a caller must not choose it). Without one (a bare check), the mint
    refuses an unlisted endpoint instead."""
    check = _VALIDATORS[credential.kind]
    where = f"credential.{credential.kind.value}"
    fields = check(where, dict(credential.fields), profile)
    if (
        profile is not None
        and credential.kind in (Kind.CLIENT_CREDENTIALS, Kind.SERVICE_ACCOUNT)
        and not (fields["token_url"] or profile.token_url)
    ):
        raise InvalidArgument(
            f"{where}.token_url", f"is required: provider {profile.name!r} has no token_url"
        )
    return Credential(credential.kind, fields)


def _secret(where: str, fields: Mapping[str, Any], name: str, limit: int = _MAX_KEY) -> str:
    value = str(fields.get(name) or "")
    field = f"{where}.{name}"
    if not value:
        raise InvalidArgument(field, "is required")
    if len(value.encode()) > limit:
        raise InvalidArgument(field, f"is larger than {limit // 1024} KiB")
    return value


def _plain(where: str, fields: Mapping[str, Any], name: str, *, required: bool = False) -> str:
    value = str(fields.get(name) or "")
    return validation.text(f"{where}.{name}", value, validation.MAX_ID, required=required)


def _url(where: str, fields: Mapping[str, Any], name: str, field: str = "") -> str:
    value = _plain(where, fields, name)
    problem = egress.problem(value) if value else None
    if problem is not None:
        raise InvalidArgument(field or f"{where}.{name}", problem)
    return value


def _token_url(
    where: str,
    fields: Mapping[str, Any],
    profile: ProviderProfile | None,
    *,
    key_file: bool = False,
) -> str:
    """The credential's own token endpoint, if the provider allows it ("" for none)."""
    field = f"{where}.json_key.token_uri" if key_file else f"{where}.token_url"
    value = _url(where, fields, "token_url", field)
    if not value or profile is None or profile.allows_token_url(value):
        return value
    if key_file and profile.token_url:
        # A key file names its issuer's endpoint whether or not this provider uses it: the
        # profile's endpoint serves it, as it always has. Never the file's unlisted one.
        return ""
    raise InvalidArgument(
        field,
        f"is not a token endpoint of provider {profile.name!r}: only providers.{profile.name}."
        f"token_url and the URLs in providers.{profile.name}.allowed_token_urls are (the "
        "operator chooses where the broker sends credentials)",
    )


def _api_key(where: str, f: dict[str, Any], _profile: ProviderProfile | None) -> dict[str, Any]:
    key = _secret(where, f, "key")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise InvalidArgument(f"{where}.key", "must not contain control characters")
    header = str(f.get("header") or "")
    param = str(f.get("query_parameter") or "")
    if bool(header) == bool(param):
        raise InvalidArgument(f"{where}.header", "give header or query_parameter (exactly one)")
    if header and not _HEADER_NAME.fullmatch(header):
        raise InvalidArgument(f"{where}.header", "is not a valid HTTP header name")
    if param and not _PARAM_NAME.fullmatch(param):
        raise InvalidArgument(
            f"{where}.query_parameter", "may contain letters, digits, '_', '.', '~' and '-'"
        )
    prefix = validation.text(f"{where}.prefix", str(f.get("prefix") or ""), 64, required=False)
    return {"key": key, "header": header, "query_parameter": param, "prefix": prefix}


def _basic(where: str, f: dict[str, Any], _profile: ProviderProfile | None) -> dict[str, Any]:
    username = _secret(where, f, "username", 1024)
    if ":" in username:
        raise InvalidArgument(f"{where}.username", "must not contain ':' (RFC 7617)")
    password = str(f.get("password") or "")
    if len(password.encode()) > _MAX_KEY:
        raise InvalidArgument(f"{where}.password", "is larger than 16 KiB")
    for name, value in (("username", username), ("password", password)):
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise InvalidArgument(f"{where}.{name}", "must not contain control characters")
    return {"username": username, "password": password}


def _client_credentials(
    where: str, f: dict[str, Any], profile: ProviderProfile | None
) -> dict[str, Any]:
    auth_method = str(f.get("auth_method") or "")
    if auth_method and auth_method not in _AUTH_METHODS:
        raise InvalidArgument(f"{where}.auth_method", f"must be one of {', '.join(_AUTH_METHODS)}")
    return {
        "client_id": _plain(where, f, "client_id", required=True),
        "client_secret": _secret(where, f, "client_secret"),
        "scopes": list(validation.scopes(f"{where}.scopes", list(f.get("scopes") or ()))),
        "audience": _plain(where, f, "audience"),
        "resource": _url(where, f, "resource") if f.get("resource") else "",
        "token_url": _token_url(where, f, profile),
        "auth_method": auth_method,
    }


def _service_account(
    where: str, f: dict[str, Any], profile: ProviderProfile | None
) -> dict[str, Any]:
    key_file = False
    if f.get("json_key"):
        # Google's service-account key file, as downloaded; explicit fields win over it.
        try:
            key_file_fields = json.loads(str(f["json_key"]))
        except ValueError:
            raise InvalidArgument(f"{where}.json_key", "is not JSON") from None
        if (
            not isinstance(key_file_fields, dict)
            or key_file_fields.get("type") != "service_account"
        ):
            raise InvalidArgument(
                f"{where}.json_key", 'is not a service account key ("type": "service_account")'
            )
        given = {k: v for k, v in f.items() if v and k != "json_key"}
        key_file = "token_url" not in given and bool(key_file_fields.get("token_uri"))
        f = {
            "private_key": key_file_fields.get("private_key"),
            "key_id": key_file_fields.get("private_key_id"),
            "issuer": key_file_fields.get("client_email"),
            "token_url": key_file_fields.get("token_uri"),
            **given,
        }
    pem = _secret(where, f, "private_key")
    return {
        "private_key": pem,
        "algorithm": signing_algorithm(f"{where}.private_key", pem),
        "key_id": _plain(where, f, "key_id"),
        "issuer": _plain(where, f, "issuer", required=True),
        "subject": _plain(where, f, "subject"),
        "scopes": list(validation.scopes(f"{where}.scopes", list(f.get("scopes") or ()))),
        "token_url": _token_url(where, f, profile, key_file=key_file),
        "audience": _plain(where, f, "audience"),
    }


def _github_app_installation(
    where: str, f: dict[str, Any], _profile: ProviderProfile | None
) -> dict[str, Any]:
    app_id = _plain(where, f, "app_id", required=True)
    installation_id = _plain(where, f, "installation_id", required=True)
    if not installation_id.isdigit():
        raise InvalidArgument(f"{where}.installation_id", "must be a number")
    pem = _secret(where, f, "private_key")
    algorithm = signing_algorithm(f"{where}.private_key", pem)
    if algorithm != "RS256":
        raise InvalidArgument(f"{where}.private_key", "GitHub Apps sign with RSA keys (RS256)")
    repositories = [
        validation.text(f"{where}.repositories", str(r), validation.MAX_ID)
        for r in f.get("repositories") or ()
    ]
    permissions = {
        validation.text(f"{where}.permissions", str(k), 64): validation.text(
            f"{where}.permissions", str(v), 64
        )
        for k, v in dict(f.get("permissions") or {}).items()
    }
    return {
        "app_id": app_id,
        "installation_id": installation_id,
        "private_key": pem,
        "algorithm": algorithm,
        "repositories": repositories,
        "permissions": permissions,
    }


def signing_algorithm(field: str, pem: str) -> str:
    """RS256 for an RSA key, ES256/384/512 for an EC key; the key itself never in the error."""
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidArgument(
            field, "is not an unencrypted PEM private key (PKCS#8 or PKCS#1)"
        ) from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise InvalidArgument(field, "RSA keys must have at least 2048 bits")
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _EC_ALGORITHMS:
        return _EC_ALGORITHMS[key.curve.name]
    raise InvalidArgument(field, "must be an RSA or an EC (P-256, P-384, P-521) private key")


_VALIDATORS = {
    Kind.API_KEY: _api_key,
    Kind.BASIC: _basic,
    Kind.CLIENT_CREDENTIALS: _client_credentials,
    Kind.SERVICE_ACCOUNT: _service_account,
    Kind.GITHUB_APP_INSTALLATION: _github_app_installation,
}


def requested_scopes(credential: Credential) -> tuple[str, ...]:
    return tuple(credential.fields.get("scopes") or ())


# -- stored form ---------------------------------------------------------------------------


def dump(credential: Credential) -> str:
    return json.dumps(credential.fields, separators=(",", ":"), sort_keys=True)


def load(kind: Kind, plaintext: str) -> Credential:
    return Credential(kind, json.loads(plaintext))


# -- what GetAccessToken hands out -----------------------------------------------------------


def bearer_headers(token_type: str, access_token: str) -> dict[str, str]:
    scheme = "Bearer" if token_type.lower() == "bearer" else token_type
    return {"Authorization": f"{scheme} {access_token}"}


def static_material(credential: Credential) -> tuple[str, dict[str, str], dict[str, str]]:
    """(access_token, headers, query) for a kind served as stored."""
    f = credential.fields
    if credential.kind is Kind.BASIC:
        pair = f"{f['username']}:{f['password']}".encode()
        return "", {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}, {}
    value = f["prefix"] + f["key"]
    if f["header"]:
        return f["key"], {f["header"]: value}, {}
    return f["key"], {}, {f["query_parameter"]: value}
