"""Credentials beyond the authorization code: key pairs (made once per session, RSA is slow
on a busy machine), a service-account file, and Credential messages."""

from __future__ import annotations

import json
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.protobuf import json_format

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.helpers.fakes import FakeAuthServer
from tests.helpers.settings import ADMIN


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


def minted_credential(kind: str, fake: FakeAuthServer) -> pb.Credential:
    if kind == "client_credentials":
        return credential(
            kind, client_id=fake.client_id, client_secret=fake.client_secret, scopes=["read"]
        )
    if kind == "service_account":
        return credential(kind, json_key=service_account_json(), scopes=["read"])
    return credential(kind, app_id="42", private_key=APP_KEY, installation_id="1001")


async def store_credential(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    cred: pb.Credential,
    provider: str = "acme",
    user: str = "user-1",
) -> pb.Integration:
    response = await stub.StoreIntegration(
        pb.StoreIntegrationRequest(user_id=user, provider=provider, credential=cred),
        metadata=ADMIN,
    )
    return response.integration
