"""Enclaves reach the gateway's own addresses only through rules that name the gateway
(issue 13, defect 2): `to: 0.0.0.0/0` opens the internet, not the gateway's management
plane.

`hook()` runs a packet through a base chain of the compiled table, interpreting the
rules' expressions with the sets' contents (jump, goto, return, vmap), so the tests
follow whatever path the table really takes; the integration test sends real packets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import yaml

from seng_fw.compile.boxes import covers
from seng_fw.compile.compiler import (
    DADDR,
    DPORT,
    L4PROTO,
    ORIGINATOR,
    PROTOCOLS,
    RESPONDER,
    SADDR,
    compile_policy,
    label_table,
)
from seng_fw.compile.nft import (
    AnonymousSet,
    Concat,
    CounterMap,
    Ct,
    Expr,
    Limit,
    Log,
    Match,
    Meta,
    Table,
    Verdict,
    Vmap,
)
from seng_fw.label.marks import NONE, encode
from seng_fw.policy.loader import load_policy
from seng_fw.policy.models import Policy, cross_check
from tests.unit.test_compile_ruleset import ip

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "policies/example.yaml"
DEMO, SHARED = "192.168.28.10", "192.168.29.10"
GW_EXT, GW_TUN = "10.77.2.1", "192.168.28.1"  # the gateway: external side, demo's subnet


@dataclass
class NewPacket:
    src: str
    dst: str
    proto: str
    port: int = 0
    mark: int = 0
    iif: str = "tunFA"
    status: set[str] = field(default_factory=set)

    def value(self, expr: Expr) -> int | str:
        values: dict[Expr, int | str] = {
            SADDR: ip(self.src),
            DADDR: ip(self.dst),
            L4PROTO: PROTOCOLS[self.proto][0],
            DPORT: self.port,
            ORIGINATOR: self.mark & 0xFFFF,
            RESPONDER: self.mark >> 16,
            Ct("mark"): self.mark,
            Meta("iifname"): self.iif,
            Ct("direction"): "original",
        }
        return values[expr]


def _member(table: Table, name: str, packet: NewPacket, left: Expr) -> bool:
    exprs = left.exprs if isinstance(left, Concat) else (left,)
    point = tuple(int(packet.value(e)) for e in exprs)
    return covers(table.set(name).elements, point)


def _matches(table: Table, match: Match, packet: NewPacket) -> bool:
    right = match.right
    if isinstance(right, str) and right.startswith("@"):
        found = _member(table, right[1:], packet, match.left)
        return found if match.op == "==" else not found
    if match.left == Ct("state"):
        return "new" in (right if isinstance(right, tuple) else (right,))
    if match.left == Ct("status"):
        return right in packet.status
    value = packet.value(match.left)
    if isinstance(right, AnonymousSet):
        return any(value == PROTOCOLS[item][0] for item in right.items)
    return (value == right) if match.op == "==" else (value != right)


def hook(table: Table, base: str, packet: NewPacket) -> str:
    """'accept' or 'drop': what the base chain decides for a new connection."""
    stack = [(base, 0)]
    while stack:
        chain, index = stack.pop()
        rules = table.chain(chain).rules
        while index < len(rules):
            rule, index = rules[index], index + 1
            verdict: str | None = None
            for expr in rule.exprs:
                if isinstance(expr, Match):
                    if not _matches(table, expr, packet):
                        break
                elif isinstance(expr, Vmap):
                    named = table.set(expr.map)
                    point = (int(packet.value(expr.lookup)),)
                    hits = [
                        str(v)
                        for e, v in zip(named.elements, named.values, strict=True)
                        if covers([e], point)
                    ]
                    if not hits:
                        break
                    verdict = hits[0]
                    break
                elif isinstance(expr, Verdict):
                    verdict = f"{expr.kind} {expr.target}" if expr.target else expr.kind
                    break
                else:
                    assert isinstance(expr, CounterMap | Limit | Log), expr
            if verdict is None:
                continue
            kind, _, target = verdict.partition(" ")
            if kind in ("accept", "drop"):
                return kind
            if kind == "return":
                break
            if kind == "jump":
                stack.append((chain, index))
            chain, index, rules = target, 0, table.chain(target).rules
    return "accept"  # the base chains' policy


@pytest.fixture(scope="module")
def example() -> tuple[Policy, Table]:
    policy = load_policy(EXAMPLE)
    return policy, compile_policy(policy)


def test_the_internet_does_not_include_the_gateway(example: tuple[Policy, Table]) -> None:
    _, table = example
    # web-clients: tcp 80, 443 to 0.0.0.0/0 ...
    assert hook(table, "forward", NewPacket(DEMO, "8.8.8.8", "tcp", 443)) == "accept"
    # ... but not to the gateway, on any of its addresses
    for address in (GW_EXT, GW_TUN, "10.77.1.1", "192.168.29.1"):
        for port in (80, 443):
            assert hook(table, "input", NewPacket(DEMO, address, "tcp", port)) == "drop"
    # nor the shared subnet's apps (labelled) through their rules
    policy, _ = example
    worker = encode(label_table(policy).label_id("batch-worker", IPv4Address("10.77.1.10")), NONE)
    assert hook(table, "forward", NewPacket(SHARED, "10.77.2.53", "udp", 53, worker)) == "accept"
    assert hook(table, "input", NewPacket(SHARED, GW_EXT, "udp", 53, worker)) == "drop"
    # traffic of no enclave is not seng-fw's business
    assert hook(table, "input", NewPacket("10.77.2.9", GW_EXT, "tcp", 22, iif="ext")) == "accept"


POLICY = """
shared_subnet: {subnet: 192.168.29.0/24}
apps:
  - name: own
    mrenclave: "11"
    hosts: 10.77.1.0/24
    subnet: {subnet: 192.168.28.0/24}
    egress:
      - {to: 0.0.0.0/0, protocol: tcp, ports: [80, 443]}
      - {to: {gateway: true}, protocol: udp, ports: 53}
      - {to: 10.77.2.1, protocol: udp, ports: 123}
      - {to: 10.77.2.0/24, protocol: tcp, ports: 22}
  - name: shared
    mrenclave: "22"
    hosts: 10.77.1.0/24
    egress:
      - {to: {gateway: true}, protocol: tcp, ports: 8080}
