"""The gateway's fast path (seng_fw/gateway/fastpath.py) on a real core and real DTLS
sessions in memory (tests/support/gateway_memory.py): datagrams reach it through a
datagram socket pair standing for the enclave's connected socket, its TUN writes land
in another, its downlink datagrams in a list. What it forwards, drops and hands to the
core must be what the core would have done."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from seng_fw.gateway.core import Enclave, EnclaveEnded
from seng_fw.gateway.counters import Drop, Revoked
from seng_fw.gateway.fastpath import FastPath, gso_sender
from seng_fw.tunnel.dtls import RecordReceived
from seng_fw.tunnel.offload import F_NEEDS_CSUM, GSO_TCPV4, VNET_HDR, VNET_NONE, split_tcp4
from seng_fw.tunnel.record import CLOSE_NOTIFY_ALERT, CONTENT_ALERT, DropReason
from tests.support.gateway_memory import MemoryEnclave, MemoryGateway, ipv4_packet
from tests.unit.test_offload import tcp_packet

WEBAPP = bytes([0x11]) * 32
EXTERNAL = "10.0.2.2"
POLICY = {
    "gateway_networks": ["10.0.0.0/24"],
    "apps": [
        {
            "name": "webapp",
            "mrenclave": WEBAPP.hex(),
            "hosts": ["10.0.0.0/24"],
            "subnet": {"subnet": "192.168.29.0/24"},
        }
    ],
}


class Rig:
    """A fast path between a memory gateway's core and socket pairs."""

    def __init__(self) -> None:
        self.gateway = MemoryGateway(POLICY)
        self.enclave = self.gateway.enclave(self.gateway.cert(WEBAPP)).connect()
        self.tun_out, self.tun_in = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.peer_out, self.peer_in = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.tun_in.setblocking(False)
        self.peer_in.setblocking(False)
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.tun_lost: list[OSError] = []
        self.fast = FastPath(
            self.gateway.core,
            self.tun_out.fileno(),
            lambda datagram, address: self.sent.append((datagram, address)),
            self.gateway.pump,
            clock=lambda: self.gateway.now,
            tun_lost=self.tun_lost.append,
        )

    @property
    def core_enclave(self) -> Enclave:
        found = self.gateway.core.enclave_at(self.enclave.address.packed)
        assert found is not None
        return found

    def uplink_datagram(self, packet: bytes) -> bytes:
        """What the enclave's tunnel #1 sends for `packet` (taken before the gateway's
        in-memory delivery could see it)."""
        assert self.enclave.uplink is not None
        session = self.enclave.uplink.session
        session.send_record(packet)
        (datagram,) = session.datagrams_to_send()
        return datagram

    def deliver(self, *datagrams: bytes) -> None:
        """Datagrams arrive on the enclave's connected socket; the loop drains it."""
        for datagram in datagrams:
            self.peer_out.send(datagram)
        self.fast.drain_uplink(self.peer_in, self.core_enclave)

    def tun_packets(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.tun_in.recv(65535))
            except BlockingIOError:
                return out

    def downlink_records(self) -> list[bytes]:
        """Open what the fast path sent down tunnel #2 with the enclave's session."""
        assert self.enclave.downlink is not None
        session = self.enclave.downlink.session
        for datagram, address in self.sent:
            assert address == self.enclave.downlink.address
            session.receive_datagram(datagram, self.gateway.now)
        self.sent.clear()
        return [e.data for e in session.events() if isinstance(e, RecordReceived)]

    def close(self) -> None:
        for sock in (self.tun_out, self.tun_in, self.peer_out, self.peer_in):
            sock.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    built = Rig()
    yield built
    built.close()


def test_uplink_packets_reach_the_tun_device_and_are_counted(rig: Rig) -> None:
    packets = [ipv4_packet(rig.enclave.address, EXTERNAL, 28 + i) for i in range(5)]
    rig.deliver(*(rig.uplink_datagram(p) for p in packets))
    assert rig.tun_packets() == packets
    assert rig.core_enclave.traffic.packets_in == 5
    assert rig.core_enclave.traffic.bytes_in == sum(map(len, packets))
    assert rig.gateway.to_tun == []  # nothing went through the core


def test_a_spoofed_source_is_dropped_and_counted(rig: Rig) -> None:
    spoofed = ipv4_packet("192.168.29.200", EXTERNAL)
    good = ipv4_packet(rig.enclave.address, EXTERNAL)
    rig.deliver(rig.uplink_datagram(spoofed), rig.uplink_datagram(good))
    assert rig.tun_packets() == [good]
    assert rig.gateway.core.counters.dropped[Drop.SPOOFED] == 1
    assert rig.core_enclave.traffic.dropped_spoofed == 1


