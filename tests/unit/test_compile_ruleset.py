"""What the compiler puts in the table: the sets decide each flow as the policy says.

`decide()` follows the chains of the table (egress for packets from an enclave subnet,
ingress for packets to one) with the set contents, evaluating the expressions of the
rules on a packet; the integration tests check the same with real packets and the kernel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from seng_fw.compile.boxes import covers
from seng_fw.compile.compiler import (
    DADDR,
    DPORT,
    L4PROTO,
    ORIGINAL_DADDR,
    ORIGINAL_DPORT,
    ORIGINATOR,
    PROTOCOLS,
    RESPONDER,
    SADDR,
    Options,
    compile_policy,
    label_table,
)
from seng_fw.compile.nft import Concat, Expr, Match, Table, Verdict
from seng_fw.label.marks import NONE, encode
from seng_fw.policy.loader import load_policy
from seng_fw.policy.models import Policy

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "policies/example.yaml"

DEMO = "192.168.28.10"  # demo-enclave's subnet
NGINX = "172.16.28.10"  # sdk-nginx's subnet
SHARED = "192.168.29.10"  # batch-worker (shared subnet)


def ip(text: str) -> int:
    return int(IPv4Address(text))


def in_set(table: Table, name: str, *point: int) -> bool:
    return covers(table.set(name).elements, point)


@dataclass
class Packet:
    """The first packet of a new connection and its conntrack mark; after DNAT, the
    connection's original destination (conntrack's `original` direction)."""

    src: int
    dst: int
    proto: int
    port: int
    mark: int
    original_dst: int = 0
    original_port: int = 0

    def value(self, expr: Expr) -> int:
        values = {
            SADDR: self.src,
            DADDR: self.dst,
            L4PROTO: self.proto,
            DPORT: self.port,
            ORIGINATOR: self.mark & 0xFFFF,
            RESPONDER: self.mark >> 16,
            ORIGINAL_DADDR: self.original_dst,
            ORIGINAL_DPORT: self.original_port,
        }
        return values[expr]


def verdict(table: Table, name: str, point: int) -> str | None:
    """What a verdict map says for `point` (None: no element)."""
    named = table.set(name)
    for element, value in zip(named.elements, named.values, strict=True):
        if covers([element], (point,)):
            return str(value)
    return None


def app_allows(table: Table, chain_verdict: str | None, packet: Packet) -> bool:
    """Whether the app chain a verdict leads to returns (allows) the packet: its first
    rule, if it is a set lookup, is the only one that can."""
    if chain_verdict is None or not chain_verdict.startswith("goto "):
        return False
    rule = table.chain(chain_verdict.removeprefix("goto ")).rules[0]
    lookup = rule.exprs[0]
    if not isinstance(lookup, Match) or not isinstance(lookup.right, str):
        return False
    assert rule.exprs[-1] == Verdict("return") and lookup.right.startswith("@")
    assert isinstance(lookup.left, Concat)
    point = tuple(packet.value(expr) for expr in lookup.left.exprs)
    return in_set(table, lookup.right[1:], *point)


def exposure_admits(table: Table, packet: Packet) -> bool:
    """Whether the ingress chain's rule for exposed services returns `packet` (a DNATed
    connection): its lookup, evaluated with the expressions it is keyed on."""
    rule = table.chain("ingress").rules[0]
    (lookup,) = [e for e in rule.exprs if isinstance(e, Match) and e.right == "@expose_from"]
    assert isinstance(lookup.left, Concat) and rule.exprs[-1] == Verdict("return")
    point = tuple(packet.value(expr) for expr in lookup.left.exprs)
    return in_set(table, "expose_from", *point)


def decide(
    table: Table,
    src: str,
    dst: str,
    proto: str,
    port: int = 0,
    mark: int = 0,
    dnat: tuple[str, int] | None = None,
) -> bool:
    """Whether a new connection is accepted, as the egress and ingress chains decide.
    `dnat`: the connection was to this gateway address and port, translated to dst:port."""
    original = (ip(dnat[0]), dnat[1]) if dnat else (0, 0)
    packet = Packet(ip(src), ip(dst), PROTOCOLS[proto][0], port, mark, *original)
    s, d = packet.src, packet.dst
    if in_set(table, "enclave_nets", s):
        chosen = verdict(table, "egress_apps", s)
        if chosen is None and in_set(table, "shared_net", s):
            chosen = verdict(table, "egress_labels", mark & 0xFFFF)
        if not app_allows(table, chosen, packet):
            return False
    if in_set(table, "enclave_nets", d):
        if dnat and exposure_admits(table, packet):
            return True
        chosen = verdict(table, "ingress_apps", d)
        if chosen is None and in_set(table, "shared_net", d):
            chosen = verdict(table, "ingress_labels", mark >> 16)
        if not app_allows(table, chosen, packet):
            return False
    return True


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(EXAMPLE)


@pytest.fixture(scope="module")
def table(policy: Policy) -> Table:
    return compile_policy(policy)


@pytest.mark.parametrize(
    ("src", "dst", "proto", "port", "allowed"),
    [
        # demo-enclave: web-clients (tcp 80, 443 anywhere) and dns (udp 53 to the resolver)
        (DEMO, "8.8.8.8", "tcp", 443, True),
        (DEMO, "8.8.8.8", "tcp", 80, True),
        (DEMO, "8.8.8.8", "tcp", 22, False),
        (DEMO, "10.77.2.53", "udp", 53, True),
        (DEMO, "8.8.8.8", "udp", 53, False),
        (DEMO, "10.77.2.9", "icmp", 0, True),
        (DEMO, "8.8.8.8", "icmp", 0, False),
        # app to app needs both sides: sdk-nginx admits demo-enclave on 443 only
        (DEMO, NGINX, "tcp", 443, True),
        (DEMO, NGINX, "tcp", 80, False),
        (NGINX, DEMO, "tcp", 443, False),
        # sdk-nginx is in dns only
        (NGINX, "10.77.2.53", "udp", 53, True),
        (NGINX, "8.8.8.8", "tcp", 443, False),
        # ingress from the external side
        ("10.77.2.5", NGINX, "tcp", 443, True),
        ("10.77.3.5", NGINX, "tcp", 443, False),
        ("10.77.2.5", NGINX, "udp", 443, False),
        ("10.77.2.5", DEMO, "tcp", 443, False),
        # traffic that touches no enclave subnet is not seng-fw's business
        ("10.77.2.5", "10.77.1.5", "tcp", 22, True),
        # an unassigned part of no subnet... and a shared-subnet app without its label
        (SHARED, "10.77.2.10", "tcp", 5005, False),
    ],
)
def test_flows_of_the_example(
    table: Table, src: str, dst: str, proto: str, port: int, allowed: bool
) -> None:
    assert decide(table, src, dst, proto, port) is allowed


def test_shared_subnet_apps_are_matched_by_label(policy: Policy, table: Table) -> None:
    labels = label_table(policy)
    low, high = IPv4Address("10.77.1.10"), IPv4Address("10.77.1.200")  # rules name .0/25
    worker, worker_high = (labels.label_id("batch-worker", host) for host in (low, high))
    report, report_high = (labels.label_id("report-builder", host) for host in (low, high))
    assert (worker, worker_high, report, report_high) == (5, 6, 7, 8)
    out = encode(worker, NONE)
    assert decide(table, SHARED, "10.77.2.10", "tcp", 5005, mark=out)
    assert decide(table, SHARED, "10.77.2.10", "tcp", 5010, mark=out)
    assert not decide(table, SHARED, "10.77.2.10", "tcp", 5011, mark=out)
    assert not decide(table, SHARED, "10.77.2.10", "tcp", 5005, mark=encode(report, NONE))
    assert decide(table, SHARED, "10.77.2.53", "udp", 53, mark=out)  # category dns
    # a per-app subnet cannot borrow a label
    assert not decide(table, DEMO, "10.77.2.10", "tcp", 5005, mark=out)
    # on_hosts: report-builder's enclaves on 10.77.1.0/25 only
    assert decide(table, SHARED, "10.77.2.10", "tcp", 443, mark=encode(report, NONE))
    assert not decide(table, SHARED, "10.77.2.10", "tcp", 443, mark=encode(report_high, NONE))
    # to {app: batch-worker, host: 10.77.1.0/25}, which admits report-builder
    other = "192.168.29.11"
    assert decide(table, SHARED, other, "tcp", 7000, mark=encode(report_high, worker))
    assert not decide(table, SHARED, other, "tcp", 7000, mark=encode(report, worker_high))
    assert not decide(table, SHARED, other, "tcp", 7000, mark=encode(worker_high, worker))


def test_exposure(table: Table) -> None:
    ports = table.set("expose_port")
    assert ports.elements == [((ip("10.77.2.1"),) * 2, (6, 6), (8443, 8443))]
    assert ports.values == [443]
    assert table.set("expose_addr").elements == []  # the gateway fills it
    assert decide(table, "10.77.2.7", NGINX, "tcp", 443, dnat=("10.77.2.1", 8443))
    assert not decide(table, "10.77.9.7", NGINX, "tcp", 443, dnat=("10.77.2.1", 8443))


def test_counters_and_logging(policy: Policy, table: Table) -> None:
    assert [c.name for c in table.counters] == [
        "tx_demo-enclave",
        "rx_demo-enclave",
        "tx_sdk-nginx",
        "rx_sdk-nginx",
        "tx_batch-worker",
        "rx_batch-worker",
        "tx_report-builder",
        "rx_report-builder",
    ]
    assert table.set("tx_counters").values == ["tx_demo-enclave", "tx_sdk-nginx"]
    # shared-subnet apps by their labels (one per host class: the rules name 10.77.1.0/25)
    assert table.set("tx_labels").elements == [((5, 6),), ((7, 8),)]
    assert table.set("tx_labels").values == ["tx_batch-worker", "tx_report-builder"]
    assert table.set("egress_apps").values == ["goto out_demo-enclave", "goto out_sdk-nginx"]
    assert table.set("egress_labels").values == ["goto out_batch-worker", "goto out_report-builder"]
    assert [r.text() for r in table.chain("in_demo-enclave").rules] == [
        'limit rate 10/minute log prefix "seng-fw demo-enclave: "',
        "drop",
    ]
    assert 'log prefix "seng-fw refused: "' in table.chain("refused").rules[0].text()
    # an app that opts out of logging: its chain drops without a log, or there is no
    # chain at all when it allows nothing in that direction
    quiet_demo = policy.apps[0].model_copy(update={"log_refused": False})
    quiet = compile_policy(policy.model_copy(update={"apps": [quiet_demo, *policy.apps[1:]]}))
    assert quiet.chain("out_demo-enclave").rules[-1].text() == "drop"
    assert quiet.set("ingress_apps").values == ["drop", "goto in_sdk-nginx"]
    silent = policy.model_copy(
        update={"defaults": policy.defaults.model_copy(update={"log_refused": False})}
    )
    silent_table = compile_policy(silent)
    assert [r.text() for r in silent_table.chain("refused").rules] == ["drop"]
    assert "log" not in silent_table.text().replace("log_refused", "")


def test_tun_name_and_table_name(policy: Policy) -> None:
    table = compile_policy(policy, Options(tun="veth-enc", table="seng_test"))
    text = table.text()
    assert 'iifname "veth-enc" ip saddr != @enclave_nets drop' in text
    assert "tunFA" not in text
    doc = table.transaction()["nftables"]
    assert doc[1] == {"add": {"table": {"family": "inet", "name": "seng_test"}}}
    assert doc[2] == {"delete": {"table": {"family": "inet", "name": "seng_test"}}}


def test_json_and_text_carry_the_same_elements(table: Table) -> None:
    text = table.text()
    elements: dict[str, int] = {}
    for command in table.transaction()["nftables"][3:]:
        ((kind, body),) = command["add"].items()
        if kind in ("set", "map", "element"):
            elements[body["name"]] = elements.get(body["name"], 0) + len(body.get("elem", []))
    for named in table.sets:
        assert elements[named.name] == len(named.elements), named.name
        for _, element_text in named.rendered_elements():
            assert f"\t\t\t{element_text}" in text
    json.dumps(table.transaction())  # serialisable


def _app(i: int, count: int) -> dict[str, Any]:
    return {
        "name": f"app{i}",
        "mrenclave": f"{i:064x}",
        "hosts": "10.77.1.0/24",
        "subnet": {"subnet": f"10.{100 + i // 256}.{i % 256}.0/24"},
        "categories": ["web-clients"],
        "egress": [{"to": {"app": f"app{(i + 1) % count}"}, "protocol": "tcp", "ports": 443}],
        "ingress": [{"from": {"app": f"app{(i - 1) % count}"}, "protocol": "tcp", "ports": 443}],
    }


def test_rules_do_not_grow_with_apps(policy: Policy) -> None:
    """Per-packet cost: the base and decision chains are the same for 1 or 300 apps."""
    categories = {"web-clients": policy.categories["web-clients"]}
    big = Policy.model_validate(
        {"categories": categories, "apps": [_app(i, 300) for i in range(300)]}
    )
    small = Policy.model_validate({"categories": categories, "apps": [_app(0, 1)]})

    def shared_chains(t: Table) -> dict[str, list[str]]:
        return {c.name: [r.text() for r in c.rules] for c in t.chains if not c.group}

    def app_chain_lengths(t: Table) -> set[int]:
        return {len(c.rules) for c in t.chains if c.group}

    big_table = compile_policy(big)
    assert shared_chains(big_table) == shared_chains(compile_policy(small))
    assert app_chain_lengths(big_table) == app_chain_lengths(compile_policy(small)) == {2}
    assert len(big_table.set("egress_apps").elements) == 300
    assert decide(big_table, "10.100.7.1", "10.100.8.1", "tcp", 443)
    assert not decide(big_table, "10.100.7.1", "10.100.9.1", "tcp", 443)
