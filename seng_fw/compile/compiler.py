"""Policy -> the nftables table seng-fw owns (`table inet seng`).

Shape (nft/seng.nft is the annotated skeleton; it is what this module emits for a
policy without apps):

- Established and related packets are accepted before any lookup; packets from or to
  an enclave subnet that no rule allows are dropped. A flow between two enclaves
  needs both the source's egress and the destination's ingress to allow it.
- The cost per packet does not depend on the number of apps or rules. A new
  connection from an enclave takes one lookup in a verdict map to the app's chain,
  then one lookup in a set of rules, whose key concatenates the fields that matter:
  the app, protocol, port and the peer's address, e.g.
  `ip saddr . meta l4proto . th dport . ip daddr @allowed_out_0`, elements like
  `10.0.3.0/24 . tcp . 8000-8080 . 10.1.0.0/16` (sets have `flags interval`, so
  prefixes and ranges are single elements); and the peer's label (below) where a rule
  of the set names enclaves of the shared subnet. Ingress is the same with `in_APP`
  and the ends swapped.
- Apps share a rule set in groups of GROUP_SIZE (`allowed_out_0` holds the egress
  rules of the first 64 apps). One set per app made large policies slow to load (the
  kernel finds sets by name in a list: quadratic in the number of sets); one set for
  all apps made new connections slow (the kernel's concatenated interval sets, pipapo,
  scan bitmaps as wide as the set). A group keeps both bounded.
- Apps with their own subnet are identified by source (egress) or destination
  (ingress) address: `ip saddr vmap @egress_apps`. Apps on the shared subnet are
  identified by the label ids in the connection's conntrack mark, which the labeller
  sets (see MARK LAYOUT): `ct mark & 0x0000ffff vmap @egress_labels`; their rule sets
  (`allowed_out_shared_0`) start with the label instead of the address. Until the
  labeller marks a connection, its new connections are dropped (fail closed).
- Rules may name enclaves of the shared subnet as peers (`{app: X}`, `{category: C}`,
  `{host: PREFIX}`, combined): the element then holds the shared subnet and their
  label ids (`... . 192.168.28.0/24 . 0x00000007-0x0000000b`); a peer known by its
  address has every label (0x0000-0xffff).
- New connections from enclaves to the gateway's own addresses (input hook) are not
  decided by the egress rules but by `to_gateway`: one lookup in a set of the egress
  rules that name the gateway (`{gateway: true}`, any of its addresses, or a single
  address written out); prefixes such as 0.0.0.0/0 never reach the gateway.
- Refused packets of an app end in its own chain: optionally logged, rate-limited,
  with the prefix "seng-fw APP: ", then dropped.
- Per-app packet and byte counters are named counters (`tx_APP`, `rx_APP`), chosen by
  an interval map on the address (own subnet) or on the sender's and receiver's label
  (shared subnet): one lookup each, for every forwarded packet.

MARK LAYOUT (conntrack mark, set by the labeller on new connections of the shared
subnet; `seng_fw.label.marks`): bits 0-15 hold the label id of the end that opened the
connection (`ct mark & 0x0000ffff`), bits 16-31 that of the end that accepted it
(`ct mark >> 16`); 0 means "not an enclave", 0xffff an address no enclave holds.
Label ids are those of `label_table(policy)`: one per app and class of client hosts,
where the classes are cut by the host prefixes the rules name; without host prefixes
the id of an app is its position in the policy, from 1 (`app_ids`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from ipaddress import IPv4Network
from typing import Final, Literal

from seng_fw.compile.boxes import Box, Interval, disjoint, merge_intervals
from seng_fw.compile.nft import (
    And,
    AnonymousSet,
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
    Shift,
    Table,
    Verdict,
    Vmap,
    gc_paused,
    key,
    network_interval,
)
from seng_fw.compile.nft import CounterMap as CounterMapExpr
from seng_fw.policy.labels import LabelInfo, LabelTable
from seng_fw.policy.models import App, EgressRule, GatewayRef, IngressRule, Peer, Policy, Ref

TABLE = "seng"
DEFAULT_TUN = "tunFA"
PROTOCOLS: dict[str, Interval] = {"icmp": (1, 1), "tcp": (6, 6), "udp": (17, 17), "any": (0, 255)}
ALL_PORTS: Interval = (0, 0xFFFF)
ANY_LABEL: Interval = (0, 0xFFFF)  # a peer known by address: whatever its label
ANY_ADDRESS: Interval = (0, 0xFFFFFFFF)
LOG_PREFIX = "seng-fw"
# Apps per rule set: large enough that a 10,000-app policy has few sets, small enough
# that a lookup scans little (bench/bench_compile.py).
GROUP_SIZE = 64

SADDR, DADDR = Payload("ip", "saddr"), Payload("ip", "daddr")
L4PROTO, DPORT = Meta("l4proto"), Payload("th", "dport")
ORIGINATOR: Final = And(Ct("mark"), 0x0000FFFF)  # label id of the connection's opener
RESPONDER: Final = Shift(Ct("mark"), 16)  # label id of the end that accepted it
ORIGINAL_DADDR, ORIGINAL_DPORT = Ct("ip daddr", "original"), Ct("proto-dst", "original")
# Who may connect to an exposed service: by the connection's destination before DNAT
# (gateway address and port), so that each exposure has its own sources.
EXPOSE_KEY: Final = (SADDR, ORIGINATOR, ORIGINAL_DADDR, L4PROTO, ORIGINAL_DPORT)

Direction = Literal["out", "in"]


@dataclass(frozen=True)
class Options:
    tun: str = DEFAULT_TUN  # the gateway's TUN device (gateway config `tun.name`)
    table: str = TABLE


def label_table(policy: Policy) -> LabelTable:
    """The label ids of `policy`, for the ruleset and for the labeller's registry (the
    gateway builds its registry with this, so both agree)."""
    return LabelTable.from_policy(policy, policy.host_prefixes())


def app_ids(policy: Policy) -> dict[str, int]:
    """The position of each app in the policy, from 1: its label id when the rules name
    no host prefix."""
    return {app.name: index for index, app in enumerate(policy.apps, start=1)}


def counter_names(app: str) -> tuple[str, str]:
    """Names of the app's (transmitted, received) counters in the table."""
    return f"tx_{app}", f"rx_{app}"


