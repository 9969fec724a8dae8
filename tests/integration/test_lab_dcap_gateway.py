"""DCAP-attested lab enclaves against a running gateway (namespaces, real DTLS tunnels).

The lab's gateway trusts the lab DCAP root with the lab collateral (UpToDate only) beside
the EPID lab root, so DCAP and EPID emulators meet the same gateway.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from seng_fw.lab import dcap
from seng_fw.lab.ca import generate_client_key
from seng_fw.lab.lab import (
    DEMO_WEBAPP,
    ECHO_PORT,
    GATEWAY_PORT,
    EnclaveSpec,
    Lab,
    RunningEnclave,
)
from seng_fw.lab.services import probe_tcp
from seng_fw.lab.topology import CLIENT_A, CLIENT_B

pytestmark = pytest.mark.root

WEBAPP_NET = IPv4Network("192.168.29.0/24")
POLICY = f"""\
gateway_networks: [10.77.1.0/24, 10.77.2.0/24]
apps:
  - name: webapp
    mrenclave: {DEMO_WEBAPP.hex()}
    hosts: [10.77.1.0/24]
    subnet: {{subnet: {WEBAPP_NET}}}
    egress: [{{to: 0.0.0.0/0, protocol: any}}]
"""


@pytest.fixture
def lab(ns_prefix: str, tmp_path: Path) -> Iterator[Lab]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    settings = {"timeouts": {"pairing": 3.0, "assignment_resend": 0.5, "assignment_attempts": 6}}
    with Lab(ns_prefix, tmp_path / "state", policy, gateway_settings=settings) as running:
        yield running


def _settled(lab: Lab, enclave: RunningEnclave) -> dict[str, object]:
    state = enclave.wait_settled()
    return {**state, "gateway log": lab.gateway_log.read_text()[-2000:]}


def _forwards(lab: Lab, enclave: RunningEnclave) -> bool:
    assert enclave.address is not None
    return probe_tcp(lab.ns(enclave.spec.host), enclave.address, str(lab.external), ECHO_PORT)


@pytest.mark.parametrize("layout", ["sgx-ra-tls", "gramine"])
def test_dcap_enclave_admitted_beside_an_epid_one(lab: Lab, layout: str) -> None:
    epid = lab.start_enclave(EnclaveSpec("epid", CLIENT_B, DEMO_WEBAPP))
    dcap_enclave = lab.start_enclave(
        EnclaveSpec("dcap", CLIENT_A, DEMO_WEBAPP, evidence="dcap", layout=layout)
    )
    for enclave in (epid, dcap_enclave):
        state = _settled(lab, enclave)
        assert state["status"] == "up", state
        assert _forwards(lab, enclave)
    assert lab.wait_for_log(r"admitted app=webapp .* quote_status=UpToDate")


@pytest.mark.parametrize(
    ("spec", "check"),
    [
        (EnclaveSpec("ood", CLIENT_A, DEMO_WEBAPP, evidence="dcap", tcb_status="OutOfDate"),
         "tcb_status"),
        (EnclaveSpec("swh", CLIENT_B, DEMO_WEBAPP, evidence="dcap",
                     tcb_status="SWHardeningNeeded"), "tcb_status"),
        (EnclaveSpec("other-pki", CLIENT_A, DEMO_WEBAPP, evidence="dcap", untrusted_ca=True),
         ""),
        (EnclaveSpec("debug", CLIENT_B, DEMO_WEBAPP, evidence="dcap", debug=True), ""),
    ],
    ids=["out-of-date", "sw-hardening-needed", "other-root", "debug"],
)  # fmt: skip
def test_dcap_enclave_refused(lab: Lab, spec: EnclaveSpec, check: str) -> None:
    enclave = lab.start_enclave(spec)
    state = _settled(lab, enclave)
    assert state["status"] == "refused", state
    reason = lab.rejection_reason(enclave)
    assert reason is not None, state
    assert reason.startswith(check), reason


def test_emulator_takes_its_quote_from_gramine_attestation(lab: Lab) -> None:
    """`lab enclave --quote-source gramine` against a directory imitating /dev/attestation,
    holding the quote Gramine's quoting enclave would return for the emulator's key."""
    directory = lab.state_dir / "enclaves" / "gramine"
    attestation = directory / "attestation"
    attestation.mkdir(parents=True)
    key = generate_client_key("ecdsa", 384)
    key_path = directory / "key.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    platform = dcap.LabDcapCA.load(lab.state_dir / "ca").platform()
    quote = platform.quote(
        mrenclave=DEMO_WEBAPP,
        mrsigner=bytes(32),
        report_data=dcap.gramine_report_data(key.public_key()),
    )
    (attestation / "attestation_type").write_text("dcap")
    (attestation / "user_report_data").write_bytes(bytes(64))
    (attestation / "quote").write_bytes(quote)
    state_file, log_file = directory / "state.json", directory / "enclave.log"
    with log_file.open("ab") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            ["ip", "netns", "exec", lab.ns(CLIENT_A), sys.executable, "-m", "seng_fw",
             "lab", "enclave", "--server", f"{lab.gateway_lan}:{GATEWAY_PORT}",
             "--server-cert", str(lab.state_dir / "server.pem"), "--key", str(key_path),
             "--quote-source", "gramine", "--attestation-dir", str(attestation),
             "--tun", "segr0", "--state-file", str(state_file)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    enclave = RunningEnclave(
        EnclaveSpec("gramine", CLIENT_A, DEMO_WEBAPP), process, state_file, log_file
    )
    lab.enclaves.append(enclave)  # stopped by lab.down()
    state = _settled(lab, enclave)
    assert (attestation / "user_report_data").read_bytes() == dcap.gramine_report_data(
        key.public_key()
    )
    assert state["status"] == "up", state
    assert _forwards(lab, enclave)
