"""What the gateway core forwards from an enclave to the TUN device (in memory, real
DTLS): well-formed packets from its own address; not packets with IP options."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest

from seng_fw.gateway.counters import Drop
from seng_fw.tunnel import packets
from seng_fw.tunnel.packets import inet_checksum
from tests.support.gateway_memory import MemoryGateway
from tests.support.seng_client import udp_packet
from tests.unit.test_gateway_core import WEBAPP, policy

EXTERNAL = IPv4Address("10.77.2.2")
# Record route (type 7, length 7, pointer 4, one empty slot) + end of options.
RECORD_ROUTE = bytes([7, 7, 4, 0, 0, 0, 0, 0])


def with_options(packet: bytes, options: bytes) -> bytes:
    """`packet` (a 20-byte-header IPv4 packet) with `options` (padded to 4 bytes) added."""
    options += bytes(-len(options) % 4)
    header = bytearray(packet[:20]) + options
    header[0] = 0x40 | len(header) // 4
    struct.pack_into("!H", header, 2, len(header) + len(packet) - 20)
    struct.pack_into("!H", header, 10, 0)
    struct.pack_into("!H", header, 10, inet_checksum(bytes(header)))
    return bytes(header) + packet[20:]


def test_has_options_reads_the_header_length() -> None:
    plain = udp_packet(IPv4Address("192.168.29.2"), EXTERNAL, 1, 2, b"x")
    assert packets.is_ipv4(plain) and not packets.has_options(plain)
    for options in (b"\x01\x01\x01\x00", RECORD_ROUTE, bytes(40)):
        packet = with_options(plain, options)
        assert packets.is_ipv4(packet) and packets.has_options(packet)


@pytest.mark.parametrize(
    "options", [b"\x01\x00", RECORD_ROUTE, b"\x94\x04\x00\x00"], ids=["nop", "rr", "ra"]
)
def test_packets_with_ip_options_are_dropped_and_counted(options: bytes) -> None:
    gateway = MemoryGateway(policy())
    enclave = gateway.enclave(gateway.cert(WEBAPP)).connect()
    plain = udp_packet(enclave.address, EXTERNAL, 5000, 7, b"payload")
    enclave.send(with_options(plain, options))
    enclave.send(plain)
    assert gateway.to_tun == [plain]
    assert gateway.core.counters.dropped[Drop.IP_OPTIONS] == 1
    assert len(gateway.core.enclaves) == 1  # the tunnel carries on
