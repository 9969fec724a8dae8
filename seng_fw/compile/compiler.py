"""Policy -> the nftables table seng-fw owns (`table inet seng`).

Shape (nft/seng.nft is the annotated skeleton; it is what this module emits for a
policy without apps):

- Established and related packets are accepted before any lookup; packets from or to
  an enclave subnet that no rule allows are dropped. A flow between two enclaves
  needs both the source's egress and the destination's ingress to allow it.
- The cost per packet does not depend on the number of apps or rules. A new
  connection from an enclave takes one lookup in a verdict map from app subnets to
  the app's chain (`ip saddr vmap @egress_apps` -> `goto out_APP`), then one lookup
  in the app's set, whose key concatenates the fields that matter:
  `meta l4proto . th dport . ip daddr @allowed_out_APP`, elements like
  `tcp . 8000-8080 . 10.1.0.0/16` (sets have `flags interval`, so prefixes and port
  ranges are single elements). Ingress is the same with `in_APP`. One big set keyed
  by app and destination would also be one lookup, but the kernel's concatenated
  interval sets (pipapo) scan bitmaps as wide as the set: with 10,000 apps new
  connections were 3 times slower; per-app sets keep each lookup small.
- Per-app subnets identify the app by source (egress) or destination (ingress)
  address. Apps on the shared subnet are identified by the connection's conntrack
  mark instead (`ct mark & 0xffff vmap @egress_labels`), which the labeller sets (see
  MARK LAYOUT); until it does, their new connections are dropped (fail closed).
- Refused packets of an app end in its own chain: optionally logged, rate-limited,
  with the prefix "seng-fw APP: ", then dropped.
- Per-app packet and byte counters are named counters (`tx_APP`, `rx_APP`) chosen by
  an interval map on the address: one lookup each, for every forwarded packet.

MARK LAYOUT (conntrack mark, set by the labeller on new connections of the shared
subnet): bits 0-15 hold the app id of the enclave that opened the connection, bits
16-31 the app id of the enclave that accepted it; 0 means "not an enclave". App ids
are `app_ids(policy)`: the position of the app in the policy, from 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from seng_fw.compile.boxes import Box, Interval, disjoint
from seng_fw.compile.nft import (
    And,
    Chain,
    Counter,
    Ct,
    Datatype,
    DnatMaps,
    Expr,
    Hook,
    Limit,
    Log,
    Match,
    Meta,
    NamedSet,
    Payload,
    Table,
    Verdict,
    Vmap,
    key,
    network_interval,
)
from seng_fw.compile.nft import CounterMap as CounterMapExpr
from seng_fw.policy.models import App, EgressRule, IngressRule, Peer, Policy, Ref

TABLE = "seng"
DEFAULT_TUN = "tunFA"
ORIGINATOR_MASK = 0x0000FFFF
RESPONDER_MASK = 0xFFFF0000
PROTOCOLS: dict[str, Interval] = {"icmp": (1, 1), "tcp": (6, 6), "udp": (17, 17), "any": (0, 255)}
ALL_PORTS: Interval = (0, 0xFFFF)
LOG_PREFIX = "seng-fw"

SADDR, DADDR = Payload("ip", "saddr"), Payload("ip", "daddr")
L4PROTO, DPORT = Meta("l4proto"), Payload("th", "dport")
ORIGINATOR = And(Ct("mark"), ORIGINATOR_MASK)
RESPONDER = And(Ct("mark"), RESPONDER_MASK)


# Key of the per-app sets: protocol and port first, as rules have few of them, so the
# disjoint elements split along the addresses less often. A rule without ports (icmp,
# any, tcp/udp to every port) covers every port: `th dport` then reads whatever the
# transport header has there (the ICMP checksum...); a packet too short to have those
# two bytes matches nothing and is dropped.
PEER_KEY: tuple[Datatype, ...] = ("inet_proto", "inet_service", "ipv4_addr")


@dataclass(frozen=True)
class Options:
    tun: str = DEFAULT_TUN  # the gateway's TUN device (gateway config `tun.name`)
    table: str = TABLE


def app_ids(policy: Policy) -> dict[str, int]:
    """The id of each app in conntrack marks: its position in the policy, from 1."""
    return {app.name: index for index, app in enumerate(policy.apps, start=1)}


def label(originator: int, responder: int = 0) -> int:
    """The conntrack mark of a connection between two apps (0: not an enclave)."""
    return (responder << 16) | originator


def counter_names(app: str) -> tuple[str, str]:
    """Names of the app's (transmitted, received) counters in the table."""
    return f"tx_{app}", f"rx_{app}"


def log_chain(app: str) -> str:
    return f"log_{app}"


# --- from rules to boxes -----------------------------------------------------------


