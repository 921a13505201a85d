"""A throwaway PKI made with ``cryptography``: CAs, a server certificate and client
certificates whose SANs are callers' identities; and a broker configured to use them."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.config import Settings
from broker.server.callers import hash_token
from tests.helpers.settings import ADMIN_TOKEN, make_settings

RUNNER_IDENTITY = "workflow-runner.internal"


SPIFFE_IDENTITY = "spiffe://broker.test/ns/jobs/sa/reporter"


MAILER_IDENTITY = "mailer@broker.test"


@dataclass
class Pem:
    cert: bytes
    key: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class Authority:
    def __init__(self, name: str) -> None:
        self.key = _key()
        now = datetime.now(UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.name = subject
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self, common_name: str, sans: list[x509.GeneralName] | None, *, server: bool = False
    ) -> Pem:
        """``sans`` None: a certificate without the SAN extension (its only name the CN)."""
        key = _key()
        now = datetime.now(UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if sans is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = (
            builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


@dataclass
class Pki:
    ca: Authority
    other_ca: Authority
    server: Pem
    runner: Pem  # DNS SAN workflow-runner.internal
    spiffe: Pem  # URI SAN only
    stranger: Pem  # from the right CA, an identity nobody configured
    impostor: Pem  # the runner's identity, signed by another CA
    # The runner's DNS identity everywhere but in a DNS SAN: the CN (no SAN at all, or
    # beside another DNS SAN), an email SAN, a URI SAN.
    lookalikes: dict[str, Pem]
    mailer: Pem  # email SAN mailer@broker.test
    files: dict[str, Path]


def make_pki(directory: Path) -> Pki:
    """A CA, another CA, and the server's and callers' certificates; the server's files and
    the CA's in ``directory``."""
    ca = Authority("Broker Test CA")
    other = Authority("Somebody Else's CA")
    server = ca.issue(
        "broker.test",
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("127.0.0.2")),
        ],
        server=True,
    )
    files = {
        "ca": directory / "ca.pem",
        "cert": directory / "server.pem",
        "key": directory / "server.key",
    }
    files["ca"].write_bytes(ca.pem)
    files["cert"].write_bytes(server.cert)
    files["key"].write_bytes(server.key)
    files["key"].chmod(0o600)
    return Pki(
        ca=ca,
        other_ca=other,
        server=server,
        runner=ca.issue("runner", [x509.DNSName(RUNNER_IDENTITY)]),
        spiffe=ca.issue("reporter", [x509.UniformResourceIdentifier(SPIFFE_IDENTITY)]),
        stranger=ca.issue("stranger", [x509.DNSName("stranger.internal")]),
        impostor=other.issue("runner", [x509.DNSName(RUNNER_IDENTITY)]),
        lookalikes={
            "cn-only": ca.issue(RUNNER_IDENTITY, None),
            "cn-beside-dns": ca.issue(RUNNER_IDENTITY, [x509.DNSName("other.internal")]),
            "email": ca.issue("x", [x509.RFC822Name(RUNNER_IDENTITY)]),
            "uri": ca.issue("x", [x509.UniformResourceIdentifier(RUNNER_IDENTITY)]),
        },
        mailer=ca.issue("mailer", [x509.RFC822Name(MAILER_IDENTITY)]),
        files=files,
    )


def tls_callers() -> dict[str, Any]:
    return {
        "admin": {"token_sha256": hash_token(ADMIN_TOKEN)},
        "workflow-runner": {
            "tls_identity": RUNNER_IDENTITY,
            "methods": ["GetAccessToken", "GetIntegration"],
            "providers": ["twitter"],
        },
        "reporter": {"tls_identity": SPIFFE_IDENTITY, "methods": ["ListIntegrations"]},
        # Other SAN types only when named so.
        "mailer": {"tls_identity": f"email:{MAILER_IDENTITY}", "methods": ["ListIntegrations"]},
    }


def tls_settings(database_url: str, pki: Pki) -> Settings:
    """A broker on TLS that wants a client certificate from ``pki``'s CA."""
    return make_settings(
        database_url,
        tls={
            "cert_file": str(pki.files["cert"]),
            "key_file": str(pki.files["key"]),
            "client_ca_file": str(pki.files["ca"]),
        },
        callers=tls_callers(),
    )
