"""Issue 14 on a running gateway (namespaces, real tunnels): what an enclave or an
attacker on the LAN may send, and faults of the gateway's own devices. Established
tunnels carry on, and every refusal is counted where the operator looks
(`seng-fw status`)."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import socket
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from seng_fw.cli import EXIT_FAULT
from seng_fw.lab.lab import DEMO_WEBAPP, GATEWAY_PORT, EnclaveSpec, Lab
from seng_fw.lab.topology import CLIENT_A, CLIENT_B, GATEWAY
from seng_fw.system.netns import ip, netns_socket
from tests.integration.test_gateway import _make_lab, _scripted, _udp_listener
from tests.support.attacks import client_hello, flood, forge
from tests.support.seng_client import ScriptedEnclave, parse_udp, udp_packet
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
    status: dict[str, Any] = json.loads(result.stdout)["result"]  # the JSON document
    return status


def test_packets_with_ip_options_from_an_enclave_are_dropped_and_counted(
    lab: Lab, closer: contextlib.ExitStack
) -> None:
    enclave = closer.enter_context(_scripted(lab, EnclaveSpec("options", CLIENT_A, DEMO_WEBAPP)))
    assignment = enclave.connect()
    assert enclave.uplink is not None
    listener = closer.enter_context(_udp_listener(lab, 9995))
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


def test_a_deleted_tun_device_stops_the_gateway_with_status_4_and_a_few_lines(
    lab: Lab, closer: contextlib.ExitStack
) -> None:
    enclave = closer.enter_context(_scripted(lab, EnclaveSpec("tun-gone", CLIENT_A, DEMO_WEBAPP)))
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


def _round_trips(lab: Lab, enclave: ScriptedEnclave, address: IPv4Address, count: int) -> int:
    """UDP round trips enclave -> external echo -> enclave; how many came back."""
    uplink, downlink = enclave.uplink, enclave.downlink
    assert uplink is not None and downlink is not None
    answered = 0
    with _udp_listener(lab, 9994) as listener:
        for n in range(count):
            payload = b"rt%d" % n
            uplink.send(udp_packet(address, lab.external, 6100, 9994, payload))
            try:
                data, peer = listener.recvfrom(100)
            except TimeoutError:
                continue
            listener.sendto(data, peer)
            reply = downlink.next_record(3.0)
            answered += reply is not None and parse_udp(reply)[-1] == payload
    return answered


def _attack(target: Any, *args: Any) -> tuple[multiprocessing.Process, Any]:
    sent = multiprocessing.Value("q", 0)
    process = multiprocessing.Process(target=target, args=(*args, sent))
    process.start()
    return process, sent


def test_a_cookie_answering_handshake_flood_is_bounded_and_tunnels_carry_on(
    lab: Lab, closer: contextlib.ExitStack
) -> None:
    enclave = closer.enter_context(_scripted(lab, EnclaveSpec("victim", CLIENT_B, DEMO_WEBAPP)))
    address = enclave.connect().ip
    gateway = (str(lab.gateway_lan), GATEWAY_PORT)
    flooder, sent = _attack(flood, lab.ns(CLIENT_A), gateway, client_hello(lab), 6.0)
    try:
        time.sleep(1.0)
        during = gateway_status(lab)
        answered = _round_trips(lab, enclave, address, 20)
    finally:
        flooder.join(15)
    assert sent.value > 200, "the flood did not get going"
    # On main: one session per answered cookie, 60 s each, and nothing in `status`.
    assert 0 < during["handshakes"]["half_open"] <= 16  # max_half_open_per_source
    assert answered == 20
    status = gateway_status(lab)
    assert status["limits"].get("max_half_open_per_source", 0) > 0
    assert status["limits"].get("handshake_rate_per_host", 0) > 0
    assert status["enclaves"] == 1 and status["ended"] == {}
    # Abandoned handshakes end after the certificate timeout (5 s).
    deadline = time.monotonic() + 10
    while gateway_status(lab)["handshakes"]["half_open"] and time.monotonic() < deadline:
        time.sleep(0.5)
    final = gateway_status(lab)
    assert final["handshakes"]["half_open"] == 0
    assert final["handshakes"]["certificate_timeouts"] > 0
    # Another enclave from the flooding host is admitted once the flood is over.
    with _scripted(lab, EnclaveSpec("late", CLIENT_A, DEMO_WEBAPP)) as late:
        late.connect()


def test_forged_datagrams_at_full_rate_end_no_tunnel(
    lab: Lab, closer: contextlib.ExitStack
) -> None:
    enclave = closer.enter_context(_scripted(lab, EnclaveSpec("victim", CLIENT_A, DEMO_WEBAPP)))
    address = enclave.connect().ip
    peers = []
    for conn in (enclave.uplink, enclave.downlink):
        assert conn is not None
        peers.append((*conn.sock.getsockname(), *conn.sock.getpeername()))
    forger, sent = _attack(forge, lab.ns(CLIENT_A), peers, 3.0)
    try:
        answered = _round_trips(lab, enclave, address, 10)
    finally:
        forger.join(10)
    assert sent.value > 1000
    assert answered == 10
    for conn in (enclave.uplink, enclave.downlink):
        assert conn is not None and conn.closed is None and conn.session.established
    status = gateway_status(lab)
    assert status["enclaves"] == 1 and status["ended"] == {}


def test_oversized_datagrams_are_dropped_and_counted(lab: Lab) -> None:
    with netns_socket(lab.ns(CLIENT_A), socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"\x16\xfe\xfd" + bytes(20_000), (str(lab.gateway_lan), GATEWAY_PORT))
    deadline = time.monotonic() + 5
    while not gateway_status(lab)["limits"].get("max_datagram") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gateway_status(lab)["limits"].get("max_datagram") == 1
