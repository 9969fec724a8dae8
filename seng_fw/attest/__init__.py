"""Remote-attestation evidence (RA-TLS client certificates): parsing and verification."""

from seng_fw.attest.identity import AttestationRejected, Check, EnclaveIdentity, EvidenceVerifier
from seng_fw.attest.policy import AttestationPolicy, load_root_certificates
from seng_fw.attest.verifier import IasVerifier

__all__ = [
    "AttestationPolicy",
    "AttestationRejected",
    "Check",
    "EnclaveIdentity",
    "EvidenceVerifier",
    "IasVerifier",
    "load_root_certificates",
]
