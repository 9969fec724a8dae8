"""Issue 14 on a running gateway (namespaces, real tunnels): what an enclave or an
attacker on the LAN may send, and faults of the gateway's own devices. Established
tunnels carry on, and every refusal is counted where the operator looks
(`seng-fw status`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from seng_fw.lab.lab import DEMO_WEBAPP, EnclaveSpec, Lab
from seng_fw.lab.topology import CLIENT_A, GATEWAY
from tests.integration.test_gateway import _make_lab, _scripted, _udp_listener
from tests.support.seng_client import udp_packet
from tests.unit.test_gateway_packets import RECORD_ROUTE, with_options

pytestmark = pytest.mark.root


@pytest.fixture
def lab(ns_prefix: str, tmp_path: Path) -> Iterator[Lab]:
    with _make_lab(ns_prefix, tmp_path) as running:
        yield running


def gateway_status(lab: Lab) -> dict[str, Any]:
    result = lab.seng_fw(
        GATEWAY, "status", "--json", "--socket", str(lab.state_dir / "control.sock")
    )
    assert result.returncode == 0, result.stderr
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def test_packets_with_ip_options_from_an_enclave_are_dropped_and_counted(lab: Lab) -> None:
    enclave = _scripted(lab, EnclaveSpec("options", CLIENT_A, DEMO_WEBAPP))
    assignment = enclave.connect()
    assert enclave.uplink is not None
    listener = _udp_listener(lab, 9995)
    plain = udp_packet(assignment.ip, lab.external, 6000, 9995, b"plain")
    for options in (b"\x01\x00", RECORD_ROUTE):
        enclave.uplink.send(with_options(plain, options))
    enclave.uplink.send(plain)
    data, _ = listener.recvfrom(100)
    assert data == b"plain"
    listener.settimeout(0.5)
    with pytest.raises(TimeoutError):
        listener.recvfrom(100)  # the two packets with options never arrive
    status = gateway_status(lab)
    assert status["dropped"].get("ip_options") == 2, status["dropped"]
    assert status["enclaves"] == 1
    enclave.close()
