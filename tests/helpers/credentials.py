"""Credentials beyond the authorization code: key pairs (made once per session, RSA is slow
on a busy machine), a service-account file, and Credential messages."""

from __future__ import annotations

import json
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.protobuf import json_format

from broker.api.credentialbroker.v1 import broker_pb2 as pb


def keypair(curve: bool = False) -> tuple[str, str]:
    """(private PEM, public PEM): RSA 2048, or EC P-256 when ``curve``."""
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
        ec.generate_private_key(ec.SECP256R1())
        if curve
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


# Generating RSA keys is slow on a busy machine: once per test session.
SA_KEY, SA_PUBLIC = keypair()


APP_KEY, APP_PUBLIC = keypair()


EC_KEY, EC_PUBLIC = keypair(curve=True)


OTHER_KEY, _ = keypair()


SA_EMAIL = "robot@project.iam.gserviceaccount.com"


def credential(kind: str, **fields: Any) -> pb.Credential:
    message = pb.Credential()
    getattr(message, kind).SetInParent()
    json_format.ParseDict(fields, getattr(message, kind))
    return message


def service_account_json() -> str:
    return json.dumps(
        {
            "type": "service_account",
            "project_id": "project",
            "private_key_id": "kid-1",
            "private_key": SA_KEY,
            "client_email": SA_EMAIL,
            "client_id": "1234",
            "token_uri": "https://oauth2.googleapis.com/token",
        }
    )
