"""Issue 14 on a running gateway (namespaces, real tunnels): what an enclave or an
attacker on the LAN may send, and faults of the gateway's own devices. Established
tunnels carry on, and every refusal is counted where the operator looks
(`seng-fw status`)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from seng_fw.cli import EXIT_FAULT
from seng_fw.lab.lab import DEMO_WEBAPP, EnclaveSpec, Lab
from seng_fw.lab.topology import CLIENT_A, GATEWAY
from seng_fw.system.netns import ip
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


def test_a_deleted_tun_device_stops_the_gateway_with_status_4_and_a_few_lines(lab: Lab) -> None:
    enclave = _scripted(lab, EnclaveSpec("tun-gone", CLIENT_A, DEMO_WEBAPP))
    enclave.connect()
    assert lab.gateway is not None
    log_before = lab.gateway_log.read_text()
    ip("link", "del", "tunFA", netns=lab.ns(GATEWAY))
    started = time.monotonic()
    try:
        status = lab.gateway.wait(5.0)  # before the fix: spins at 100% CPU, forever
    except subprocess.TimeoutExpired:
        tail = lab.gateway_log.read_text()[-1500:]
        pytest.fail(f"gateway still running 5 s after its TUN device was deleted:\n{tail}")
    lab.gateway = None
    assert status == EXIT_FAULT
    assert time.monotonic() - started < 5.0
    new_lines = lab.gateway_log.read_text()[len(log_before) :].splitlines()
    assert len(new_lines) < 20, new_lines[:30]
    assert any("TUN device tunFA lost" in line for line in new_lines), new_lines
    # The enclave was told (close_notify), not left with a dead tunnel.
    assert enclave.uplink is not None
    assert enclave.uplink.wait_closed(3.0) is not None
