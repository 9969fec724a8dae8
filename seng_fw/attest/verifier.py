"""`IasVerifier`: the EPID/IAS `EvidenceVerifier` for sgx-ra-tls client certificates.

    roots = load_root_certificates([Path("intel-ias-root.pem").read_bytes()])
    verifier = IasVerifier(AttestationPolicy(roots=roots, allowed_statuses=frozenset({"OK"})))
    identity = verifier.verify_certificate(client_cert_der)  # or raises AttestationRejected

Checks, in order: certificate structure and extensions (leaf only); the report-signing
certificate is issued by a configured root, both valid at `at`; the report signature; report
fields and quote body; report version, quote status, age and DEBUG against the policy; the
IAS CA certificate sent by the client is a configured root; REPORTDATA binds the
certificate's key.
"""

from __future__ import annotations

from datetime import datetime

from cryptography.hazmat.primitives import serialization

from seng_fw.attest.ias import verify_ias_report
from seng_fw.attest.identity import AttestationRejected, Check, EnclaveIdentity
from seng_fw.attest.policy import (
    ACCEPTABLE_STATUSES,
    DEFAULT_MAX_AGE,
    AttestationPolicy,
    load_root_certificates,
)
from seng_fw.attest.ratls import check_key_binding, parse_ratls_certificate

__all__ = [
    "ACCEPTABLE_STATUSES",
    "DEFAULT_MAX_AGE",
    "AttestationPolicy",
    "IasVerifier",
    "load_root_certificates",
]


class IasVerifier:
    """Verifies sgx-ra-tls (EPID/IAS) client certificates and bare IAS reports."""

    def __init__(self, policy: AttestationPolicy) -> None:
        self.policy = policy
        self._root_ders = frozenset(
            root.public_bytes(serialization.Encoding.DER) for root in policy.roots
        )

    def verify_certificate(self, cert_der: bytes, at: datetime | None = None) -> EnclaveIdentity:
        """Verify the leaf client certificate `cert_der`, judged as of `at` (default now)."""
        evidence = parse_ratls_certificate(cert_der)
        identity = verify_ias_report(
            evidence.report, evidence.signature, evidence.signing_cert, self.policy, at
        )
        # The client also sends the CA certificate (.3). It is never trusted for what it is:
        # trust comes from the configured roots. Anything but a configured root there means
        # the client was built for another trust anchor, and is refused (fail closed).
        if evidence.ca_cert.public_bytes(serialization.Encoding.DER) not in self._root_ders:
            raise AttestationRejected(
                Check.CA_CERT_MISMATCH,
                "the IAS CA certificate in the client certificate is not a configured root",
            )
        check_key_binding(evidence.public_key, identity.report_data)
        return identity
