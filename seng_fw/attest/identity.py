"""What attestation yields: an enclave identity, or a rejection naming the failed check.

Every evidence format (EPID/IAS today, DCAP later) plugs in behind `EvidenceVerifier`:
client certificate in, `EnclaveIdentity` out, or `AttestationRejected` raised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol


class AttestationRejected(Exception):
    """Evidence is not trusted. `check` is a stable machine-readable name of the failed check
    (used as a metric label and in logs); the message says what was wrong."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"{check}: {message}")
        self.check = check
        self.message = message


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

    def verify_certificate(self, cert_der: bytes, at: datetime | None = None) -> EnclaveIdentity:
        ...
