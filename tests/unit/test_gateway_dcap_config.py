"""gateway.yaml's attestation.dcap and attestation.refuse_advisories, and the verifier
`seng-fw serve` builds from them (EPID only, or EPID and DCAP behind one dispatcher)."""

from __future__ import annotations

from pathlib import Path

import pytest

from seng_fw.attest.dcap import AnyEvidenceVerifier
from seng_fw.attest.identity import AttestationRejected, Check
from seng_fw.attest.verifier import IasVerifier
from seng_fw.cli import UsageError
from seng_fw.gateway.config import load_gateway_config
from seng_fw.lab.ca import LabCA
from seng_fw.lab.dcap import LabDcapCA
from seng_fw.ops.serve import build_verifier
from seng_fw.policy.yamlfile import ConfigError

IDS = {"mrenclave": b"\x01" * 32, "mrsigner": b"\x02" * 32}


@pytest.fixture(scope="module")
def labs(tmp_path_factory: pytest.TempPathFactory) -> tuple[LabCA, LabDcapCA, Path]:
    directory = tmp_path_factory.mktemp("gateway")
    epid = LabCA.generate()
    dcap = LabDcapCA.generate()
    (directory / "ias-root.pem").write_bytes(epid.root_pem)
    (directory / "sgx-root.pem").write_bytes(dcap.root_pem)
    (directory / "collateral").mkdir()
    (directory / "collateral" / "lab.json").write_text(dcap.collateral_json())
    return epid, dcap, directory


def write_config(directory: Path, attestation: str) -> Path:
    path = directory / "gateway.yaml"
    path.write_text(
        "tls: {certificate: server.pem, key: server.key}\n"
        f"attestation:\n{attestation}"
        "policy: policy.yaml\n"
    )
    return path


def test_dcap_configured(labs: tuple[LabCA, LabDcapCA, Path]) -> None:
    epid, dcap, directory = labs
    path = write_config(
        directory,
        "  roots: [ias-root.pem]\n"
        "  refuse_advisories: [INTEL-SA-00828]\n"
        "  dcap:\n"
        "    roots: [sgx-root.pem]\n"
        "    collateral: [collateral]\n"
        "    allow_status: [UpToDate, ConfigurationNeeded, OutOfDate]\n",
    )
    config = load_gateway_config(path)
    assert config.attestation.dcap is not None
    assert config.attestation.dcap.collateral == [directory / "collateral"]  # made absolute
    verifier = build_verifier(config)
    assert isinstance(verifier, AnyEvidenceVerifier)
    assert verifier.verify_certificate(epid.issue_enclave_cert(**IDS).cert_der).evidence == "epid"
    for layout in ("sgx-ra-tls", "gramine"):
        enclave = dcap.issue_enclave_cert(**IDS, layout=layout, tcb_status="ConfigurationNeeded")
        assert verifier.verify_certificate(enclave.cert_der).tcb_status == "ConfigurationNeeded"
    # OutOfDate is allowed, but the lab level names INTEL-SA-00828, which is refused.
    enclave = dcap.issue_enclave_cert(**IDS, tcb_status="OutOfDate")
    with pytest.raises(AttestationRejected) as info:
        verifier.verify_certificate(enclave.cert_der)
    assert info.value.check == Check.ADVISORY_REFUSED
    # Not allowed: SWHardeningNeeded.
    enclave = dcap.issue_enclave_cert(**IDS, tcb_status="SWHardeningNeeded")
    with pytest.raises(AttestationRejected) as info:
        verifier.verify_certificate(enclave.cert_der)
    assert info.value.check == Check.TCB_STATUS


def test_without_dcap_the_gateway_stays_epid_only(labs: tuple[LabCA, LabDcapCA, Path]) -> None:
    _, _, directory = labs
    config = load_gateway_config(write_config(directory, "  roots: [ias-root.pem]\n"))
    assert isinstance(build_verifier(config), IasVerifier)


def test_bad_dcap_configuration(labs: tuple[LabCA, LabDcapCA, Path]) -> None:
    _, _, directory = labs
    dcap = "  roots: [ias-root.pem]\n  dcap:\n    roots: [sgx-root.pem]\n"
    with pytest.raises(ConfigError, match="collateral"):  # collateral is required
        load_gateway_config(write_config(directory, dcap))
    with pytest.raises(ConfigError, match="Revoked"):
        load_gateway_config(
            write_config(
                directory, dcap + "    collateral: [collateral]\n    allow_status: [Revoked]\n"
            )
        )
    config = load_gateway_config(write_config(directory, dcap + "    collateral: [missing.json]\n"))
    with pytest.raises(UsageError, match=r"attestation\.dcap"):
        build_verifier(config)
