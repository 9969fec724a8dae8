"""RA-TLS client certificates in the sgx-ra-tls (EPID/IAS) format that SENG clients send.

The evidence sits in four extensions of the (self-signed) leaf certificate, under
1.2.840.113741.1337: .2 the IAS report body, .3 the IAS CA certificate, .4 the report-signing
certificate, .5 the report signature. Two value encodings exist (DESIGN.md section 2):

- 2018 (the sgx-ra-tls revision SENG pins): every value is base64 text; .2 of the JSON bytes,
  .3/.4 of the certificates' DER, .5 the X-IASReport-Signature header (base64 of the raw
  signature).
- 2019 and later: .2 is the raw JSON, .3/.4 are PEM, .5 as before.

Only the leaf certificate is ever looked at: the API takes one DER certificate, so evidence
in an issuer certificate (the Go server's weakness) cannot be picked up.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID

from seng_fw.attest.ias import b64decode_strict, load_certificate
from seng_fw.attest.identity import AttestationRejected, Check
from seng_fw.attest.quote import REPORT_DATA_SIZE

OID_IAS_REPORT = x509.ObjectIdentifier("1.2.840.113741.1337.2")
OID_IAS_CA_CERT = x509.ObjectIdentifier("1.2.840.113741.1337.3")
OID_IAS_SIGNING_CERT = x509.ObjectIdentifier("1.2.840.113741.1337.4")
OID_IAS_SIGNATURE = x509.ObjectIdentifier("1.2.840.113741.1337.5")
EVIDENCE_OIDS = (OID_IAS_REPORT, OID_IAS_CA_CERT, OID_IAS_SIGNING_CERT, OID_IAS_SIGNATURE)

# Critical extensions whose meaning we know; any other critical extension is refused (RFC 5280
# says a relying party must reject a certificate with a critical extension it does not process).
_UNDERSTOOD_CRITICAL = frozenset(
    {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        *EVIDENCE_OIDS,
    }
)

# Client keys sgx-ra-tls / SENG use: RSA-2048 by default, RSA-3072, ECDSA P-384 (USE_ECDSA), P-256.
_RSA_KEY_BITS = frozenset({2048, 3072})
_EC_CURVES = frozenset({"secp256r1", "secp384r1"})

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+-----END CERTIFICATE-----(\r?\n)?"
)

ClientPublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class EvidenceEncoding(StrEnum):
    V2018 = "2018"
    V2019 = "2019"


@dataclass(frozen=True)
class RaTlsEvidence:
    """The evidence found in an RA-TLS certificate, decoded but not yet verified."""

    encoding: EvidenceEncoding
    report: bytes  # exact JSON bytes IAS signed
    signature: bytes  # raw RSA signature
    signing_cert: x509.Certificate
    ca_cert: x509.Certificate  # sent by the client: informative only, never a trust anchor
    public_key: ClientPublicKey


def parse_ratls_certificate(cert_der: bytes) -> RaTlsEvidence:
    """Extract and decode the evidence from a DER leaf certificate (no trust decisions)."""
    cert = load_certificate(cert_der, Check.MALFORMED_CERTIFICATE)
    extensions = cert.extensions
    for ext in extensions:
        if ext.critical and ext.oid not in _UNDERSTOOD_CRITICAL:
            raise AttestationRejected(
                Check.UNKNOWN_CRITICAL_EXTENSION,
                f"unknown critical extension {ext.oid.dotted_string}",
            )
    values: dict[x509.ObjectIdentifier, bytes] = {}
    for oid in EVIDENCE_OIDS:
        try:
            value = extensions.get_extension_for_oid(oid).value
        except x509.ExtensionNotFound:
            raise AttestationRejected(
                Check.MISSING_EXTENSION, f"certificate has no extension {oid.dotted_string}"
            ) from None
        if not isinstance(value, x509.UnrecognizedExtension):  # pragma: no cover - defensive
            raise AttestationRejected(Check.MALFORMED_EXTENSION, f"odd {oid.dotted_string}")
        values[oid] = value.value

    public_key = _client_public_key(cert)
    _check_self_signed(cert)

    body = values[OID_IAS_REPORT]
    # The JSON body begins with "{", which is not a base64 character: that tells them apart.
    if body.startswith(b"{"):
        encoding = EvidenceEncoding.V2019
        report = body
        signing_cert = _load_pem_value(values[OID_IAS_SIGNING_CERT], "1337.4")
        ca_cert = _load_pem_value(values[OID_IAS_CA_CERT], "1337.3")
    else:
        encoding = EvidenceEncoding.V2018
        report = b64decode_strict(body, Check.MALFORMED_EXTENSION, wrapped=True)
        signing_cert = load_certificate(
            b64decode_strict(values[OID_IAS_SIGNING_CERT], Check.MALFORMED_EXTENSION, wrapped=True),
            Check.MALFORMED_EXTENSION,
        )
        ca_cert = load_certificate(
            b64decode_strict(values[OID_IAS_CA_CERT], Check.MALFORMED_EXTENSION, wrapped=True),
            Check.MALFORMED_EXTENSION,
        )
    signature = b64decode_strict(values[OID_IAS_SIGNATURE], Check.MALFORMED_EXTENSION)
    return RaTlsEvidence(encoding, report, signature, signing_cert, ca_cert, public_key)


def report_data_for_key(public_key: ClientPublicKey) -> bytes:
    """The 64-byte REPORTDATA sgx-ra-tls puts in the quote for this certificate key.

    SHA-256 of the PKCS#1 RSAPublicKey DER (RSA) or of the uncompressed point 04||X||Y
    (ECDSA), then 32 zero bytes.
    """
    if isinstance(public_key, rsa.RSAPublicKey):
        encoded = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.PKCS1
        )
    else:
        encoded = public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    digest = hashlib.sha256(encoded).digest()
    return digest + bytes(REPORT_DATA_SIZE - len(digest))


def check_key_binding(public_key: ClientPublicKey, report_data: bytes) -> None:
    """The quote must vouch for exactly this certificate key."""
    if not hmac.compare_digest(report_data_for_key(public_key), report_data):
        raise AttestationRejected(
            Check.REPORT_DATA_MISMATCH, "REPORTDATA does not match the certificate's public key"
        )


def encode_evidence(
    encoding: EvidenceEncoding,
    report: bytes,
    signature_b64: bytes,
    signing_cert: x509.Certificate,
    ca_cert: x509.Certificate,
) -> dict[x509.ObjectIdentifier, bytes]:
    """The four extension values for `encoding`, byte for byte as sgx-ra-tls writes them."""
    if encoding is EvidenceEncoding.V2018:
        return {
            OID_IAS_REPORT: base64.b64encode(report),
            OID_IAS_CA_CERT: base64.b64encode(ca_cert.public_bytes(serialization.Encoding.DER)),
            OID_IAS_SIGNING_CERT: base64.b64encode(
                signing_cert.public_bytes(serialization.Encoding.DER)
            ),
            OID_IAS_SIGNATURE: signature_b64,
        }
    # sgx-ra-tls copies each PEM block from "-----BEGIN" to "-----END CERTIFICATE-----",
    # without the final newline.
    return {
        OID_IAS_REPORT: report,
        OID_IAS_CA_CERT: ca_cert.public_bytes(serialization.Encoding.PEM).rstrip(b"\n"),
        OID_IAS_SIGNING_CERT: signing_cert.public_bytes(serialization.Encoding.PEM).rstrip(b"\n"),
        OID_IAS_SIGNATURE: signature_b64,
    }


def _load_pem_value(value: bytes, name: str) -> x509.Certificate:
    # Exactly one PEM certificate and nothing around it (cryptography's loader skips text
    # outside the markers, which would let junk ride along).
    if _PEM_CERT.fullmatch(value) is None:
        raise AttestationRejected(
            Check.MALFORMED_EXTENSION, f"extension {name} is not exactly one PEM certificate"
        )
    return load_certificate(value, Check.MALFORMED_EXTENSION, pem=True)


def _client_public_key(cert: x509.Certificate) -> ClientPublicKey:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise AttestationRejected(Check.UNSUPPORTED_KEY, f"unusable public key: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size not in _RSA_KEY_BITS:
            raise AttestationRejected(
                Check.UNSUPPORTED_KEY, f"RSA-{key.key_size} client keys are not accepted"
            )
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _EC_CURVES:
            raise AttestationRejected(
                Check.UNSUPPORTED_KEY, f"ECDSA on {key.curve.name} is not accepted"
            )
        return key
    raise AttestationRejected(Check.UNSUPPORTED_KEY, f"{type(key).__name__} keys are not accepted")


def _check_self_signed(cert: x509.Certificate) -> None:
    # RA-TLS certificates are self-signed; trust comes from the evidence, but a certificate
    # whose own signature does not verify is malformed and is refused.
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise AttestationRejected(
            Check.CERT_SIGNATURE, "certificate is not validly self-signed"
        ) from None
