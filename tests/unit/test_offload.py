"""TSO splitting and TCP coalescing for the vnet-header TUN device (seng_fw/tunnel/offload.py).

The reference is written separately from the code under test: packets are built field
by field with `struct` and checked with the plain RFC 1071 loop of `packets.inet_checksum`.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seng_fw.tunnel import offload
from seng_fw.tunnel.offload import (
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    VNET_HDR,
    VNET_NONE,
    OffloadError,
)
from seng_fw.tunnel.packets import inet_checksum as rfc1071

SRC, DST = bytes([10, 77, 2, 2]), bytes([192, 168, 29, 3])
FIN, SYN, PSH, ACK, CWR = 0x01, 0x02, 0x08, 0x10, 0x80
TS_OPTION = bytes([1, 1, 8, 10]) + bytes(range(8))  # NOP NOP timestamps


def tcp_packet(
    payload: bytes,
    *,
    seq: int = 1000,
    ack: int = 5000,
    flags: int = ACK,
    ident: int = 0x1234,
    options: bytes = b"",
    window: int = 502,
    ttl: int = 64,
    src: bytes = SRC,
    dst: bytes = DST,
    sport: int = 5201,
    dport: int = 40000,
    checksum: int | None = None,
    total_length: int | None = None,
) -> bytes:
    """A complete IPv4/TCP packet with correct checksums (or the given TCP checksum)."""
    thl = 20 + len(options)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (thl // 4) << 4, flags, window, 0, 0)
    tcp += options
    pseudo = src + dst + struct.pack("!BBH", 0, 6, thl + len(payload))
    tcp_sum = rfc1071(pseudo + tcp + payload) if checksum is None else checksum
    tcp = tcp[:16] + struct.pack("!H", tcp_sum) + tcp[18:]
    total = 20 + thl + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total_length or total, ident, 0x4000, ttl, 6, 0,
                     src, dst)  # fmt: skip
    ip = ip[:10] + struct.pack("!H", rfc1071(ip)) + ip[12:]
    return ip + tcp + payload


def partial(packet: bytes) -> bytes:
    """As the kernel hands out a TSO packet: TCP checksum = folded pseudo-header sum."""
    thl_total = len(packet) - 20
    pseudo = packet[12:20] + struct.pack("!BBH", 0, 6, thl_total)
    words = sum(struct.unpack("!6H", pseudo))
    while words >> 16:
        words = (words & 0xFFFF) + (words >> 16)
    return packet[:36] + struct.pack("!H", words) + packet[38:]


def tcp_ok(packet: bytes) -> bool:
    ihl = (packet[0] & 15) * 4
    pseudo = packet[12:20] + struct.pack("!BBH", 0, 6, len(packet) - ihl)
    data = pseudo + packet[ihl:]
    return rfc1071(data) == 0


def ip_ok(packet: bytes) -> bool:
    return rfc1071(packet[: (packet[0] & 15) * 4]) == 0


# ----- checksums -----------------------------------------------------------------------


def test_known_answer_checksums() -> None:
    # RFC 1071 section 3 example (sum 0xddf2) and an IPv4 header from Wikipedia's
    # "Internet checksum" article (checksum 0xb861).
    assert offload.ones_sum(bytes.fromhex("0001f203f4f5f6f7")) == 0xDDF2
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert offload.inet_checksum(header) == 0xB861
    assert offload.inet_checksum(header[:10] + b"\xb8\x61" + header[12:]) == 0


@pytest.mark.parametrize("size", [1, 2, 3, 255, 256, 257, 1399, 1400, 4096])
def test_ones_sum_matches_rfc1071_for_short_long_and_odd(size: int) -> None:
    data = os.urandom(size)
    assert offload.inet_checksum(data) == rfc1071(data)


def test_checksum_of_a_sum_of_0xffff_is_zero_not_0xffff() -> None:
    data = bytes.fromhex("ff00" + "00ff")  # words sum to 0xffff
    assert offload.inet_checksum(data) == rfc1071(data) == 0


# ----- splitting -----------------------------------------------------------------------


def split(payload: bytes, mss: int, **fields: object) -> tuple[bytes, list[bytes]]:
    packet = partial(tcp_packet(payload, **fields))  # type: ignore[arg-type]
    return packet, offload.split_tcp4(packet, mss)


def test_split_gives_complete_mss_sized_packets() -> None:
    payload = os.urandom(1380 * 3 + 100)
    _, segments = split(payload, 1380, seq=0xFFFFF000, ident=0xFFFE, options=TS_OPTION)
    assert [len(s) for s in segments] == [32 + 20 + 1380] * 3 + [32 + 20 + 100]
    for i, segment in enumerate(segments):
        assert ip_ok(segment) and tcp_ok(segment), i
        assert struct.unpack("!H", segment[2:4])[0] == len(segment)
        assert struct.unpack("!H", segment[4:6])[0] == (0xFFFE + i) & 0xFFFF  # wraps
        assert struct.unpack("!I", segment[24:28])[0] == (0xFFFFF000 + 1380 * i) & 0xFFFFFFFF
        assert segment[40:52] == TS_OPTION
    assert b"".join(s[52:] for s in segments) == payload


def test_split_equals_packets_built_one_by_one() -> None:
    payload = os.urandom(3000)
    _, segments = split(payload, 1448, seq=7, flags=ACK | PSH)
    expected = [
        tcp_packet(payload[:1448], seq=7, flags=ACK, ident=0x1234),
        tcp_packet(payload[1448:2896], seq=7 + 1448, flags=ACK, ident=0x1235),
        tcp_packet(payload[2896:], seq=7 + 2896, flags=ACK | PSH, ident=0x1236),
    ]
    assert segments == expected


def test_fin_and_psh_only_on_the_last_cwr_only_on_the_first() -> None:
    _, segments = split(os.urandom(300), 100, flags=ACK | PSH | FIN | CWR)
    assert [s[33] for s in segments] == [ACK | CWR, ACK, ACK | PSH | FIN]


@pytest.mark.parametrize(
    ("size", "mss", "sizes"),
    [(1, 1380, [1]), (1380, 1380, [1380]), (1381, 1380, [1380, 1]), (2760, 1380, [1380, 1380]),
     (999, 333, [333] * 3), (1001, 333, [333, 333, 333, 2]), (65535 - 40, 1380, None)],
)  # fmt: skip
def test_split_boundaries_and_odd_sizes(size: int, mss: int, sizes: list[int] | None) -> None:
    payload = os.urandom(size)
    _, segments = split(payload, mss)
    if sizes is not None:
        assert [len(s) - 40 for s in segments] == sizes
    assert all(ip_ok(s) and tcp_ok(s) and len(s) - 40 <= mss for s in segments)
    assert b"".join(s[40:] for s in segments) == payload


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=6000), st.integers(min_value=1, max_value=1500),
       st.integers(min_value=0, max_value=2**32 - 1))  # fmt: skip
def test_split_any_payload(payload: bytes, mss: int, seq: int) -> None:
    _, segments = split(payload, mss, seq=seq)
    assert all(ip_ok(s) and tcp_ok(s) for s in segments)
    assert b"".join(s[40:] for s in segments) == payload


@pytest.mark.parametrize(
    "packet",
    [
        b"\x45" + bytes(60),  # total length 0
        tcp_packet(b"x" * 100, total_length=99),  # total length disagrees
        tcp_packet(b"")[:39],  # too short
        b"\x60" + tcp_packet(b"x" * 100)[1:],  # IPv6 version nibble
        tcp_packet(b"x" * 100)[:9] + b"\x11" + tcp_packet(b"x" * 100)[10:],  # UDP
    ],
)
def test_split_refuses_what_is_no_tcp_super_packet(packet: bytes) -> None:
    with pytest.raises(OffloadError):
        offload.split_tcp4(packet, 100)


def test_packets_of_reads() -> None:
    payload = os.urandom(2000)
    packet = partial(tcp_packet(payload))
    tso = VNET_HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, 40, 1000, 20, 16) + packet
    assert offload.packets_of(tso) == offload.split_tcp4(packet, 1000)
    ecn = VNET_HDR.pack(F_NEEDS_CSUM, GSO_TCPV4 | GSO_ECN, 40, 1000, 20, 16) + packet
    assert len(offload.packets_of(ecn)) == 2
    whole = tcp_packet(b"abc")
    needs = VNET_HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16) + partial(whole)
    assert offload.packets_of(needs) == [whole]
    assert offload.packets_of(VNET_NONE + whole) == [whole]
    with pytest.raises(OffloadError):
        offload.packets_of(VNET_HDR.pack(0, 5, 0, 0, 0, 0) + whole)  # UDP GSO: not asked for
    with pytest.raises(OffloadError):
        offload.packets_of(b"\0" * 9)


def fold(words: int) -> int:
    while words >> 16:
        words = (words & 0xFFFF) + (words >> 16)
    return words


def udp_needing_csum(payload: bytes) -> bytes:
    """A UDP packet as the kernel leaves it with NEEDS_CSUM: pseudo-header sum in place."""
    length = 8 + len(payload)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 1, 0, 64, 17, 0, SRC, DST)
    words = sum(struct.unpack("!6H", SRC + DST + struct.pack("!BBH", 0, 17, length)))
    return header + struct.pack("!HHHH", 7, 9, length, fold(words)) + payload


def test_complete_checksum_of_udp() -> None:
    data = udp_needing_csum(b"hello!")
    completed = offload.complete_checksum(data, 20, 6)
    pseudo = SRC + DST + struct.pack("!BBH", 0, 17, 14)
    assert rfc1071(pseudo + completed[20:]) == 0
    assert completed[:26] == data[:26] and completed[28:] == data[28:]


def test_complete_checksum_udp_zero_becomes_ffff() -> None:
    # A payload word chosen so that the checksum comes out as zero, which UDP sends
    # as 0xffff (RFC 768: zero means "no checksum").
    probe = udp_needing_csum(b"\0\0")
    pseudo = SRC + DST + struct.pack("!BBH", 0, 17, 10)
    rest = fold(sum(struct.unpack("!11H", pseudo + probe[20:26] + b"\0\0" + b"\0\0")))
    word = 0xFFFF - rest
    data = udp_needing_csum(struct.pack("!H", word))
    completed = offload.complete_checksum(data, 20, 6)
    assert completed[26:28] == b"\xff\xff"
    assert rfc1071(pseudo + completed[20:]) == 0


def test_complete_checksum_refuses_offsets_outside() -> None:
    with pytest.raises(OffloadError):
        offload.complete_checksum(tcp_packet(b"x"), 20, 40)


# ----- coalescing ----------------------------------------------------------------------


def segments_of(
    count: int, size: int = 1380, last: int | None = None, **fields: object
) -> list[bytes]:
    seq = 1000
    out = []
    for i in range(count):
        n = last if (last is not None and i == count - 1) else size
        out.append(tcp_packet(os.urandom(n), seq=seq, ident=i, **fields))  # type: ignore[arg-type]
        seq += n
    return out


def kernel_view(write: offload.Write) -> list[bytes]:
    """What the kernel makes of a write: a merged one is split as TSO output would be."""
    header, parts, count = write
    data = b"".join(parts)
    flags, gso_type, hdr_len, gso_size, start, off = VNET_HDR.unpack(header)
    if gso_type == GSO_NONE:
        assert flags == 0 and count == 1
        return [data]
    assert (flags, gso_type, start, off) == (F_NEEDS_CSUM, GSO_TCPV4, 20, 16)
    assert hdr_len == 20 + (data[32] >> 4) * 4
    assert ip_ok(data) and struct.unpack("!H", data[2:4])[0] == len(data)
    # NEEDS_CSUM: the field holds the folded pseudo-header sum over the whole length,
    # which the kernel's segmentation (or a NIC) adjusts per segment.
    assert data[36:38] == partial(data)[36:38]
    completed = offload.complete_checksum(data, 20, 16)
    assert tcp_ok(completed)
    return offload.split_tcp4(data, gso_size)


def test_in_order_segments_of_one_flow_become_one_write() -> None:
    packets = segments_of(5, last=700, options=TS_OPTION)
    writes = offload.coalesce_tcp4(packets)
    assert [w[2] for w in writes] == [5]
    resplit = kernel_view(writes[0])
    assert [s[32:] for s in resplit] == [p[32:] for p in packets]  # all but IP id/len/csum
    assert all(tcp_ok(s) for s in resplit)


def test_psh_ends_a_run_and_is_kept_on_the_last() -> None:
    first = segments_of(3)
    first[1] = tcp_packet(first[1][40:], seq=1000 + 1380, flags=ACK | PSH)
    writes = offload.coalesce_tcp4(first)
    assert [w[2] for w in writes] == [2, 1]
    assert b"".join(writes[0][1])[33] == ACK | PSH


@pytest.mark.parametrize(
    "change",
    [
        {"ack": 5001}, {"window": 503}, {"ttl": 63}, {"flags": ACK | FIN}, {"flags": ACK | SYN},
        {"options": TS_OPTION}, {"seq": 1000 + 1380 + 1},  # gap
    ],
)  # fmt: skip
def test_what_breaks_a_run(change: dict[str, object]) -> None:
    a, b = segments_of(2)
    fields: dict[str, object] = {"seq": 1000 + 1380, **change}
    b = tcp_packet(b[40:], **fields)  # type: ignore[arg-type]
    writes = offload.coalesce_tcp4([a, b])
    assert [w[2] for w in writes] == [1, 1]
    assert [b"".join(w[1]) for w in writes] == [a, b]


def test_a_larger_segment_after_a_shorter_one_starts_a_new_run() -> None:
    a = tcp_packet(os.urandom(1000), seq=0)
    b = tcp_packet(os.urandom(500), seq=1000)
    c = tcp_packet(os.urandom(1000), seq=1500)
    writes = offload.coalesce_tcp4([a, b, c])
    assert [w[2] for w in writes] == [2, 1]


def test_flows_interleaved_keep_each_flows_order() -> None:
    one = segments_of(3, sport=1)
    two = segments_of(3, sport=2)
    mixed = [one[0], two[0], one[1], two[1], one[2], two[2]]
    writes = offload.coalesce_tcp4(mixed)
    assert [w[2] for w in writes] == [3, 3]
    assert [s[20:22] for s in kernel_view(writes[0])] == [b"\0\x01"] * 3


def test_a_bad_tcp_checksum_is_not_made_good() -> None:
    packets = segments_of(3)
    bad = packets[1][:36] + bytes([packets[1][36] ^ 1]) + packets[1][37:]
    writes = offload.coalesce_tcp4([packets[0], bad, packets[2]])
    assert [w[2] for w in writes] == [1, 1, 1]
    assert b"".join(writes[1][1]) == bad  # as the enclave sent it: the receiver drops it


def test_not_coalesced_pure_acks_options_fragments_udp() -> None:
    acks = [tcp_packet(b"", seq=1), tcp_packet(b"", seq=1)]
    ip_options = b"\x46" + tcp_packet(b"x")[1:]
    fragment = tcp_packet(b"y" * 10)[:6] + b"\x20\x00" + tcp_packet(b"y" * 10)[8:]
    udp = bytes.fromhex("4500001c000000004011") + bytes(18)
    packets = [*acks, ip_options, fragment, udp]
    writes = offload.coalesce_tcp4(packets)
    assert [(w[0], b"".join(w[1]), w[2]) for w in writes] == [(VNET_NONE, p, 1) for p in packets]


def test_a_run_stops_at_64_kb() -> None:
    packets = segments_of(50)  # 50 x 1380 > 65535
    writes = offload.coalesce_tcp4(packets)
    assert [w[2] for w in writes] == [47, 3]
    assert all(len(b"".join(w[1])) <= 65535 for w in writes)


def test_a_segment_that_is_not_merged_ends_its_flows_run() -> None:
    """Data, a pure ACK of the same flow, data: the second data segment is not merged
    into a write ahead of the ACK (each flow's packets stay in their order)."""
    first, second = segments_of(2)
    ack = tcp_packet(b"", seq=1000 + 1380)
    writes = offload.coalesce_tcp4([first, ack, second])
    assert [b"".join(w[1]) for w in writes] == [first, ack, second]
