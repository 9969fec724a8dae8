"""Read the named counters of one nftables table straight from the kernel (nfnetlink).

Why not libnftables: nft 1.0.6 fills its whole cache, every set element included,
before it answers `list tables` or `list counters table ...`: with 10,000 apps
(272,000 elements) each such listing took 2.5 to 3 s of CPU and 485 MB, and `apply`,
`diff`, `status` and every exposure update of the gateway need only the table's
existence and its counters. Here one NFT_MSG_GETTABLE request and one NFT_MSG_GETOBJ
dump, filtered by the kernel to the table and to counters, answer that in
milliseconds; pyroute2 has no message class for nftables objects (NFT_MSG_GETOBJ),
hence these few lines by hand. (Reads only: everything seng-fw writes still goes
through libnftables.)
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETTABLE, NFT_MSG_GETOBJ = 1, 19
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR = 0x1, 0x4, 0x300, 0x10
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFPROTO = {"inet": 1, "ip": 2, "ip6": 10}
NFTA_TABLE_NAME = 1
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFT_OBJECT_COUNTER = 1
NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 2
_HEADER = struct.Struct("=IHHII")  # nlmsghdr
_NFGEN = struct.Struct("=BBH")  # nfgenmsg (res_id big-endian 0)
_ATTR = struct.Struct("=HH")
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER


class NetlinkError(OSError):
    """The kernel answered a request with an error."""


def _attr(kind: int, payload: bytes) -> bytes:
    data = _ATTR.pack(_ATTR.size + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def _string(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


def attributes(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each netlink attribute in `data[offset:]`."""
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size:
            return
        yield kind & _NLA_TYPE_MASK, data[offset + _ATTR.size : offset + length]
        offset += (length + 3) & ~3


class _Socket:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def request(self, message: int, flags: int, family: str, payload: bytes) -> Iterator[bytes]:
        """Send one request; yield the body (after nfgenmsg) of each answer until the
        dump ends or the kernel acknowledges (raises NetlinkError on an error)."""
        self.seq += 1
        kind = (NFNL_SUBSYS_NFTABLES << 8) | message
        body = _NFGEN.pack(NFPROTO[family], 0, 0) + payload
        self.sock.send(
            _HEADER.pack(_HEADER.size + len(body), kind, NLM_F_REQUEST | flags, self.seq, 0) + body
        )
        while True:
            data = self.sock.recv(1 << 20)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, mtype, mflags, seq, _ = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    raise NetlinkError(errno.EPROTO, "malformed netlink message")
                chunk = data[offset + _HEADER.size : offset + length]
                offset += (length + 3) & ~3
                if seq != self.seq:
                    continue
                if mflags & NLM_F_DUMP_INTR:  # the ruleset changed while being dumped
                    raise NetlinkError(errno.EINTR, "dump interrupted by a ruleset change")
                if mtype == NLMSG_DONE:
                    if len(chunk) >= 4 and (code := struct.unpack_from("=i", chunk)[0]) < 0:
                        raise NetlinkError(-code, os.strerror(-code))  # the dump failed
                    return
                if mtype == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", chunk)
                    if code:
                        raise NetlinkError(-code, os.strerror(-code))
                    return  # the acknowledgement of a request without a dump
                yield chunk[_NFGEN.size :]


def table_counters(family: str, table: str) -> dict[str, tuple[int, int]] | None:
    """{counter name: (packets, bytes)} of the named counters of `family table`, in the
    network namespace of the calling thread; None if there is no such table. A dump
    that a concurrent ruleset change interrupted is read again (a partial one would
    reset counters or force a reload)."""
    for _ in range(4):
        try:
            return _table_counters(family, table)
        except NetlinkError as exc:
            if exc.errno != errno.EINTR:
                raise
    return _table_counters(family, table)


def _table_counters(family: str, table: str) -> dict[str, tuple[int, int]] | None:
    sock = _Socket()
    try:
        try:
            for _ in sock.request(
                NFT_MSG_GETTABLE, NLM_F_ACK, family, _string(NFTA_TABLE_NAME, table)
            ):
                pass
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        query = _string(NFTA_OBJ_TABLE, table) + _attr(
            NFTA_OBJ_TYPE, struct.pack("!I", NFT_OBJECT_COUNTER)
        )
        out: dict[str, tuple[int, int]] = {}
        for body in sock.request(NFT_MSG_GETOBJ, NLM_F_DUMP, family, query):
            name, owner, packets, count = "", "", 0, 0
            kind = 0
            for attr, payload in attributes(body):
                if attr == NFTA_OBJ_NAME:
                    name = payload.rstrip(b"\0").decode()
                elif attr == NFTA_OBJ_TABLE:
                    owner = payload.rstrip(b"\0").decode()
                elif attr == NFTA_OBJ_TYPE:
                    (kind,) = struct.unpack("!I", payload)
                elif attr == NFTA_OBJ_DATA:
                    for field, value in attributes(payload):
                        if field == NFTA_COUNTER_PACKETS:
                            (packets,) = struct.unpack("!Q", value)
                        elif field == NFTA_COUNTER_BYTES:
                            (count,) = struct.unpack("!Q", value)
            if owner == table and kind == NFT_OBJECT_COUNTER:  # (kernels that do not filter)
                out[name] = (packets, count)
        return out
    finally:
        sock.close()