class _Resolver:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.subnets = {
            app.name: network_interval(policy.subnet_of(app).subnet) for app in policy.apps
        }

    def peers(self, peers: Iterable[Peer]) -> list[Interval]:
        out: list[Interval] = []
        for peer in peers:
            if not isinstance(peer, Ref):
                out.append(network_interval(peer))
            elif peer.kind == "app":
                out.append(self.subnets[peer.name])
            else:
                out += [self.subnets[app.name] for app in self.policy.members(peer.name)]
        return out

    def egress(self, app: App) -> Iterator[EgressRule]:
        yield from app.egress
        for category in app.categories:
            yield from self.policy.categories[category].egress

    def ingress(self, app: App) -> Iterator[IngressRule]:
        yield from app.ingress
        for category in app.categories:
            yield from self.policy.categories[category].ingress


def _rule_boxes(peers: list[Interval], protocol: str, ports: list[tuple[int, int]]) -> list[Box]:
    """Elements (proto . port . peer) of one rule."""
    proto = PROTOCOLS[protocol]
    return [(proto, port, peer) for peer in peers for port in ports or [ALL_PORTS]]


# --- the table ------------------------------------------------------------------------


def compile_policy(policy: Policy, options: Options | None = None) -> Table:
    """The whole table for `policy`; `Table.transaction()` / `Table.text()` render it."""
    opts = options or Options()
    resolve = _Resolver(policy)
    ids = app_ids(policy)
    table = Table(opts.table)
    sets = _declare_sets(table)

    sets["enclave_nets"].elements = [
        (i,) for (i,) in disjoint((network_interval(s.subnet),) for s in policy.enclave_subnets())
    ]
    sets["shared_net"].add((network_interval(policy.shared_subnet.subnet),))
    expose_from: list[Box] = []
    for app in policy.apps:
        own = app.subnet is not None
        subnet = resolve.subnets[app.name]
        group = f"app {app.name} (id {ids[app.name]}, {policy.subnet_of(app).subnet})"
        egress = [(resolve.peers(rule.to), rule) for rule in resolve.egress(app)]
        ingress = [(resolve.peers(rule.from_), rule) for rule in resolve.ingress(app)]
        out_verdict = _app_chain(table, policy, app, "out", egress, group)
        in_verdict = _app_chain(table, policy, app, "in", ingress, group)
        if own:
            sets["egress_apps"].add((subnet,), out_verdict)
            sets["ingress_apps"].add((subnet,), in_verdict)
            tx, rx = counter_names(app.name)
            table.counters += [Counter(tx, group=group), Counter(rx, group=group)]
            sets["tx_counters"].add((subnet,), tx)
            sets["rx_counters"].add((subnet,), rx)
        else:
            origin, responder = label(ids[app.name]), label(0, ids[app.name])
            sets["egress_labels"].add(((origin, origin),), out_verdict)
            sets["ingress_labels"].add(((responder, responder),), in_verdict)
        for exposure in app.expose:
            where = (int(exposure.address), int(exposure.address))
            proto = PROTOCOLS[exposure.protocol]
            port = (exposure.target_port, exposure.target_port)
            expose_from += [(peer, where, proto, port) for peer in resolve.peers(exposure.from_)]
            sets["expose_port"].add(
                (where, proto, (exposure.port, exposure.port)), exposure.target_port
            )
    sets["expose_from"].elements = disjoint(expose_from)
    _add_chains(table, policy, opts)
    return table


def _app_chain(
    table: Table,
    policy: Policy,
    app: App,
    direction: str,
    rules: Sequence[tuple[list[Interval], EgressRule | IngressRule]],
    group: str,
) -> str:
    """The app's chain for one direction (`out_APP`: to peers, `in_APP`: from peers) and
    its sets; returns the verdict that leads to it. Allowed packets `return` (to the
    base chain that jumped to `egress`/`ingress`); the others are dropped, logged first
    if the app logs refusals."""
    boxes = [box for peers, rule in rules for box in _rule_boxes(peers, rule.protocol, rule.ports)]
    chain = Chain(f"{direction}_{app.name}", group=group)
    if boxes:
        # One set per app and direction: the kernel looks sets up by name in a list,
        # so their number is what makes a large policy slow to load.
        allowed = NamedSet(f"allowed_{direction}_{app.name}", PEER_KEY, group=group)
        allowed.elements = disjoint(boxes)
        table.sets.append(allowed)
        peer = DADDR if direction == "out" else SADDR
        chain.add(_lookup((L4PROTO, DPORT, peer), allowed.name), Verdict("return"))
    if policy.logs_refused(app):
        chain.add(_limit(policy), Log(f"{LOG_PREFIX} {app.name}: "))
    elif not chain.rules:
        return "drop"  # nothing allowed and nothing to log: no chain needed
    chain.add(Verdict("drop"))
    table.chains.append(chain)
    return f"goto {chain.name}"


