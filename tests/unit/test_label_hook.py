"""The labeller's pure part, the verdict adapter and the kernel's queue counters."""

from __future__ import annotations

import errno
import socket
import struct
from ipaddress import IPv4Address, IPv4Network

import pytest

from seng_fw.label.hook import (
    LabelHook,
    Labeller,
    _Budget,
    parse_queue_stats,
)
from seng_fw.label.marks import NONE, UNKNOWN, decode, encode
from seng_fw.label.registry import EnclaveRecord, Registry, Scope

A = IPv4Address
SCOPE = Scope(IPv4Network("192.168.28.0/24"), frozenset({A("192.168.28.1")}))


def header(src: str, dst: str, proto: int = 6) -> bytes:
    return struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 60, 1, 0x4000, 64, proto, 0, A(src).packed, A(dst).packed
    )


def registry() -> Registry:
    reg = Registry(SCOPE)
    for address, label in (("192.168.28.10", 1), ("192.168.28.21", 3)):
        reg.add(EnclaveRecord(A(address), f"app{label}", label, A("10.1.0.2")))
    return reg


def test_marks_of_first_packets() -> None:
    labeller = Labeller(registry())
    assert labeller.mark(header("192.168.28.10", "10.2.0.2")) == encode(1, NONE)
    assert labeller.mark(header("10.2.0.2", "192.168.28.21")) == encode(NONE, 3)
    assert labeller.mark(header("192.168.28.10", "192.168.28.21")) == encode(1, 3)
    assert labeller.mark(header("192.168.28.1", "192.168.28.21")) == encode(NONE, 3)
    assert labeller.mark(header("192.168.28.99", "10.2.0.2")) == encode(UNKNOWN, NONE)
    assert labeller.mark(header("10.2.0.2", "192.168.28.98")) == encode(NONE, UNKNOWN)
    assert labeller.counters() == {
        "labelled": 6,
        "unknown_source": 1,
        "unknown_destination": 1,
        "malformed": 0,
    }


@pytest.mark.parametrize("data", [b"", b"\x45" * 19, b"\x60" + bytes(39)])
def test_not_ipv4_is_dropped(data: bytes) -> None:
    labeller = Labeller(registry())
    assert labeller.mark(data) is None
    assert labeller.malformed == 1 and labeller.labelled == 0


def test_options_and_payload_beyond_the_addresses_do_not_matter() -> None:
    labeller = Labeller(registry())
    assert labeller.mark(header("192.168.28.10", "10.2.0.2") + b"\x01" * 40) == encode(1, NONE)


def test_proc_queue_stats() -> None:
    text = "    5  22407     0 2    20     0     0        1  1\n" \
           "    6  22408     3 2    20    17     2      900  1\n"  # fmt: skip
    stats = parse_queue_stats(text)
    assert stats[5].portid == 22407 and stats[5].copy_range == 20
    assert (stats[6].waiting, stats[6].queue_dropped, stats[6].user_dropped) == (3, 17, 2)
    assert stats[6].id_sequence == 900
    assert parse_queue_stats("") == {} and parse_queue_stats("garbage line\n") == {}


class FakePacket:
    def __init__(self, payload: bytes, fail: bool = False) -> None:
        self.payload, self.fail = payload, fail
        self.verdict: str | None = None
        self.mark: int | None = None

    def get_payload(self) -> bytes:
        if self.fail:
            raise RuntimeError("payload gone")
        return self.payload

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def accept(self) -> None:
        self.verdict = "accept"

    def drop(self) -> None:
        self.verdict = "drop"


def test_verdicts() -> None:
    hook = LabelHook(registry(), [0])
    good = FakePacket(header("192.168.28.10", "192.168.28.21"))
    hook._on_packet(good)
    assert good.verdict == "accept" and good.mark is not None and decode(good.mark) == (1, 3)
    bad = FakePacket(b"\x60")
    hook._on_packet(bad)
    assert bad.verdict == "drop" and bad.mark is None
    broken = FakePacket(b"", fail=True)
    hook._on_packet(broken)  # must not raise
    assert broken.verdict == "drop" and hook.verdict_errors == 1


def test_budget_ends_a_batch_with_would_block() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with left, right:
        for i in range(5):
            right.send(bytes([i]))
        budget = _Budget(left, 3, LabelHook(registry(), [0]))
        assert [budget.recv(100) for _ in range(3)] == [b"\x00", b"\x01", b"\x02"]
        with pytest.raises(BlockingIOError) as raised:
            budget.recv(100)
        assert raised.value.errno == errno.EAGAIN
        # Nothing left to read: would block, not block.
        drained = _Budget(left, 10, LabelHook(registry(), [0]))
        assert [drained.recv(100) for _ in range(2)] == [b"\x03", b"\x04"]
        with pytest.raises(BlockingIOError):
            drained.recv(100)


def test_a_hook_needs_a_queue() -> None:
    with pytest.raises(ValueError):
        LabelHook(registry(), [])