@pytest.mark.parametrize(
    "mangle",
    [
        lambda p: p[:-1],  # total length says one byte more than the record holds
        lambda p: b"\x65" + p[1:],  # version 6
        lambda p: b"\x44" + p[1:],  # header length 16
        lambda p: p[:12],  # shorter than a header
    ],
)
def test_a_record_that_is_not_one_ipv4_packet_is_dropped(rig: Rig, mangle: object) -> None:
    assert callable(mangle)
    bad = mangle(ipv4_packet(rig.enclave.address, EXTERNAL, 40))
    rig.deliver(rig.uplink_datagram(bad))
    assert rig.tun_packets() == []
    assert rig.gateway.core.counters.dropped[Drop.NOT_IPV4] == 1


def test_ip_options_are_dropped_as_the_core_drops_them(rig: Rig) -> None:
    plain = ipv4_packet(rig.enclave.address, EXTERNAL, 40)
    with_options = bytes([0x46]) + plain[1:]  # IHL 6: four bytes of options
    rig.deliver(rig.uplink_datagram(with_options), rig.uplink_datagram(plain))
    assert rig.tun_packets() == [plain]
    assert rig.gateway.core.counters.dropped[Drop.IP_OPTIONS] == 1


def test_replays_and_tampered_records_are_refused(rig: Rig) -> None:
    packet = ipv4_packet(rig.enclave.address, EXTERNAL)
    datagram = rig.uplink_datagram(packet)
    tampered = bytearray(rig.uplink_datagram(packet))
    tampered[-1] ^= 1
    rig.deliver(datagram, datagram, bytes(tampered))
    assert rig.tun_packets() == [packet]
    drops = rig.core_enclave.uplink.drops
    assert drops[DropReason.REPLAY] == 1
    assert drops[DropReason.BAD_TAG] == 1
    assert rig.core_enclave.traffic.packets_in == 1


def test_close_notify_through_the_fast_path_ends_the_enclave_in_the_core(rig: Rig) -> None:
    assert rig.enclave.uplink is not None
    address = rig.enclave.address
    enclave = rig.core_enclave
    records = enclave.uplink.record_layer
    assert records is not None
    # The client's record layer seals the alert (as DtlsClientSession.close does).
    client_records = rig.enclave.uplink.session.record_layer
    assert client_records is not None
    rig.deliver(client_records.seal(CLOSE_NOTIFY_ALERT, CONTENT_ALERT))
    ended = rig.gateway.events_of(EnclaveEnded)
    assert [str(e.reason) for e in ended] == ["peer_closed.close_notify"]
    assert rig.gateway.core.enclave_at(address.packed) is None
    rig.fast.forget(enclave)  # what the adapter does on EnclaveEnded
    rig.fast.tun_packets([ipv4_packet(EXTERNAL, address)])
    assert rig.sent == []
    assert rig.gateway.core.counters.dropped[Drop.NO_ENCLAVE] == 1


def test_downlink_packets_are_sealed_for_the_destination_enclave(rig: Rig) -> None:
    other = rig.gateway.enclave(rig.gateway.cert(WEBAPP), host="10.0.0.11").connect()
    to_first = [ipv4_packet(EXTERNAL, rig.enclave.address, 30 + i) for i in range(3)]
    to_other = ipv4_packet(EXTERNAL, other.address)
    rig.fast.tun_packets([to_first[0], to_other, *to_first[1:]])
    assert other.downlink is not None
    other_address = other.downlink.address
    to_other_datagrams = [(d, a) for d, a in rig.sent if a == other_address]
    rig.sent = [(d, a) for d, a in rig.sent if a != other_address]
    assert rig.downlink_records() == to_first
    assert len(to_other_datagrams) == 1
    assert rig.core_enclave.traffic.packets_out == 3
    assert rig.core_enclave.traffic.bytes_out == sum(map(len, to_first))


def test_unknown_destinations_and_non_ipv4_go_to_the_core(rig: Rig) -> None:
    rig.fast.tun_packets([ipv4_packet(EXTERNAL, "192.168.29.250"), b"\x60" + bytes(39)])
    assert rig.sent == []
    counters = rig.gateway.core.counters
    assert counters.dropped[Drop.NO_ENCLAVE] == 1
    assert counters.dropped[Drop.TUN_NOT_IPV4] == 1