def _declare_sets(table: Table) -> dict[str, NamedSet]:
    addr: Final = "ipv4_addr"
    proto: Final = "inet_proto"
    port: Final = "inet_service"
    mark: Final = "mark"
    declared = [
        NamedSet("enclave_nets", (addr,), comment="every enclave subnet"),
        NamedSet("shared_net", (addr,), comment="the shared subnet: apps told apart by ct mark"),
        NamedSet(
            "egress_apps", (addr,), data="verdict", comment="app subnet -> the app's out_ chain"
        ),
        NamedSet(
            "ingress_apps", (addr,), data="verdict", comment="app subnet -> the app's in_ chain"
        ),
        NamedSet(
            "egress_labels",
            (mark,),
            data="verdict",
            comment="shared subnet: originator app id (ct mark bits 0-15) -> out_ chain",
        ),
        NamedSet(
            "ingress_labels",
            (mark,),
            data="verdict",
            comment="shared subnet: responder app id << 16 (ct mark bits 16-31) -> in_ chain",
        ),
        NamedSet(
            "expose_from",
            (addr, addr, proto, port),
            comment="exposed services: source . gateway address . protocol . enclave port",
        ),
        NamedSet(
            "expose_addr",
            (addr, proto, port),
            interval=False,
            data=addr,
            comment="exposed services -> serving enclave (filled by the gateway)",
        ),
        NamedSet(
            "expose_port",
            (addr, proto, port),
            interval=False,
            data=port,
            comment="exposed services -> enclave port",
        ),
        NamedSet("tx_counters", (addr,), data="counter", comment="app subnet -> its tx counter"),
        NamedSet("rx_counters", (addr,), data="counter", comment="app subnet -> its rx counter"),
    ]
    table.sets += declared
    return {named.name: named for named in declared}


def _limit(policy: Policy) -> Limit:
    rate, per = policy.defaults.log_rate.split("/")
    return Limit(int(rate), per)


def _lookup(exprs: tuple[Expr, ...], name: str) -> Match:
    return Match(key(*exprs), f"@{name}")


def _add_chains(table: Table, policy: Policy, opts: Options) -> None:
    enclave_src = Match(SADDR, "@enclave_nets")
    enclave_dst = Match(DADDR, "@enclave_nets")
    from_tun = Match(Meta("iifname"), opts.tun)
    not_from_tun = Match(Meta("iifname"), opts.tun, "!=")
    established = Match(Ct("state"), ("established", "related"), "in")
    anti_spoof = [
        (
            (from_tun, Match(SADDR, "@enclave_nets", "!="), Verdict("drop")),
            "the TUN device carries enclave addresses only",
        ),
        ((not_from_tun, enclave_src, Verdict("drop")), "enclave addresses come from the TUN only"),
    ]
    filter_prio = 0

    forward = Chain("forward", hook=Hook("filter", "forward", filter_prio, "filter"))
    forward.add(
        CounterMapExpr(SADDR, "tx_counters"),
        comment="per-app counters first (a miss ends only this rule)",
    )
    forward.add(CounterMapExpr(DADDR, "rx_counters"))
    for exprs, why in anti_spoof:
        forward.add(*exprs, comment=why)
    forward.add(established, Verdict("accept"), comment="allowed connections go on")
    forward.add(enclave_src, Verdict("jump", "egress"))
    forward.add(enclave_dst, Verdict("jump", "ingress"), comment="enclave to enclave: both sides")

    inbound = Chain("input", hook=Hook("filter", "input", filter_prio, "filter"))
    for exprs, why in anti_spoof:
        inbound.add(*exprs, comment=why)
    inbound.add(established, Verdict("accept"))
    inbound.add(enclave_src, Verdict("jump", "egress"), comment="enclaves to the gateway itself")

    outbound = Chain("output", hook=Hook("filter", "output", filter_prio, "filter"))
    outbound.add(established, Verdict("accept"))
    outbound.add(enclave_dst, Verdict("jump", "ingress"), comment="the gateway to enclaves")

    expose = Chain("expose", hook=Hook("nat", "prerouting", -100, "dstnat"))
    expose.add(
        DnatMaps(key(DADDR, L4PROTO, DPORT), "expose_addr", "expose_port"),
        comment="exposed services: a miss (no enclave serving yet) changes nothing",
    )

    egress = Chain(
        "egress", comment="new connections from enclaves: the app's chain returns if allowed"
    )
    egress.add(Vmap(SADDR, "egress_apps"), comment="per-app subnets: by source address")
    egress.add(
        Match(SADDR, "@shared_net"),
        Vmap(ORIGINATOR, "egress_labels"),
        comment="shared subnet: by the labeller's conntrack mark",
    )
    egress.add(Verdict("goto", "refused"))

    ingress = Chain(
        "ingress", comment="new connections to enclaves: the app's chain returns if allowed"
    )
    ingress.add(
        Match(Ct("status"), "dnat", "in"),
        _lookup((SADDR, Ct("ip daddr", "original"), L4PROTO, DPORT), "expose_from"),
        Verdict("return"),
        comment="connections to an exposed service, by their original destination",
    )
    ingress.add(Vmap(DADDR, "ingress_apps"))
    ingress.add(Match(DADDR, "@shared_net"), Vmap(RESPONDER, "ingress_labels"))
    ingress.add(Verdict("goto", "refused"))

    refused = Chain("refused", comment="what no app's chain decides: unassigned or unlabelled")
    if policy.defaults.log_refused:
        refused.add(_limit(policy), Log(f"{LOG_PREFIX} refused: "))
    refused.add(Verdict("drop"))

    # Base chains first, then the chains they use, then the apps' chains.
    table.chains[:0] = [forward, inbound, outbound, expose, egress, ingress, refused]