# --- from rules to boxes -----------------------------------------------------------


def rule_key(direction: Direction, shared: bool) -> tuple[Expr, ...]:
    """What a rule set is keyed on: the app (address, or label on the shared subnet),
    protocol, port, the peer's address and label. Protocol and port come before the peer,
    as rules have few of them: the disjoint elements split along addresses less often.
    A rule without ports (icmp, any, tcp/udp to every port) covers every port: `th dport`
    then reads whatever the transport header has there (the ICMP checksum...); a packet
    too short to have those two bytes matches nothing and is dropped."""
    if direction == "out":
        return (ORIGINATOR if shared else SADDR, L4PROTO, DPORT, DADDR, RESPONDER)
    return (RESPONDER if shared else DADDR, L4PROTO, DPORT, SADDR, ORIGINATOR)


def _key_types(shared: bool) -> tuple[Datatype, ...]:
    return ("mark" if shared else "ipv4_addr", "inet_proto", "inet_service", "ipv4_addr", "mark")


def rule_set_name(direction: Direction, shared: bool, group: int) -> str:
    return f"allowed_{direction}_shared_{group}" if shared else f"allowed_{direction}_{group}"


class _Labels:
    """The label ids of each app, from the labeller's table, indexed by app: the compiler
    asks once per app and rule, so a scan of every app per question (as
    `LabelTable.select` does) would make large policies quadratic."""

    def __init__(self, table: LabelTable) -> None:
        self.by_app: dict[str, list[LabelInfo]] = {}
        for label in range(1, len(table) + 1):
            info = table.info(label)
            assert info is not None
            self.by_app.setdefault(info.app, []).append(info)

    def select(self, apps: Iterable[str], host: IPv4Network | None = None) -> list[Interval]:
        """Ranges of the ids of `apps`' enclaves on client hosts in `host` (None: any);
        the same as `LabelTable.select(apps=apps, host=host)`."""
        low, high = (0, 0xFFFFFFFF) if host is None else network_interval(host)
        return merge_intervals(
            (info.id, info.id)
            for app in apps
            for info in self.by_app.get(app, [])
            if low <= info.hosts[0] and info.hosts[1] <= high
        )


