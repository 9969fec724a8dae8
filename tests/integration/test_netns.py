"""Namespace topologies: the lab comes up and routes, and nothing outlives down()."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from seng_fw.lab import topology
from seng_fw.lab.topology import Host, Route, Segment, Topology, lab_topology
from seng_fw.system.netns import NetnsError, cleanup, ip, list_namespaces, read_sysctl

# Tests that touch the kernel take a fixture that needs root (require_root);
# the pure validation tests run anywhere.


def ip_netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_lab_hosts_reach_each_other(lab: Topology) -> None:
    assert lab.ping("clienta", lab.address("gw", "lan"))
    assert lab.ping("clientb", lab.address("gw", "lan"))
    assert lab.ping("clienta", lab.address("clientb", "lan"))  # the LAN is a bridge
    assert lab.ping("ext", lab.address("gw", "ext"))
    assert read_sysctl(lab.ns("gw"), "net.ipv4.ip_forward") == "1"
    assert read_sysctl(lab.ns("clienta"), "net.ipv4.ip_forward") == "0"
    assert lab.run("gw", ["ip", "-br", "addr", "show", "lan"]).stdout.split()[2] == "10.77.1.1/24"


def test_lab_gateway_forwards_enclave_subnets(lab: Topology) -> None:
    # Stand in for the tunnel: an "enclave" address on clienta, routed by gw.
    enclave = "192.168.28.2"
    ip("addr", "add", f"{enclave}/32", "dev", "lo", netns=lab.ns("clienta"))
    ip("route", "add", "10.77.2.0/24", "via", "10.77.1.1", netns=lab.ns("clienta"))
    ip("route", "add", f"{enclave}/32", "via", "10.77.1.10", netns=lab.ns("gw"))
    assert topology.ping(lab.ns("clienta"), lab.address("ext", "ext"), source=enclave)
    # without the gateway's route, ext's replies have nowhere to go
    ip("route", "del", f"{enclave}/32", netns=lab.ns("gw"))
    assert not topology.ping(lab.ns("clienta"), "10.77.2.2", source=enclave, timeout=0.3)


def test_lab_addresses_are_configurable() -> None:
    topo = lab_topology("unused-", lan="10.88.0.0/24", ext="10.88.9.0/30")
    assert topo.address("clientb", "lan") == IPv4Address("10.88.0.20")
    assert topo.address("ext", "ext") == IPv4Address("10.88.9.2")
    assert topo.hosts["ext"].routes == (Route.parse("192.168.0.0/16", "10.88.9.1"),)


def test_two_labs_coexist(ns_prefix: str) -> None:
    first, second = lab_topology(ns_prefix + "a-"), lab_topology(ns_prefix + "b-")
    with first, second:
        assert len(list_namespaces(ns_prefix)) == 8
        assert first.ping("clienta", "10.77.1.1") and second.ping("clienta", "10.77.1.1")
    assert list_namespaces(ns_prefix) == []


def test_down_removes_everything_and_is_idempotent(ns_prefix: str) -> None:
    topo = lab_topology(ns_prefix)
    topo.up()
    assert topo.is_up()
    sleeper = topo.popen("gw", [sys.executable, "-c", "import time; time.sleep(60)"])
    assert sorted(topo.down()) == sorted(topo.ns(h) for h in topo.hosts)
    assert sleeper.wait(timeout=5) != 0  # ended by down(): it held the namespace
    assert list_namespaces(ns_prefix) == []
    assert ns_prefix not in ip_netns_list()
    assert topo.down() == []


def test_up_refuses_an_existing_namespace_unless_replace(ns_prefix: str) -> None:
    topo = Topology(ns_prefix, [Host("a"), Host("b")], [])
    ip("netns", "add", topo.ns("b"))  # e.g. a previous run
    with pytest.raises(NetnsError):
        topo.up()
    assert list_namespaces(ns_prefix) == [topo.ns("b")]  # not ours to delete
    topo.up(replace=True)
    assert list_namespaces(ns_prefix) == [topo.ns("a"), topo.ns("b")]
    topo.down()


def test_failed_up_leaves_nothing(ns_prefix: str) -> None:
    # The last step fails: the route's next hop is on no segment.
    topo = Topology(
        ns_prefix,
        [Host("a", routes=(Route.parse("10.0.0.0/8", "172.31.0.1"),)), Host("b")],
        [
            Segment(
                "l",
                IPv4Network("10.66.0.0/30"),
                "b",
                IPv4Address("10.66.0.1"),
                (("a", IPv4Address("10.66.0.2")),),
            )
        ],
    )
    with pytest.raises(NetnsError, match="route add"):
        topo.up()
    assert list_namespaces(ns_prefix) == []


def test_failure_midway_leaves_nothing(ns_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    topo = lab_topology(ns_prefix)
    real = Topology._build_segment
    calls = []

    def flaky(self: Topology, seg: Segment) -> None:
        calls.append(seg.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # even an interrupt must not leak namespaces
        real(self, seg)

    monkeypatch.setattr(Topology, "_build_segment", flaky)
    with pytest.raises(KeyboardInterrupt):
        topo.up()
    assert list_namespaces(ns_prefix) == []


def test_cleanup_removes_a_crashed_runs_leftovers(ns_prefix: str) -> None:
    for name in ("gw", "ext"):
        ip("netns", "add", ns_prefix + name)
    ip(
        "link",
        "add",
        "x",
        "type",
        "veth",
        "peer",
        "name",
        "y",
        "netns",
        ns_prefix + "ext",
        netns=ns_prefix + "gw",
    )
    assert cleanup(ns_prefix) == [ns_prefix + "ext", ns_prefix + "gw"]
    assert list_namespaces(ns_prefix) == []
    with pytest.raises(ValueError):
        cleanup("")


def test_run_and_call_inside_hosts(make_topology: Callable[..., Topology]) -> None:
    topo = make_topology([Host("h", sysctls={"net.ipv4.ip_default_ttl": "33"})])
    assert topo.run("h", ["cat", "/proc/sys/net/ipv4/ip_default_ttl"]).stdout.strip() == "33"
    ttl = Path("/proc/sys/net/ipv4/ip_default_ttl")
    assert topo.call("h", lambda: ttl.read_text().strip()) == "33"
    assert topo.run("h", ["false"], check=False).returncode == 1
    with pytest.raises(subprocess.CalledProcessError):
        topo.run("h", ["false"])
    assert read_sysctl(topo.ns("h"), "net.ipv6.conf.all.disable_ipv6") == "1"


@pytest.mark.parametrize(
    ("hosts", "segments"),
    [
        ([Host("a"), Host("a")], []),
        (
            [Host("a")],
            [
                Segment(
                    "s",
                    IPv4Network("10.0.0.0/24"),
                    "a",
                    IPv4Address("10.0.0.1"),
                    (("z", IPv4Address("10.0.0.2")),),
                )
            ],
        ),
    ],
)
def test_topology_validation(hosts: list[Host], segments: list[Segment]) -> None:
    with pytest.raises(ValueError):
        Topology("p-", hosts, segments)


def test_segment_validation() -> None:
    net = IPv4Network("10.0.0.0/24")
    with pytest.raises(ValueError):  # address outside the subnet
        Segment("s", net, "a", IPv4Address("10.0.1.1"), (("b", IPv4Address("10.0.0.2")),))
    with pytest.raises(ValueError):  # too long for interface names
        Segment(
            "a-very-long-name", net, "a", IPv4Address("10.0.0.1"), (("b", IPv4Address("10.0.0.2")),)
        )
    with pytest.raises(ValueError):  # duplicate address
        Segment("s", net, "a", IPv4Address("10.0.0.1"), (("b", IPv4Address("10.0.0.1")),))
