"""What attestation yields: an enclave identity, or a rejection naming the failed check.

Every evidence format (EPID/IAS today, DCAP later) plugs in behind `EvidenceVerifier`:
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

    def __init__(self, check: str, message: str) -> None:
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
        }


class EvidenceVerifier(Protocol):
    """Turns a DER client certificate into an identity, judged as of `at` (timezone-aware)."""

    def verify_certificate(
        self, cert_der: bytes, at: datetime | None = None
    ) -> EnclaveIdentity: ...