def test_an_enclave_not_paired_yet_is_served_by_the_core(rig: Rig) -> None:
    # Tunnel #1 only: the IpAssignAck must reach the core's setup exchange.
    late = MemoryEnclave(rig.gateway, rig.gateway.cert(WEBAPP), "10.0.0.12", 41000)
    late.auto_ack = False
    uplink = late.open_uplink()
    rig.gateway.pump()
    assert late.assignment is not None
    enclave = rig.gateway.core.enclave_at(late.address.packed)
    assert enclave is not None and enclave.downlink is None
    for ack in late.setup.receive_record(late.assignment.encode()):
        uplink.session.send_record(ack)
    (datagram,) = uplink.session.datagrams_to_send()
    rig.peer_out.send(datagram)
    rig.fast.drain_uplink(rig.peer_in, enclave)
    assert enclave.setup.state.name == "ACKNOWLEDGED"


def test_packets_to_a_revoked_enclave_are_not_sealed(rig: Rig) -> None:
    address = rig.enclave.address
    rig.fast.tun_packets([ipv4_packet(EXTERNAL, address)])  # makes the lane
    assert len(rig.downlink_records()) == 1
    enclave = rig.core_enclave
    assert (
        rig.gateway.core.revoke(lambda e: e is enclave, Revoked("subnet_changed"), rig.gateway.now)
        == 1
    )
    rig.gateway.pump()
    # Before the adapter forgets the lane, the closed record layer keeps it from sealing.
    rig.fast.tun_packets([ipv4_packet(EXTERNAL, address)])
    assert rig.sent == []
    assert IPv4Address(address) not in {e.address for e in rig.gateway.core.enclaves}


def test_packets_before_a_close_notify_in_one_batch_count_for_the_app(rig: Rig) -> None:
    address = rig.enclave.address
    packets = [rig.uplink_datagram(ipv4_packet(address, EXTERNAL)) for _ in range(3)]
    client_records = rig.enclave.uplink.session.record_layer  # type: ignore[union-attr]
    assert client_records is not None
    # Three packets, then the enclave leaves: all in one drain of its socket.
    rig.deliver(*packets, client_records.seal(CLOSE_NOTIFY_ALERT, CONTENT_ALERT))
    assert len(rig.tun_packets()) == 3
    assert rig.gateway.core.enclave_at(address.packed) is None
    # The ended enclave's traffic went into the app's totals when it ended: these three
    # packets with it, not into an object nobody reads any more.
    assert rig.gateway.core.counters.ended_traffic["webapp"].packets_in == 3


def test_a_tun_device_that_is_gone_is_reported_to_the_adapter(rig: Rig) -> None:
    # The device's fd is broken (the device was deleted): a write fails with EBADF.
    datagram = rig.uplink_datagram(ipv4_packet(rig.enclave.address, EXTERNAL))
    os.close(rig.tun_out.detach())
    rig.deliver(datagram)
    assert [exc.errno for exc in rig.tun_lost] == [errno.EBADF]
    assert rig.gateway.core.counters.dropped[Drop.TUN_WRITE_ERROR] == 1


# ----- TUN offloads (virtio-net header, coalesced writes, UDP GSO) ---------------------


def offload_rig(rig: Rig, **options: object) -> FastPath:
    return FastPath(
        rig.gateway.core,
        rig.tun_out.fileno(),
        lambda datagram, address: rig.sent.append((datagram, address)),
        rig.gateway.pump,
        clock=lambda: rig.gateway.now,
        tun_lost=rig.tun_lost.append,
        tun_vnet_hdr=True,
        **options,  # type: ignore[arg-type]
    )


def test_with_a_vnet_header_every_write_carries_one(rig: Rig) -> None:
    rig.fast = offload_rig(rig)
    packets = [ipv4_packet(rig.enclave.address, EXTERNAL, 28 + i) for i in range(3)]
    rig.deliver(*(rig.uplink_datagram(p) for p in packets))
    assert rig.tun_packets() == [VNET_NONE + p for p in packets]


def test_in_order_segments_are_written_as_one_super_packet(rig: Rig) -> None:
    rig.fast = offload_rig(rig, tun_coalesce=True)
    src = rig.enclave.address.packed
    dst = IPv4Address(EXTERNAL).packed
    seq, segments = 1, []
    for size in (1380, 1380, 1380, 500):
        segments.append(tcp_packet(os.urandom(size), seq=seq, src=src, dst=dst))
        seq += size
    spoofed = tcp_packet(os.urandom(1380), seq=seq, src=bytes([10, 9, 9, 9]), dst=dst)
    rig.deliver(*(rig.uplink_datagram(p) for p in [segments[0], spoofed, *segments[1:]]))
    (write,) = rig.tun_packets()
    flags, gso_type, _, gso_size, start, offset = VNET_HDR.unpack_from(write)
    assert (flags, gso_type, gso_size, start, offset) == (F_NEEDS_CSUM, GSO_TCPV4, 1380, 20, 16)
    resplit = split_tcp4(write[VNET_HDR.size :], gso_size)
    assert [s[20:] for s in resplit] == [s[20:] for s in segments]  # TCP as sent
    traffic = rig.core_enclave.traffic
    assert (traffic.packets_in, traffic.bytes_in) == (4, sum(map(len, segments)))
    assert traffic.dropped_spoofed == 1  # checked one by one before coalescing
    assert rig.gateway.core.counters.dropped[Drop.SPOOFED] == 1


