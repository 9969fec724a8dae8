"""Wire-format test vectors for the SENG setup messages (protobuf proto2)."""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from seng_fw.tunnel.messages import (
    IpAssignAck,
    IpAssignment,
    SetupMessageError,
    from_s_addr,
    to_s_addr,
)

# 192.168.28.2/24 via 192.168.28.1, as the original SENG server sends it: each field is
# the x86 s_addr (network-order bytes read little-endian) as a protobuf varint.
ASSIGNMENT_VECTOR = bytes.fromhex("08c0d1f21010ffffff0718c0d1f208")
ACK_VECTOR = bytes.fromhex("08c0d1f210")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_s_addr_is_network_bytes_read_little_endian() -> None:
    assert to_s_addr(IPv4Address("192.168.28.2")) == 0x021CA8C0
    assert from_s_addr(0x021CA8C0) == IPv4Address("192.168.28.2")


def test_ip_assignment_vector() -> None:
    message = IpAssignment(
        IPv4Address("192.168.28.2"), IPv4Address("255.255.255.0"), IPv4Address("192.168.28.1")
    )
    assert message.encode() == ASSIGNMENT_VECTOR
    assert IpAssignment.decode(ASSIGNMENT_VECTOR) == message


def test_ack_vector() -> None:
    assert IpAssignAck(IPv4Address("192.168.28.2")).encode() == ACK_VECTOR
    assert IpAssignAck.decode(ACK_VECTOR).ip == IPv4Address("192.168.28.2")


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_assignment_matches_hand_encoding(ip: int, mask: int, gw: int) -> None:
    expected = b"\x08" + _varint(ip) + b"\x10" + _varint(mask) + b"\x18" + _varint(gw)
    message = IpAssignment(from_s_addr(ip), from_s_addr(mask), from_s_addr(gw))
    assert message.encode() == expected
    assert IpAssignment.decode(expected) == message


def test_missing_required_field_is_rejected() -> None:
    with pytest.raises(SetupMessageError, match="required"):
        IpAssignment.decode(ACK_VECTOR)  # only field 1
    with pytest.raises(SetupMessageError, match="required"):
        IpAssignAck.decode(b"")


@pytest.mark.parametrize("data", [b"\x08", b"\x08\xff\xff\xff\xff\xff\xff", b"\x45\x00\x00\x54"])
def test_malformed_is_rejected(data: bytes) -> None:
    with pytest.raises(SetupMessageError):
        IpAssignment.decode(data)


@given(st.binary(max_size=64))
def test_decode_raises_only_its_own_error(data: bytes) -> None:
    for message_class in (IpAssignment, IpAssignAck):
        with contextlib.suppress(SetupMessageError):
            message_class.decode(data)
