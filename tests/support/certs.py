"""Self-signed test certificates like SENG's (RA-TLS clients, pinned gateway server)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Identity:
    cert_pem: bytes
    key_pem: bytes
    cert_der: bytes


def make_identity(kind: str, cn: str, extra_bytes: int = 0) -> Identity:
    """Self-signed certificate like SENG's (RA-TLS clients, pinned server)."""
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if kind.startswith("rsa"):
        key = rsa.generate_private_key(65537, int(kind[3:]))
    else:
        key = ec.generate_private_key(
            {"p256": ec.SECP256R1(), "p384": ec.SECP384R1(), "p521": ec.SECP521R1()}[kind]
        )
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
    )
    if extra_bytes:
        # Stand-in for the RA-TLS attestation extensions (several KiB in real life).
        oid = x509.ObjectIdentifier("1.2.840.113741.1337.2")
        builder = builder.add_extension(
            x509.UnrecognizedExtension(oid, b"\x42" * extra_bytes), critical=False
        )
    cert = builder.sign(key, hashes.SHA256())
    return Identity(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        cert.public_bytes(serialization.Encoding.DER),
    )
