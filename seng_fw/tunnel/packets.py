"""The few IPv4 header fields the data path needs.

Hand-written on purpose: the forwarding path reads two 4-byte fields per packet and a
general packet library would cost far more per packet than the check itself.
"""

from __future__ import annotations

import struct

IPV4_MIN_HEADER = 20


def is_ipv4(packet: bytes) -> bool:
    """A plausible IPv4 packet: version 4, a header of at least 20 bytes that fits, and a
    total length field that matches the record (one packet per record)."""
    if len(packet) < IPV4_MIN_HEADER or packet[0] >> 4 != 4:
        return False
    header_length = (packet[0] & 0x0F) * 4
    total_length = int.from_bytes(packet[2:4], "big")
    return IPV4_MIN_HEADER <= header_length <= total_length == len(packet)


def has_options(packet: bytes) -> bool:
    """True if a packet that passed `is_ipv4` carries IP options (IHL > 5)."""
    return packet[0] & 0x0F != 5


def source(packet: bytes) -> bytes:
    """Source address (4 network-order bytes) of a packet that passed `is_ipv4`."""
    return packet[12:16]


def destination(packet: bytes) -> bytes:
    """Destination address (4 network-order bytes) of a packet that passed `is_ipv4`."""
    return packet[16:20]


def inet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`, for headers the lab builds."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
