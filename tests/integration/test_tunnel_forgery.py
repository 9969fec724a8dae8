"""Issue 14 item 1 on a running gateway: datagrams forged with the peer's own address
and port, carrying a record mbed TLS 2.28 discards (old epoch, or a sequence number
already seen) followed by stray bytes, end no tunnel, in either direction.

On the code before our record layer each of them ended the tunnel (mbed TLS answered
with an internal error that the session treated as fatal).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from seng_fw.lab.lab import DEMO_WEBAPP, EnclaveSpec, Lab
from seng_fw.lab.topology import CLIENT_A, GATEWAY
from seng_fw.system.netns import netns_socket
from tests.integration.test_gateway import _make_lab, _scripted, _udp_listener
from tests.support.seng_client import parse_udp, udp_packet

pytestmark = pytest.mark.root


def forged(k: int, epoch: int) -> bytes:
    return b"\x17\xfe\xfd" + epoch.to_bytes(2, "big") + bytes(6) + b"\x00\x01\x00" + b"x" * k


FORGED = [forged(k, epoch) for epoch in (0, 1) for k in range(1, 13)]


@pytest.fixture
def lab(ns_prefix: str, tmp_path: Path) -> Iterator[Lab]:
    with _make_lab(ns_prefix, tmp_path) as running:
        yield running


def test_forged_datagrams_from_the_peers_address_end_no_tunnel(
    lab: Lab, closer: contextlib.ExitStack
) -> None:
    enclave = closer.enter_context(_scripted(lab, EnclaveSpec("victim", CLIENT_A, DEMO_WEBAPP)))
    assignment = enclave.connect()
    uplink, downlink = enclave.uplink, enclave.downlink
    assert uplink is not None and downlink is not None
    listener = closer.enter_context(_udp_listener(lab, 9996))

    def round_trip(payload: bytes) -> None:
        uplink.send(udp_packet(assignment.ip, lab.external, 6000, 9996, payload))
        data, address = listener.recvfrom(100)
        assert data == payload
        listener.sendto(payload, address)
        reply = downlink.next_record()
        assert reply is not None and parse_udp(reply)[-1] == payload, downlink.closed

    round_trip(b"before")
    # To the gateway, from the enclave's own sockets.
    for conn in (uplink, downlink):
        for datagram in FORGED:
            conn.sock.send(datagram)
    # To the enclave, from the gateway's address and ports (spoofed with a raw socket
    # in the gateway's namespace).
    raw = netns_socket(lab.ns(GATEWAY), socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        for conn in (uplink, downlink):
            local_ip, local_port = conn.sock.getsockname()
            gw_ip, gw_port = conn.sock.getpeername()
            for datagram in FORGED:
                packet = udp_packet(
                    IPv4Address(gw_ip), IPv4Address(local_ip), gw_port, local_port, datagram
                )
                raw.sendto(packet, (local_ip, 0))
    finally:
        raw.close()
    for conn in (uplink, downlink):
        # Every forged datagram arrives and is ignored; on a busy machine that can take
        # longer than one short pump.
        deadline = time.monotonic() + 5.0
        while conn.session.datagrams_ignored < len(FORGED) and time.monotonic() < deadline:
            conn.pump(0.2)
        assert conn.closed is None and conn.session.established
        assert conn.session.datagrams_ignored >= len(FORGED)
    round_trip(b"after")