class _Resolver:
    def __init__(self, policy: Policy, labels: LabelTable) -> None:
        self.policy = policy
        self.labels = _Labels(labels)
        self.shared = network_interval(policy.shared_subnet.subnet)
        self.apps = {app.name: app for app in policy.apps}
        self.members: dict[str, list[App]] = {name: [] for name in policy.categories}
        for app in policy.apps:
            for category in app.categories:
                self.members[category].append(app)
        self.subnets = {
            app.name: network_interval(app.subnet.subnet)
            for app in policy.apps
            if app.subnet is not None
        }
        self.gateway_addresses = {s.gateway_address for s in policy.enclave_subnets()}

    def selected(self, ref: Ref) -> list[App]:
        """The apps whose enclaves `ref` names (its host prefix aside)."""
        if ref.kind == "app":
            return [self.apps[ref.name]]
        return self.members[ref.name] if ref.kind == "category" else self.policy.apps

    def peers(self, peers: Iterable[Peer]) -> list[tuple[Interval, Interval]]:
        """(address, label ids) of each peer."""
        out: list[tuple[Interval, Interval]] = []
        for peer in peers:
            if isinstance(peer, GatewayRef):
                continue  # the gateway's own addresses: only in `to_gateway`
            if not isinstance(peer, Ref):  # an address or prefix
                out.append((network_interval(peer), ANY_LABEL))
                continue
            apps = self.selected(peer)
            if peer.host is None:  # apps with their own subnet: by address
                out += [(self.subnets[a.name], ANY_LABEL) for a in apps if a.subnet is not None]
            shared = [a.name for a in apps if a.subnet is None]
            out += [(self.shared, ids) for ids in self.labels.select(shared, peer.host)]
        return out

    def owner(self, app: App, rule: EgressRule | IngressRule) -> list[Interval]:
        """The app's enclaves that `rule` is for: its subnet, or on the shared subnet its
        label ids (those on `on_hosts`, if given). Host restrictions cannot apply to an
        own subnet: a category's rule with `on_hosts` does not reach such an app."""
        if app.subnet is not None:
            return [] if rule.on_hosts else [self.subnets[app.name]]
        hosts: list[IPv4Network | None] = [*rule.on_hosts] or [None]
        return merge_intervals(
            ids for host in hosts for ids in self.labels.select([app.name], host)
        )

    def rules(self, app: App, direction: Direction) -> Iterator[EgressRule | IngressRule]:
        yield from app.egress if direction == "out" else app.ingress
        for category in app.categories:
            owner = self.policy.categories[category]
            yield from owner.egress if direction == "out" else owner.ingress

    def boxes(self, app: App, direction: Direction) -> list[Box]:
        """Elements (app . protocol . port . peer address . peer label) of the app's rules."""
        out: list[Box] = []
        for rule in self.rules(app, direction):
            peers = self.peers(rule.to if isinstance(rule, EgressRule) else rule.from_)
            proto = PROTOCOLS[rule.protocol]
            out += [
                (owner, proto, port, address, ids)
                for owner in self.owner(app, rule)
                for address, ids in peers
                for port in rule.ports or [ALL_PORTS]
            ]
        return out

    def may_be_gateway(self, peer: IPv4Network) -> bool:
        """Whether a peer is one address that can be the gateway's: on one of its
        networks (`gateway_networks`; any address when the policy lists none) or its
        address on an enclave subnet. (Other single addresses would only make the
        `to_gateway` sets large.)"""
        if peer.prefixlen != 32:
            return False
        address = peer.network_address
        if address in self.gateway_addresses or not self.policy.gateway_networks:
            return True
        return any(address in network for network in self.policy.gateway_networks)

    def gateway_boxes(self, app: App) -> list[Box]:
        """Elements (app . protocol . port . gateway address) of the app's egress rules
        that name the gateway: `{gateway: true}` (any of its addresses) or one address
        written out. Prefixes (`0.0.0.0/0`, the gateway's networks) never reach it."""
        out: list[Box] = []
        for rule in self.rules(app, "out"):
            assert isinstance(rule, EgressRule)
            addresses = [
                ANY_ADDRESS if isinstance(peer, GatewayRef) else network_interval(peer)
                for peer in rule.to
                if isinstance(peer, GatewayRef)
                or (isinstance(peer, IPv4Network) and self.may_be_gateway(peer))
            ]
            if not addresses:
                continue
            proto = PROTOCOLS[rule.protocol]
            out += [
                (owner, proto, port, address)
                for owner in self.owner(app, rule)
                for address in addresses
                for port in rule.ports or [ALL_PORTS]
            ]
        return out