def test_a_failed_coalesced_write_counts_every_segment(rig: Rig) -> None:
    rig.fast = offload_rig(rig, tun_coalesce=True)
    src, dst = rig.enclave.address.packed, IPv4Address(EXTERNAL).packed
    segments = [tcp_packet(os.urandom(1000), seq=1 + 1000 * i, src=src, dst=dst) for i in range(3)]
    rig.tun_in.close()  # the reading end is gone: every write fails (ECONNREFUSED)
    rig.deliver(*(rig.uplink_datagram(p) for p in segments))
    assert rig.core_enclave.traffic.packets_in == 0
    assert rig.gateway.core.counters.dropped[Drop.TUN_WRITE_ERROR] == 3


def test_udp_gso_sends_each_record_as_its_own_datagram_in_order(rig: Rig) -> None:
    """Runs of equal-sized records leave in one GSO send; the kernel (loopback) cuts
    them back into the datagrams the enclave's session opens, in order."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    gso = gso_sender(sender)
    if gso is None:
        pytest.skip("no UDP GSO in this kernel")
    local = receiver.getsockname()
    calls: list[int] = []

    def send_gso(datagrams: list[bytes], size: int, peer: tuple[str, int]) -> None:
        calls.append(len(datagrams))
        assert gso is not None
        gso(datagrams, size, local)

    fast = FastPath(
        rig.gateway.core,
        rig.tun_out.fileno(),
        lambda datagram, peer: sender.sendto(datagram, local),
        rig.gateway.pump,
        clock=lambda: rig.gateway.now,
        send_gso=send_gso,
    )
    sizes = [1400, 1400, 1400, 100, 1400, 1400, 60, 1400]
    packets = [ipv4_packet(EXTERNAL, rig.enclave.address, size) for size in sizes]
    fast.tun_packets(packets)
    assert calls == [4, 3]  # 3 x 1400 + 100, 2 x 1400 + 60; the last one alone
    datagrams = []
    with receiver, sender:
        while True:
            try:
                datagrams.append(receiver.recv(65535))
            except BlockingIOError:
                break
    assert rig.enclave.downlink is not None
    rig.sent = [(d, rig.enclave.downlink.address) for d in datagrams]
    assert rig.downlink_records() == packets
    assert rig.core_enclave.traffic.packets_out == len(packets)


@pytest.mark.parametrize(
    ("refusal", "gso_stays"), [(errno.EINVAL, True), (errno.EIO, False), (errno.EMSGSIZE, False)]
)
def test_a_refused_gso_send_goes_out_one_datagram_at_a_time(
    rig: Rig, refusal: int, gso_stays: bool
) -> None:
    """A path MTU below the records (EINVAL) or a route without checksum offload (EIO)
    makes the kernel refuse GSO sends that plain sends make: nothing is lost."""
    plain: list[bytes] = []
    gso_calls: list[int] = []

    def send_gso(datagrams: list[bytes], size: int, peer: tuple[str, int]) -> None:
        gso_calls.append(len(datagrams))
        raise OSError(refusal, os.strerror(refusal))

    fast = FastPath(
        rig.gateway.core,
        rig.tun_out.fileno(),
        lambda datagram, peer: plain.append(datagram),
        rig.gateway.pump,
        clock=lambda: rig.gateway.now,
        send_gso=send_gso,
    )
    packets = [ipv4_packet(EXTERNAL, rig.enclave.address, 1400) for _ in range(3)]
    fast.tun_packets(packets)
    fast.tun_packets(packets)
    assert len(plain) == 6
    assert gso_calls == ([3, 3] if gso_stays else [3])  # EIO: GSO switched off
    assert rig.gateway.core.counters.dropped[Drop.SEND_ERROR] == 0
    assert rig.enclave.downlink is not None
    rig.sent = [(d, rig.enclave.downlink.address) for d in plain]
    assert rig.downlink_records() == packets + packets