"""


def _policy(text: str) -> Policy:
    data = yaml.safe_load(text)
    for app in data["apps"]:
        app["mrenclave"] = app["mrenclave"] * 32
    return Policy.model_validate(data)


def test_rules_that_name_the_gateway_reach_it() -> None:
    policy = _policy(POLICY)
    assert cross_check(policy) == []
    table = compile_policy(policy)

    def to_gateway(src: str, dst: str, proto: str, port: int, mark: int = 0) -> bool:
        return hook(table, "input", NewPacket(src, dst, proto, port, mark)) == "accept"

    for address in (GW_EXT, GW_TUN, "10.77.1.1"):  # {gateway: true}: every address
        assert to_gateway(DEMO, address, "udp", 53)
        assert not to_gateway(DEMO, address, "udp", 54)
        assert not to_gateway(DEMO, address, "tcp", 443)  # 0.0.0.0/0 does not name it
    # an address written out: that address only
    assert to_gateway(DEMO, GW_EXT, "udp", 123) and not to_gateway(DEMO, GW_TUN, "udp", 123)
    # a prefix that holds the gateway's address does not name it either
    assert not to_gateway(DEMO, GW_EXT, "tcp", 22)
    assert hook(table, "forward", NewPacket(DEMO, "10.77.2.9", "tcp", 22)) == "accept"
    # the shared subnet's app, by its label; unlabelled: refused
    shared = encode(label_table(policy).label_id("shared", IPv4Address("10.77.1.10")), NONE)
    assert to_gateway(SHARED, GW_TUN, "tcp", 8080, shared)
    assert not to_gateway(SHARED, GW_TUN, "tcp", 8081, shared)
    assert not to_gateway(SHARED, GW_TUN, "tcp", 8080, 0)
    # {gateway: true} is not a forwarded destination
    assert hook(table, "forward", NewPacket(DEMO, "8.8.8.8", "udp", 53)) == "drop"


def test_gateway_peer_is_for_egress_only() -> None:
    text = POLICY.replace(
        "      - {to: {gateway: true}, protocol: tcp, ports: 8080}",
        "      - {to: {gateway: true}, protocol: tcp, ports: 8080}\n"
        "    ingress:\n      - {from: {gateway: true}, protocol: tcp, ports: 9}",
    )
    problems = cross_check(_policy(text))
    assert [(path, "egress `to` only" in message) for path, message in problems] == [
        (("apps", 1, "ingress", 0, "from", 0), True)
    ]
    with pytest.raises(ValueError, match=r"\{gateway: true\} alone"):
        _policy(POLICY.replace("{gateway: true}", "{gateway: true, app: own}"))


def test_single_addresses_off_the_gateways_networks_stay_out_of_to_gateway() -> None:
    """A single address can name the gateway only if it is on one of its networks (or
    its address on an enclave subnet): the others do not fill the to_gateway sets."""
    text = "gateway_networks: [10.77.2.0/24]\n" + POLICY.replace(
        "      - {to: 10.77.2.0/24, protocol: tcp, ports: 22}",
        "      - {to: [8.8.8.8, 192.168.28.1], protocol: tcp, ports: 22}",
    )
    table = compile_policy(_policy(text))
    addresses = {box[3] for box in table.set("to_gateway_apps").elements}
    assert (ip("8.8.8.8"),) * 2 not in addresses
    assert (ip("192.168.28.1"),) * 2 in addresses and (ip(GW_EXT),) * 2 in addresses
    assert hook(table, "input", NewPacket(DEMO, GW_TUN, "tcp", 22)) == "accept"