@dataclass
class _RuleSet:
    """One set of rules: those of a group of apps in one direction."""

    name: str
    direction: Direction
    shared: bool  # of apps on the shared subnet (keyed by their label)
    apps: list[str] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)

    @cached_property
    def by_peer_label(self) -> bool:
        """Whether a rule names enclaves of the shared subnet as peers: without such rules
        the peer label field (always "any") is left out, as it makes loading slower.
        (Asked once every app's boxes are in.)"""
        return any(box[-1] != ANY_LABEL for box in self.boxes)

    def key(self) -> tuple[Expr, ...]:
        key = rule_key(self.direction, self.shared)
        return key if self.by_peer_label else key[:-1]

    def named_set(self) -> NamedSet:
        boxes = self.boxes if self.by_peer_label else [box[:-1] for box in self.boxes]
        types = _key_types(self.shared)
        first, last = self.apps[0], self.apps[-1]
        apps = f"app {first}" if first == last else f"apps {first} .. {last}"
        fields = ["sources" if self.direction == "out" else "destinations"]
        fields[0] += " by label" if self.shared else " by address"
        fields += ["protocol", "port", "peer address"]
        fields += ["peer label"] if self.by_peer_label else []
        named = NamedSet(
            self.name,
            types if self.by_peer_label else types[:-1],
            group=f"{'egress' if self.direction == 'out' else 'ingress'} rules of {apps}",
            comment=" . ".join(fields),
        )
        named.elements = disjoint(boxes)
        return named


# --- the table ------------------------------------------------------------------------


@gc_paused()
def compile_policy(policy: Policy, options: Options | None = None) -> Table:
    """The whole table for `policy`; `Table.transaction()` / `Table.text()` render it."""
    opts = options or Options()
    resolve = _Resolver(policy, label_table(policy))
    table = Table(opts.table)
    sets = _declare_sets(table)

    sets["enclave_nets"].elements = [
        (i,) for (i,) in disjoint((network_interval(s.subnet),) for s in policy.enclave_subnets())
    ]
    sets["shared_net"].add((resolve.shared,))
    # First every app's rules into the sets of its group: whether a set needs the peer
    # label decides its key, which the apps' chains use.
    rule_sets: dict[str, _RuleSet] = {}
    uses: list[dict[Direction, _RuleSet | None]] = []  # per app
    seen = {False: 0, True: 0}  # apps so far with their own subnet, on the shared subnet
    for app in policy.apps:
        shared = app.subnet is None
        group_index = seen[shared] // GROUP_SIZE
        seen[shared] += 1
        used: dict[Direction, _RuleSet | None] = {"out": None, "in": None}
        for direction in used:
            boxes = resolve.boxes(app, direction)
            if boxes:
                name = rule_set_name(direction, shared, group_index)
                rule_set = rule_sets.setdefault(name, _RuleSet(name, direction, shared))
                rule_set.apps.append(app.name)
                rule_set.boxes += boxes
                used[direction] = rule_set
        uses.append(used)

    expose_from: list[Box] = []
    to_gateway: dict[bool, list[Box]] = {False: [], True: []}  # by address, by label
    for app, used in zip(policy.apps, uses, strict=True):
        shared = app.subnet is None
        ids = resolve.labels.select([app.name]) if shared else []
        where = _describe(ids) if shared else str(policy.subnet_of(app).subnet)
        group = f"app {app.name} ({where})"
        out_verdict = _app_chain(table, policy, app, "out", used["out"], group)
        in_verdict = _app_chain(table, policy, app, "in", used["in"], group)
        tx, rx = counter_names(app.name)
        table.counters += [Counter(tx, group=group), Counter(rx, group=group)]
        to_gateway[shared] += resolve.gateway_boxes(app)
        if shared:
            for interval in ids:
                sets["egress_labels"].add((interval,), out_verdict)
                sets["ingress_labels"].add((interval,), in_verdict)
                sets["tx_labels"].add((interval,), tx)
                sets["rx_labels"].add((interval,), rx)
        else:
            subnet = resolve.subnets[app.name]
            sets["egress_apps"].add((subnet,), out_verdict)
            sets["ingress_apps"].add((subnet,), in_verdict)
            sets["tx_counters"].add((subnet,), tx)
            sets["rx_counters"].add((subnet,), rx)
        for exposure in app.expose:
            address = (int(exposure.address), int(exposure.address))
            proto = PROTOCOLS[exposure.protocol]
            # Keyed by the exposure's own gateway port (the connection's original
            # destination), not the enclave port after DNAT: exposures with the same
            # `to_port` on one address must not share their sources.
            port = (exposure.port, exposure.port)
            expose_from += [
                (peer, peer_ids, address, proto, port)
                for peer, peer_ids in resolve.peers(exposure.from_)
            ]
            sets["expose_port"].add(
                (address, proto, (exposure.port, exposure.port)), exposure.target_port
            )
    sets["expose_from"].elements = disjoint(expose_from)
    sets["to_gateway_apps"].elements = disjoint(to_gateway[False])
    sets["to_gateway_labels"].elements = disjoint(to_gateway[True])
    table.sets += [rule_set.named_set() for rule_set in rule_sets.values()]
    _add_chains(table, policy, opts)
    return table


