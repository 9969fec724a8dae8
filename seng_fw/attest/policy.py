"""What the gateway accepts as attestation evidence: trust anchors and report policy."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta

from cryptography import x509

# IAS quote statuses that describe a genuine enclave on a platform that lacks updates or
# configuration. They may be accepted when the operator says so, and are then reported.
# Every other status (SIGNATURE_INVALID, GROUP_REVOKED, KEY_REVOKED, ...) is never acceptable.
STATUS_OK = "OK"
ACCEPTABLE_STATUSES = frozenset(
    {
        STATUS_OK,
        "GROUP_OUT_OF_DATE",
        "CONFIGURATION_NEEDED",
        "SW_HARDENING_NEEDED",
        "CONFIGURATION_AND_SW_HARDENING_NEEDED",
    }
)

# SENG clients fetch their IAS report once, when the enclave starts, and present it on every
# (re)connection; a day bounds how long a revoked platform keeps getting in while letting a
# client reconnect during a working day. Operators tune it (CLI --max-age, None = unchecked).
DEFAULT_MAX_AGE = timedelta(hours=24)


@dataclass(frozen=True)
class AttestationPolicy:
    """Trust anchors (one or more root CA certificates) and what reports must satisfy."""

    roots: tuple[x509.Certificate, ...]
    allowed_statuses: frozenset[str] = field(default=frozenset({STATUS_OK}))
    allow_debug: bool = False
    max_age: timedelta | None = DEFAULT_MAX_AGE

    def __post_init__(self) -> None:
        # Configuration mistakes are programming/usage errors (ValueError), not rejections.
        if not self.roots:
            raise ValueError("at least one trust anchor (root certificate) is required")
        for root in self.roots:
            check_is_ca(root)
        unknown = self.allowed_statuses - ACCEPTABLE_STATUSES
        if unknown:
            raise ValueError(
                f"quote status(es) {', '.join(sorted(unknown))} can never be accepted; "
                f"choose from {', '.join(sorted(ACCEPTABLE_STATUSES))}"
            )
        if self.max_age is not None and self.max_age <= timedelta(0):
            raise ValueError("max_age must be positive (or None to skip the age check)")


def load_root_certificates(pem_blobs: Iterable[bytes]) -> tuple[x509.Certificate, ...]:
    """Parse PEM data (each blob may hold several certificates) into trust anchors."""
    roots: list[x509.Certificate] = []
    for blob in pem_blobs:
        certs = x509.load_pem_x509_certificates(blob)  # raises ValueError when there is none
        roots.extend(certs)
    return tuple(roots)


def check_is_ca(cert: x509.Certificate) -> None:
    subject = cert.subject.rfc4514_string()
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise ValueError(f"trust anchor {subject} has no basicConstraints: not a CA") from None
    if not constraints.ca:
        raise ValueError(f"trust anchor {subject} is not a CA certificate")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise ValueError(f"trust anchor {subject} may not sign certificates (keyUsage)")
