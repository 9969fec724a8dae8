"""What attestation yields: an enclave identity, or a rejection naming the failed check.

Every evidence format (EPID/IAS, DCAP) plugs in behind `EvidenceVerifier`:
client certificate in, `EnclaveIdentity` out, or `AttestationRejected` raised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol


class AttestationRejected(Exception):
    """Evidence is not trusted. `check` is a stable machine-readable name of the failed check
    (used as a metric label and in logs); the message says what was wrong."""

    def __init__(self, check: Check, message: str) -> None:
        super().__init__(f"{check}: {message}")
        self.check = check
        self.message = message


class Check(StrEnum):
    """Stable names of the checks that can reject evidence (`AttestationRejected.check`).

    A `StrEnum`, so `exc.check == "bad_signature"` holds and the names serialise as plain text.
    """

    # The client certificate itself.
    MALFORMED_CERTIFICATE = "malformed_certificate"
    DUPLICATE_EXTENSION = "duplicate_extension"
    UNKNOWN_CRITICAL_EXTENSION = "unknown_critical_extension"
    MISSING_EXTENSION = "missing_extension"
    MALFORMED_EXTENSION = "malformed_extension"
    CERT_SIGNATURE = "cert_signature"
    UNSUPPORTED_KEY = "unsupported_key"
    # The report-signing certificate and its trust anchor.
    MALFORMED_SIGNING_CERT = "malformed_signing_cert"
    UNTRUSTED_ROOT = "untrusted_root"
    CA_CERT_MISMATCH = "ca_cert_mismatch"
    ROOT_EXPIRED = "root_expired"
    ROOT_NOT_YET_VALID = "root_not_yet_valid"
    SIGNING_CERT_EXPIRED = "signing_cert_expired"
    SIGNING_CERT_NOT_YET_VALID = "signing_cert_not_yet_valid"
    # The attestation verification report.
    BAD_SIGNATURE = "bad_signature"
    MALFORMED_REPORT = "malformed_report"
    REPORT_VERSION = "report_version"
    QUOTE_STATUS = "quote_status"
    REPORT_TOO_OLD = "report_too_old"
    REPORT_IN_FUTURE = "report_in_future"
    # The quote body and what it attests.
    MALFORMED_QUOTE = "malformed_quote"
    DEBUG_ENCLAVE = "debug_enclave"
    REPORT_DATA_MISMATCH = "report_data_mismatch"
    # Which evidence the certificate carries (seng_fw.attest.dcap.AnyEvidenceVerifier).
    MULTIPLE_EVIDENCE_FORMATS = "multiple_evidence_formats"
    EVIDENCE_FORMAT_NOT_ALLOWED = "evidence_format_not_allowed"
    # DCAP (ECDSA) quotes, their PCK chain and collateral.
    UNSUPPORTED_QUOTE = "unsupported_quote"
    QUOTE_SIGNATURE = "quote_signature"
    QE_REPORT_SIGNATURE = "qe_report_signature"
    ATTESTATION_KEY_NOT_BOUND = "attestation_key_not_bound"
    QE_IDENTITY = "qe_identity"
    CERT_REVOKED = "cert_revoked"
    CERT_EXPIRED = "cert_expired"
    PCK_CERT_MISMATCH = "pck_cert_mismatch"
    NO_COLLATERAL = "no_collateral"
    COLLATERAL_INVALID = "collateral_invalid"
    COLLATERAL_EXPIRED = "collateral_expired"
    COLLATERAL_NOT_YET_VALID = "collateral_not_yet_valid"
    TCB_STATUS = "tcb_status"
    ADVISORY_REFUSED = "advisory_refused"
    DCAP_VERIFICATION = "dcap_verification"


@dataclass(frozen=True)
class EnclaveIdentity:
    """The attested identity of an enclave; independent of the host it runs on."""

    mrenclave: bytes
    mrsigner: bytes
    isv_prod_id: int
    isv_svn: int
    debug: bool
    quote_status: str
    timestamp: datetime
    report_data: bytes
    # Advisory IDs the attestation service listed (e.g. INTEL-SA-00334); empty when none.
    advisory_ids: tuple[str, ...] = field(default=())
    # "epid" (IAS report) or "dcap" (ECDSA quote with collateral).
    evidence: str = "epid"
    # DCAP only: the platform's TCB status (as quote_status), its FMSPC (hex) and when the
    # collateral used to judge it stops being valid.
    fmspc: str | None = None
    collateral_expires: datetime | None = None

    @property
    def tcb_status(self) -> str | None:
        return self.quote_status if self.evidence == "dcap" else None

    def to_json(self) -> dict[str, Any]:
        return {
            "mrenclave": self.mrenclave.hex(),
            "mrsigner": self.mrsigner.hex(),
            "isv_prod_id": self.isv_prod_id,
            "isv_svn": self.isv_svn,
            "debug": self.debug,
            "quote_status": self.quote_status,
            "report_data": self.report_data.hex(),
            "timestamp": self.timestamp.isoformat(),
            "advisory_ids": list(self.advisory_ids),
            "evidence": self.evidence,
            "tcb_status": self.tcb_status,
            "fmspc": self.fmspc,
            "collateral_expires": None
            if self.collateral_expires is None
            else self.collateral_expires.isoformat(),
        }


class EvidenceVerifier(Protocol):
    """Turns a DER client certificate into an identity, judged as of `at` (timezone-aware)."""

    def verify_certificate(
        self, cert_der: bytes, at: datetime | None = None
    ) -> EnclaveIdentity: ...