def _describe(ids: list[Interval]) -> str:
    text = ", ".join(str(low) if low == high else f"{low}-{high}" for low, high in ids)
    return f"shared subnet, label {text}"


def _app_chain(
    table: Table,
    policy: Policy,
    app: App,
    direction: Direction,
    rule_set: _RuleSet | None,
    group: str,
) -> str:
    """The app's chain for one direction (`out_APP`: to peers, `in_APP`: from peers);
    returns the verdict that leads to it. Allowed packets `return` (to the base chain
    that jumped to `egress`/`ingress`); the others are dropped, logged first if the app
    logs refusals."""
    chain = Chain(f"{direction}_{app.name}", group=group)
    if rule_set is not None:
        chain.add(_lookup(rule_set.key(), rule_set.name), Verdict("return"))
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
            comment="shared subnet: originator label (ct mark bits 0-15) -> out_ chain",
        ),
        NamedSet(
            "ingress_labels",
            (mark,),
            data="verdict",
            comment="shared subnet: responder label (ct mark bits 16-31) -> in_ chain",
        ),
        NamedSet(
            "expose_from",
            (addr, mark, addr, proto, port),
            comment="exposed services: source . its label . gateway address . protocol . "
            "gateway port",
        ),
        NamedSet(
            "to_gateway_apps",
            (addr, proto, port, addr),
            comment="enclaves to the gateway itself, rules that name it: app subnet . "
            "protocol . port . gateway address",
        ),
        NamedSet(
            "to_gateway_labels",
            (mark, proto, port, addr),
            comment="the same for the shared subnet: originator label . protocol . port . "
            "gateway address",
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
        NamedSet(
            "tx_labels", (mark,), data="counter", comment="sender's label -> its app's tx counter"
        ),
        NamedSet(
            "rx_labels",
            (mark,),
            data="counter",
            comment="receiver's label -> its app's rx counter",
        ),
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
    labelled = Match(Ct("mark"), 0, "!=")
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
    forward.add(
        labelled,
        Match(Ct("direction"), "original"),
        Verdict("jump", "count_original"),
        comment="shared subnet: per-app counters by the labels of the packet's ends",
    )
    forward.add(labelled, Match(Ct("direction"), "reply"), Verdict("jump", "count_reply"))
    for exprs, why in anti_spoof:
        forward.add(*exprs, comment=why)
    forward.add(established, Verdict("accept"), comment="allowed connections go on")
    forward.add(enclave_src, Verdict("jump", "egress"))
    forward.add(enclave_dst, Verdict("jump", "ingress"), comment="enclave to enclave: both sides")

    count_original = Chain(
        "count_original", comment="shared subnet: the opener sends, the acceptor receives"
    )
    count_original.add(CounterMapExpr(ORIGINATOR, "tx_labels"))
    count_original.add(CounterMapExpr(RESPONDER, "rx_labels"))
    count_reply = Chain("count_reply", comment="and the other way round")
    count_reply.add(CounterMapExpr(RESPONDER, "tx_labels"))
    count_reply.add(CounterMapExpr(ORIGINATOR, "rx_labels"))

    inbound = Chain("input", hook=Hook("filter", "input", filter_prio, "filter"))
    for exprs, why in anti_spoof:
        inbound.add(*exprs, comment=why)
    inbound.add(established, Verdict("accept"))
    inbound.add(
        enclave_src, Verdict("goto", "to_gateway"), comment="enclaves to the gateway itself"
    )

    to_gateway = Chain(
        "to_gateway",
        comment="new connections from enclaves to the gateway's own addresses: only rules "
        "that name the gateway ({gateway: true} or its address), never a prefix",
    )
    to_gateway.add(_lookup((SADDR, L4PROTO, DPORT, DADDR), "to_gateway_apps"), Verdict("accept"))
    to_gateway.add(
        Match(SADDR, "@shared_net"),
        _lookup((ORIGINATOR, L4PROTO, DPORT, DADDR), "to_gateway_labels"),
        Verdict("accept"),
    )
    to_gateway.add(Verdict("goto", "refused"))

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
        # (nft types `ct original proto-dst` by the protocol match before it)
        Match(L4PROTO, AnonymousSet(("tcp", "udp"))),
        Match(Ct("status"), "dnat", "in"),
        _lookup(EXPOSE_KEY, "expose_from"),
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
    table.chains[:0] = [
        forward,
        count_original,
        count_reply,
        inbound,
        to_gateway,
        outbound,
        expose,
        egress,
        ingress,
        refused,
    ]
