"""flush_address against real conntrack entries in a private namespace.

Traffic runs over loopback between addresses added to `lo`. A conntrack
table only fills once the namespace uses conntrack, hence the nftables
``ct`` rule; the output DNAT rule gives an entry whose translated address
appears only in the reply tuple.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator

import pytest
from pyroute2.conntrack import Conntrack

from seng_fw.gateway.conntrack import count_address, flush_address
from seng_fw.lab.topology import ping
from seng_fw.system.netns import ip, netns_socket, run_in_netns

pytestmark = pytest.mark.root

RULESET = """
table ip sfwtest {
  chain out { type filter hook output priority 0; ct state new counter; }
  chain nat_out {
    type nat hook output priority -100;
    ip daddr 10.99.0.8 udp dport 7000 dnat to 192.168.28.9;
  }
}
"""
ADDRESSES = [f"192.168.28.{i}" for i in range(2, 10)]


def entry_addresses(netns: str) -> list[set[str]]:
    """Addresses of every entry, listed with pyroute2's unfiltered dump (independent path)."""

    def dump() -> list[set[str]]:
        with Conntrack() as ct:
            return [
                {e.tuple_orig.saddr, e.tuple_orig.daddr, e.tuple_reply.saddr, e.tuple_reply.daddr}
                for e in ct.dump_entries()
            ]

    return run_in_netns(netns, dump)


@pytest.fixture
def ct_ns(host_ns: str) -> Iterator[str]:
    for addr in ADDRESSES:
        ip("addr", "add", f"{addr}/32", "dev", "lo", netns=host_ns)
    ip("route", "add", "10.99.0.0/24", "dev", "lo", netns=host_ns)  # routable before DNAT
    subprocess.run(
        ["ip", "netns", "exec", host_ns, "nft", "-f", "-"], input=RULESET, text=True, check=True
    )
    sockets: list[socket.socket] = []

    def udp(src: str, dst: str, port: int = 7000) -> None:
        s = netns_socket(host_ns, socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((src, 0))
        s.sendto(b"x", (dst, port))
        sockets.append(s)

    udp("192.168.28.2", "192.168.28.3")  # .2 as original source, twice
    udp("192.168.28.2", "192.168.28.3")
    udp("192.168.28.7", "192.168.28.2")  # .2 as original destination
    udp("192.168.28.4", "10.99.0.8")  # DNAT: .9 only in the reply tuple
    udp("192.168.28.5", "192.168.28.6")  # bystander
    # a TCP connection and an ICMP exchange from .2 as well
    listener = netns_socket(host_ns, socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("192.168.28.3", 7001))
    listener.listen()
    client = netns_socket(host_ns, socket.AF_INET, socket.SOCK_STREAM)
    client.bind(("192.168.28.2", 0))
    client.connect(("192.168.28.3", 7001))
    sockets += [listener, client]
    assert ping(host_ns, "192.168.28.3", source="192.168.28.2")
    try:
        yield host_ns
    finally:
        for s in sockets:
            s.close()


def test_entries_exist_as_set_up(ct_ns: str) -> None:
    # udp x2 + udp in + tcp + icmp
    assert count_address("192.168.28.2", netns=ct_ns) == 5
    assert count_address("192.168.28.9", netns=ct_ns) == 1
    assert count_address("192.168.28.5", netns=ct_ns) == 1


def test_flush_deletes_only_that_address(ct_ns: str) -> None:
    before = entry_addresses(ct_ns)
    assert flush_address("192.168.28.2", netns=ct_ns) == 5
    after = entry_addresses(ct_ns)
    assert not any("192.168.28.2" in e for e in after)
    assert [e for e in before if "192.168.28.2" not in e] == after
    assert count_address("192.168.28.5", netns=ct_ns) == 1
    assert flush_address("192.168.28.2", netns=ct_ns) == 0  # nothing left: no error


def test_flush_matches_reply_tuple_after_nat(ct_ns: str) -> None:
    [nat_entry] = [e for e in entry_addresses(ct_ns) if "10.99.0.8" in e]
    assert "192.168.28.9" in nat_entry  # reply source only
    assert flush_address("192.168.28.9", netns=ct_ns) == 1
    assert count_address("192.168.28.4", netns=ct_ns) == 0
    assert count_address("192.168.28.5", netns=ct_ns) == 1


def test_flush_in_current_namespace(ct_ns: str) -> None:
    # netns=None means "where the caller runs", e.g. under `ip netns exec`
    assert run_in_netns(ct_ns, flush_address, "192.168.28.6") == 1
    assert count_address("192.168.28.6", netns=ct_ns) == 0


def test_unknown_address_and_empty_table(host_ns: str) -> None:
    assert flush_address("203.0.113.7", netns=host_ns) == 0
