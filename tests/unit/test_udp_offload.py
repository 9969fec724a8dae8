"""UDP GRO/GSO helpers (seng_fw/tunnel/udp_offload.py): known answers for the pure
functions, a GSO send into a GRO socket on loopback, and the gateway's fast path
cutting a GRO buffer of sealed records apart with every check still applied."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from seng_fw.gateway.counters import Drop
from seng_fw.tunnel.record import DropReason
from seng_fw.tunnel.udp_offload import (
    GRO_ANCILLARY,
    MAX_GSO_SEGMENTS,
    SOL_UDP,
    UDP_GRO,
    enable_gro,
    gro_segment,
    gso_control,
    gso_runs,
    split,
)
from tests.support.gateway_memory import ipv4_packet
from tests.unit.test_fastpath import EXTERNAL, Rig


def test_split_known_answers() -> None:
    assert split(300, 100) == [(0, 100), (100, 200), (200, 300)]
    assert split(250, 100) == [(0, 100), (100, 200), (200, 250)]  # the last one shorter
    assert split(100, 100) == [(0, 100)]
    assert split(80, 100) == [(0, 80)]
    assert split(80, 0) == [(0, 80)]  # no segment size: one datagram


def test_gro_segment_from_control_messages() -> None:
    assert gro_segment([(SOL_UDP, UDP_GRO, struct.pack("=i", 121))]) == 121
    assert gro_segment([]) == 0
    assert gro_segment([(socket.SOL_SOCKET, UDP_GRO, struct.pack("=i", 121))]) == 0
    assert gro_segment([(SOL_UDP, UDP_GRO, b"\x01")]) == 0  # truncated: ignored


def test_gso_runs_known_answers() -> None:
    assert gso_runs([]) == []
    assert gso_runs([100]) == [(0, 1)]
    assert gso_runs([100, 100, 100]) == [(0, 3)]
    assert gso_runs([100, 100, 60, 100]) == [(0, 3), (3, 4)]  # a shorter one ends a run
    assert gso_runs([60, 100, 100]) == [(0, 1), (1, 3)]  # a longer one cannot follow
    most = MAX_GSO_SEGMENTS
    assert gso_runs([100] * (most + 1)) == [(0, most), (most, most + 1)]
    assert gso_runs([1461] * 50) == [(0, 44), (44, 50)]  # at most 65,000 bytes


def _loopback_pair(gro: bool) -> tuple[socket.socket, socket.socket]:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    if gro and not enable_gro(receiver):
        receiver.close()
        pytest.skip("no UDP GRO in this kernel")
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect(receiver.getsockname())
    receiver.connect(sender.getsockname())
    return sender, receiver


def test_a_gso_send_arrives_in_one_gro_receive_and_splits_back() -> None:
    sender, receiver = _loopback_pair(gro=True)
    try:
        datagrams = [bytes([i]) * 100 for i in range(10)] + [b"z" * 40]
        try:
            sender.sendmsg([b"".join(datagrams)], gso_control(100))
        except OSError as exc:
            pytest.skip(f"no UDP GSO: {exc}")
        buffer = bytearray(65535)
        n, ancillary, _flags, _address = receiver.recvmsg_into([buffer], GRO_ANCILLARY)
        assert n == 1040
        segment = gro_segment(ancillary)
        assert segment == 100
        assert [bytes(buffer[a:b]) for a, b in split(n, segment)] == datagrams
    finally:
        sender.close()
        receiver.close()


class UdpRig(Rig):
    """The fast-path rig with a real UDP loopback socket (GRO on) for tunnel #1."""

    def __init__(self) -> None:
        super().__init__()
        self.peer_out.close()
        self.peer_in.close()
        self.peer_out, self.peer_in = _loopback_pair(gro=True)

    def deliver_gso(self, *datagrams: bytes) -> None:
        size = len(datagrams[0])
        assert all(len(d) == size for d in datagrams)
        self.peer_out.sendmsg([b"".join(datagrams)], gso_control(size))
        self.fast.drain_uplink(self.peer_in, self.core_enclave, True)


@pytest.fixture
def udp_rig() -> Iterator[UdpRig]:
    built = UdpRig()
    yield built
    built.close()


def _numbered(packet: bytes, number: int) -> bytes:
    return packet[:-1] + bytes([number])


def test_the_fast_path_cuts_a_gro_buffer_and_checks_every_record(udp_rig: UdpRig) -> None:
    rig = udp_rig
    packets = [_numbered(ipv4_packet(rig.enclave.address, EXTERNAL, 40), i) for i in range(20)]
    datagrams = [rig.uplink_datagram(p) for p in packets]
    spoofed = rig.uplink_datagram(ipv4_packet("192.168.29.200", EXTERNAL, 40))
    tampered = bytearray(rig.uplink_datagram(ipv4_packet(rig.enclave.address, EXTERNAL, 40)))
    tampered[-1] ^= 1
    # A record header claiming more bytes than its datagram holds: only that datagram
    # goes (read as one run of records, the GRO buffer would lose all that follows).
    overlong = bytearray(rig.uplink_datagram(ipv4_packet(rig.enclave.address, EXTERNAL, 40)))
    overlong[11:13] = (len(overlong) - 13 + 1).to_bytes(2, "big")
    replayed = datagrams[3]
    rig.deliver_gso(*datagrams[:10], spoofed, bytes(tampered), bytes(overlong), replayed,
                    *datagrams[10:])  # fmt: skip
    assert rig.tun_packets() == packets
    drops = rig.core_enclave.uplink.drops
    assert drops[DropReason.BAD_TAG] == 1
    assert drops[DropReason.REPLAY] == 1
    assert drops[DropReason.MALFORMED] == 1
    assert rig.gateway.core.counters.dropped[Drop.SPOOFED] == 1
    assert rig.core_enclave.traffic.packets_in == 20


def test_datagrams_after_the_end_of_a_session_in_one_gro_buffer_go_to_the_core(
    udp_rig: UdpRig,
) -> None:
    """Received one by one they would have reached the core: cut from one GRO buffer
    after the enclave's close_notify, they must too (counted there, not lost)."""
    rig = udp_rig
    assert rig.enclave.uplink is not None
    session = rig.enclave.uplink.session
    session.close()
    (close_notify,) = session.datagrams_to_send()
    stray = bytes([22]) + bytes(len(close_notify) - 1)  # a handshake record, not a hello
    before = rig.gateway.core.counters.dropped[Drop.NOT_CLIENT_HELLO]
    rig.deliver_gso(close_notify, stray)
    assert rig.gateway.core.enclave_at(rig.enclave.address.packed) is None  # it ended
    assert rig.gateway.core.counters.dropped[Drop.NOT_CLIENT_HELLO] == before + 1
