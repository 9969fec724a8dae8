"""DCAP identities go through the same admission checks as EPID ones (MRENCLAVE, MRSIGNER,
ISVPRODID, ISVSVN, client host), on identities the DCAP verifier produced from lab quotes."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from seng_fw.attest.collateral import CollateralStore, parse_bundle
from seng_fw.attest.dcap import DcapPolicy, DcapVerifier
from seng_fw.attest.identity import EnclaveIdentity
from seng_fw.lab.dcap import LabDcapCA
from seng_fw.policy.admission import Admission, AdmissionRejected
from seng_fw.policy.loader import load_policy

MRENCLAVE = bytes([0xA1]) * 32
MRSIGNER = bytes([0x5E]) * 32
HOST = IPv4Address("10.77.1.5")


@pytest.fixture(scope="module")
def lab() -> tuple[LabDcapCA, DcapVerifier]:
    ca = LabDcapCA.generate()
    store = CollateralStore([parse_bundle(ca.collateral_json())])
    return ca, DcapVerifier(DcapPolicy(roots=(ca.root_cert,), collateral=store))


@pytest.fixture
def admission(tmp_path: Path) -> Admission:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "apps:\n"
        "  - name: webapp\n"
        f"    mrenclave: {MRENCLAVE.hex()}\n"
        f"    mrsigner: {MRSIGNER.hex()}\n"
        "    isv_prod_id: 7\n"
        "    min_isv_svn: 2\n"
        "    hosts: [10.77.1.0/24]\n"
    )
    return Admission(load_policy(path))


def identity(lab: tuple[LabDcapCA, DcapVerifier], **changes: object) -> EnclaveIdentity:
    ca, verifier = lab
    settings: dict[str, object] = {
        "mrenclave": MRENCLAVE,
        "mrsigner": MRSIGNER,
        "isv_prod_id": 7,
        "isv_svn": 2,
    }
    settings.update(changes)
    enclave = ca.issue_enclave_cert(**settings)  # type: ignore[arg-type]
    return verifier.verify_certificate(enclave.cert_der)


def test_dcap_identity_admitted(lab: tuple[LabDcapCA, DcapVerifier], admission: Admission) -> None:
    assert admission.admit(identity(lab), HOST).name == "webapp"


@pytest.mark.parametrize(
    ("changes", "check"),
    [
        ({"mrsigner": bytes(32)}, "mrsigner_mismatch"),
        ({"isv_prod_id": 8}, "isv_prod_id_mismatch"),
        ({"isv_svn": 1}, "isv_svn_too_low"),
    ],
)
def test_dcap_identity_refused_like_epid(
    lab: tuple[LabDcapCA, DcapVerifier],
    admission: Admission,
    changes: dict[str, object],
    check: str,
) -> None:
    with pytest.raises(AdmissionRejected) as info:
        admission.admit(identity(lab, **changes), HOST)
    assert info.value.check == check
