"""Delete the conntrack entries of one IPv4 address (ctnetlink via pyroute2).

When an enclave's address is released (`seng_fw.policy.ipam`), its connections
(and their marks, which name the enclave) must not pass to the next enclave
given the same address. `flush_address` removes every entry whose original
or reply tuple has the address as source or destination: without NAT that is
the original source (outgoing connections) or destination (incoming ones);
with NAT the address may appear only in the reply tuple.

Cost: one kernel-filtered dump per tuple field (the kernel walks the table,
only matches reach Python) and one delete per entry, i.e. well under a
millisecond per entry. It blocks; from asyncio code call it through
``loop.run_in_executor(None, flush_address, addr)`` so a large table does
not stall the data path.

Conntrack tables are per network namespace, and a namespace only tracks
connections once something there uses conntrack (an nftables ``ct``
expression, NAT, an iptables ``-m conntrack`` match): before that the table
stays empty.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple, NFCTSocket

from seng_fw.system.netns import run_in_netns

_TUPLES = ("CTA_TUPLE_ORIG", "CTA_TUPLE_REPLY")
_FILTERS = (
    ("tuple_orig", "saddr"),
    ("tuple_orig", "daddr"),
    ("tuple_reply", "saddr"),
    ("tuple_reply", "daddr"),
)


class ConntrackError(RuntimeError):
    """The kernel refused to list or delete conntrack entries."""


def _addresses(msg: Any) -> set[str]:
    """Every IPv4 source and destination of an entry's two tuples."""
    found: set[str] = set()
    for name in _TUPLES:
        tup = msg.get_attr(name)
        ip = None if tup is None else tup.get_attr("CTA_TUPLE_IP")
        if ip is not None:
            found.update(
                a for a in (ip.get_attr("CTA_IP_V4_SRC"), ip.get_attr("CTA_IP_V4_DST")) if a
            )
    return found


def _plain(nla: Any) -> dict[str, Any]:
    """Re-encodable copy of a decoded nested attribute (a tuple to look up)."""
    attrs: list[list[Any]] = []
    for slot in nla["attrs"]:
        name, value = slot[0], slot[1]
        if not name.startswith("CTA_"):
            continue  # attribute pyroute2 cannot name, hence cannot re-encode
        attrs.append([name, _plain(value) if hasattr(value, "get_attr") else value])
    return {"attrs": attrs}


def _dump(ct: Any, address: str) -> Iterator[Any]:
    try:
        for direction, field in _FILTERS:
            yield from ct.dump(**{direction: NFCTAttrTuple(**{field: address})})
    except NetlinkError as exc:
        if exc.code not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        # Kernel without dump filters (before 5.8): walk the whole table.
        yield from ct.dump()


def _flush_here(address: str) -> int:
    deleted = 0
    seen: set[int] = set()
    with NFCTSocket(nfgen_family=socket.AF_INET) as ct:
        # Collect first: deleting while a dump is running can skip entries.
        matches = [m for m in _dump(ct, address) if address in _addresses(m)]
        for msg in matches:
            entry_id = msg.get_attr("CTA_ID")
            if entry_id in seen:
                continue  # matched by several filters
            seen.add(entry_id)
            try:
                # CTA_ID makes the kernel refuse if the tuple now belongs to a
                # newer connection than the one we listed.
                ct.entry(
                    "del",
                    tuple_orig=_plain(msg.get_attr("CTA_TUPLE_ORIG")),
                    id=entry_id,
                    zone=msg.get_attr("CTA_ZONE"),
                )
            except NetlinkError as exc:
                if exc.code == errno.ENOENT:
                    continue  # expired or deleted meanwhile
                raise ConntrackError(f"deleting conntrack entry {entry_id}: {exc}") from exc
            deleted += 1
    return deleted


def flush_address(address: IPv4Address | str, *, netns: str | None = None) -> int:
    """Delete every IPv4 conntrack entry involving `address`; return how many.

    Runs in the current network namespace, or in `netns` if given. Entries
    that expire while we work are not an error.
    """
    addr = str(IPv4Address(address))
    try:
        return run_in_netns(netns, _flush_here, addr)
    except NetlinkError as exc:
        raise ConntrackError(f"listing conntrack entries of {addr}: {exc}") from exc


def count_address(address: IPv4Address | str, *, netns: str | None = None) -> int:
    """How many IPv4 conntrack entries involve `address` (for checks and tests)."""
    addr = str(IPv4Address(address))

    def count() -> int:
        with NFCTSocket(nfgen_family=socket.AF_INET) as ct:
            return len({m.get_attr("CTA_ID") for m in _dump(ct, addr) if addr in _addresses(m)})

    return run_in_netns(netns, count)
