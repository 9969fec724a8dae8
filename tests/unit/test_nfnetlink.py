"""The nfnetlink reader's handling of a failed or interrupted dump (pure parsing: a
scripted socket stands in for the kernel's answers)."""

from __future__ import annotations

import errno
import struct

import pytest

from seng_fw.compile import nfnetlink
from seng_fw.compile.nfnetlink import NLM_F_DUMP, NLM_F_DUMP_INTR, NetlinkError


class _Scripted:
    """Answers each send with the messages `answer(seq)` builds."""

    def __init__(self, answer: object) -> None:
        self.answer, self.queue = answer, []  # type: ignore[var-annotated]

    def send(self, data: bytes) -> None:
        seq = struct.unpack_from("=IHHII", data)[3]
        self.queue.append(self.answer(seq))  # type: ignore[operator]

    def recv(self, size: int) -> bytes:
        return self.queue.pop(0)  # type: ignore[no-any-return]


def _message(mtype: int, flags: int, seq: int, body: bytes) -> bytes:
    padding = b"\0" * (-len(body) % 4)  # messages are 4-byte aligned
    return struct.pack("=IHHII", 16 + len(body), mtype, flags, seq, 0) + body + padding


def _reader(answer: object) -> nfnetlink._Socket:
    reader = nfnetlink._Socket.__new__(nfnetlink._Socket)
    reader.sock, reader.seq = _Scripted(answer), 0  # type: ignore[assignment]
    return reader


def test_a_dump_that_ends_in_an_error_raises() -> None:
    reader = _reader(
        lambda seq: _message(nfnetlink.NLMSG_DONE, 0, seq, struct.pack("=i", -errno.ENOBUFS))
    )
    with pytest.raises(NetlinkError) as raised:
        list(reader.request(nfnetlink.NFT_MSG_GETOBJ, NLM_F_DUMP, "inet", b""))
    assert raised.value.errno == errno.ENOBUFS


def test_a_dump_interrupted_by_a_ruleset_change_raises_eintr() -> None:
    body = struct.pack("=BBH", 1, 0, 0)
    reader = _reader(
        lambda seq: (
            _message(16, NLM_F_DUMP_INTR, seq, body)
            + _message(nfnetlink.NLMSG_DONE, 0, seq, struct.pack("=i", 0))
        )
    )
    with pytest.raises(NetlinkError) as raised:
        list(reader.request(nfnetlink.NFT_MSG_GETOBJ, NLM_F_DUMP, "inet", b""))
    assert raised.value.errno == errno.EINTR


def test_a_clean_dump_yields_its_messages() -> None:
    body = struct.pack("=BBH", 1, 0, 0) + b"payload"
    reader = _reader(
        lambda seq: (
            _message(16, 0, seq, body)
            + _message(nfnetlink.NLMSG_DONE, 0, seq, struct.pack("=i", 0))
        )
    )
    assert list(reader.request(nfnetlink.NFT_MSG_GETOBJ, NLM_F_DUMP, "inet", b"")) == [b"payload"]
