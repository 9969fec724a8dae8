"""pydantic models of the YAML policy (`policies/*.yaml`).

A policy names the apps that may run behind the gateway (attested identity, client
hosts, enclave subnet) and what their enclaves may talk to: egress and ingress rules
per app and per category, and services exposed on a gateway address (DNAT).
Everything not allowed is refused. Checks that span several apps live in
`cross_check`, so that the loader can report them with file, line and field.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)

from seng_fw.policy import ipam
from seng_fw.policy.labels import MAX_ID, LabelTable
from seng_fw.policy.yamlfile import PATTERN_WORDS, Path_, did_you_mean, format_path

_HEX32 = re.compile(r"^[0-9a-f]{64}$")
NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,30}$"
PATTERN_WORDS[NAME_PATTERN] = (
    "a name is a lower-case letter, then up to 30 lower-case letters, digits, '-' or '_'"
)
# Label ids (at least one per app) go into 16 bits of the conntrack mark; 0 and 0xFFFF
# are reserved ("not an enclave", "unknown address"): seng_fw.policy.labels.
MAX_APPS = MAX_ID


def _measurement(value: object) -> bytes:
    """MRENCLAVE / MRSIGNER: 64 hex digits (case-insensitive, optional 0x) -> 32 bytes."""
    if not isinstance(value, str):
        raise ValueError("must be a string of 64 hex digits")
    text = value.strip().lower().removeprefix("0x")
    if not _HEX32.match(text):
        raise ValueError(f"must be 64 hex digits (32 bytes), got {value!r}")
    return bytes.fromhex(text)


def _one_or_many(value: object) -> object:
    """A single value where a list is expected is a list of one."""
    return value if isinstance(value, list) else [value]


def _each(item: Callable[[Any], Any]) -> WrapValidator:
    """A fast path for a list field: `item` applied to each item of the value (a single
    value is a list of one) in one call from pydantic. `item` must give what the field's
    schema gives for each item it does not raise for, so the result is the same list; if
    it raises for any item, or the list is empty, the field's schema validates the value
    again, and reports what it reports today. (A wrap validator costs about as much as
    the calls it saves: it pays only where `item` is much cheaper than the schema's own
    validation, as for networks, which pydantic parses anew each time.)"""

    def validate(value: object, handler: ValidatorFunctionWrapHandler) -> object:
        items = value if type(value) is list else [value]
        try:
            result = [item(each) for each in items]
        except Exception:  # (its own schema says what, with the item's position)
            return handler(value)
        return result if result else handler(value)

    return WrapValidator(validate)


Measurement = Annotated[bytes, BeforeValidator(_measurement)]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a security policy must not be ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class EnclaveSubnet(StrictModel):
    """A subnet enclave addresses are leased from; `gateway` is the gateway's own address
    on the TUN device (default: the first host address). The rules about which gateway
    addresses are valid live in `seng_fw.policy.ipam.EnclaveSubnet`, which this model builds."""

    subnet: IPv4Network
    gateway: IPv4Address | None = None

    @model_validator(mode="after")
    def _valid_for_ipam(self) -> EnclaveSubnet:
        built = ipam.EnclaveSubnet.parse(self.subnet, self.gateway)  # raises ValueError
        if ipam.AddressPool(built).capacity == 0:
            raise ValueError(
                f"{self.subnet} leaves no address for enclaves (the gateway takes the only "
                "one): use a /31 or larger"
            )
        object.__setattr__(self, "gateway", built.gateway)
        return self

    @property
    def gateway_address(self) -> IPv4Address:
        assert self.gateway is not None  # set by the validator
        return self.gateway

    def to_ipam(self) -> ipam.EnclaveSubnet:
        return ipam.EnclaveSubnet(self.subnet, self.gateway_address)


DEFAULT_SHARED_SUBNET = EnclaveSubnet(subnet=ipam.DEFAULT_SUBNET, gateway=ipam.DEFAULT_GATEWAY)


# --- rules -------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """Enclaves named by a rule: those of an app (`{app: NAME}`) or of a category's apps
    (`{category: NAME}`). With `host: PREFIX` (alone: of any app) only enclaves on the
    shared subnet whose client host is in PREFIX: the labeller's marks tell their hosts
    apart, while an app with its own subnet is known by address only (never by host)."""

    kind: Literal["app", "category"] | None  # None: any app (`{host: PREFIX}`)
    name: str = ""
    host: IPv4Network | None = None

    def __str__(self) -> str:
        what = f"{self.kind} {self.name!r}" if self.kind else "enclaves"
        return what if self.host is None else f"{what} on hosts {self.host}"


@dataclass(frozen=True)
class GatewayRef:
    """The gateway itself (`{gateway: true}`): its addresses on every interface, its
    address on each enclave subnet included. Only a rule that names the gateway, this
    way or by writing one of its addresses out (a single address, not a prefix), lets
    enclaves reach it: `to: 0.0.0.0/0` does not."""

    def __str__(self) -> str:
        return "the gateway"


Peer = IPv4Network | Ref | GatewayRef
_PEER_HELP = (
    "must be an IPv4 address or prefix, {app: NAME}, {category: NAME} or {host: PREFIX} "
    "(host alone or with app or category), or {gateway: true}"
)


def _network(value: object, what: str) -> IPv4Network:
    if isinstance(value, str):
        try:
            return _parse_network(value.strip())
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an IPv4 {what}: {exc}") from None
    raise ValueError(f"{value!r} is not an IPv4 {what}")


_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# An address or prefix as IPv4Network writes it (no leading zeros, prefix 0..32): the
# common case, which `_parse_network` builds from integers.
_CANONICAL_NETWORK = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}(?:/(3[0-2]|[12]?[0-9]))?")


@functools.lru_cache(maxsize=65536)
def _parse_network(text: str) -> IPv4Network:
    """IPv4Network(text), cached: large policies name the same peers and host prefixes
    in many rules, and parsing is most of the cost of validating a peer. (Networks are
    immutable; errors are not cached.) Text in canonical form is parsed here, about
    twice as fast as ipaddress does, into the same network; anything else (and any
    error, host bits set included) is left to IPv4Network."""
    match = _CANONICAL_NETWORK.fullmatch(text)
    if match is not None:
        a, b, c, d, prefix = match.groups()
        address = int(a) << 24 | int(b) << 16 | int(c) << 8 | int(d)
        length = 32 if prefix is None else int(prefix)
        if address & (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF == address:
            return IPv4Network((address, length))
    return IPv4Network(text)


def _ipv4_network(value: object) -> IPv4Network:
    """What pydantic's IPv4Network validator makes of `value`, for text (the cache's);
    raises for anything else, or text that is not a network (the schema then says why)."""
    if type(value) is not str:
        raise TypeError("not text")
    return _parse_network(value)


def _peer(value: object) -> Peer:
    if type(value) is str:  # (the common case first)
        try:
            return _parse_network(value.strip())
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an IPv4 address or prefix: {exc}") from None
    if isinstance(value, IPv4Network | Ref | GatewayRef):
        return value
    if isinstance(value, str):
        return _network(value, "address or prefix")
    if isinstance(value, dict):
        return _selector(value)
    raise ValueError(f"{_PEER_HELP}, got {value!r}")


def _selector(value: dict[object, object]) -> Ref | GatewayRef:
    keys = set(value)
    if "gateway" in keys:
        if value != {"gateway": True}:
            raise ValueError(f"the gateway is named as {{gateway: true}} alone, got {value!r}")
        return GatewayRef()
    named = keys & {"app", "category"}
    if not keys or keys - {"app", "category", "host"} or len(named) > 1:
        raise ValueError(f"{_PEER_HELP}, got {value!r}")
    kind: Literal["app", "category"] | None = None
    name = ""
    if named:
        kind = "app" if "app" in named else "category"
        name_value = value[kind]
        if not isinstance(name_value, str) or not re.match(NAME_PATTERN, name_value):
            raise ValueError(f"{name_value!r} is not a valid {kind} name")
        name = name_value
    host = _network(value["host"], "host prefix") if "host" in value else None
    return Ref(kind, name, host)


def _peer_as_written(peer: Peer) -> str | dict[str, str | bool]:
    """A peer as the policy writes it (`10.0.0.0/8`, `{app: NAME, host: PREFIX}`): a plain
    validator leaves pydantic no schema to serialize the union by, and without this
    `model_dump` warned (PydanticSerializationUnexpectedValue) at every digest."""
    if isinstance(peer, IPv4Network):
        return str(peer)
    if isinstance(peer, GatewayRef):
        return {"gateway": True}
    written: dict[str, str | bool] = {peer.kind: peer.name} if peer.kind else {}
    if peer.host is not None:
        written["host"] = str(peer.host)
    return written


PeerSpec = Annotated[Peer, PlainValidator(_peer), PlainSerializer(_peer_as_written)]
Peers = Annotated[list[PeerSpec], BeforeValidator(_one_or_many), Field(min_length=1)]


def _port_range(value: object) -> tuple[int, int]:
    """A port (`443`) or an inclusive range (`"8000-8080"`) -> (low, high)."""
    if type(value) is int and 1 <= value <= 0xFFFF:  # (the common case first)
        return value, value
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a port")
    if isinstance(value, int):
        low = high = value
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+\s*(-\s*\d+\s*)?", value):
        parts = [int(part) for part in value.split("-")]
        low, high = parts[0], parts[-1]
    else:
        raise ValueError(f"{value!r} is not a port or a port range like 8000-8080")
    if not 1 <= low <= high <= 0xFFFF:
        raise ValueError(f"{value!r}: ports are 1..65535 and a range goes low-high")
    return low, high


PortRange = Annotated[tuple[int, int], PlainValidator(_port_range)]
Port = Annotated[int, Field(ge=1, le=0xFFFF)]
Ports = Annotated[list[PortRange], BeforeValidator(_one_or_many)]
Protocol = Literal["tcp", "udp", "icmp", "any"]


Networks = Annotated[list[IPv4Network], BeforeValidator(_one_or_many), _each(_ipv4_network)]


class _Rule(StrictModel):
    protocol: Protocol
    # Empty: every port. Only tcp and udp have ports.
    ports: Ports = Field(default_factory=list)
    # Only the enclaves (of the rule's app, or of each app of the category) whose client
    # host is in one of these prefixes; empty: all. Like `host` selectors, this needs
    # apps on the shared subnet: a category's apps with their own subnet do not get the
    # rule, and an app with its own subnet cannot have it.
    on_hosts: Networks = Field(default_factory=list)

    @model_validator(mode="after")
    def _ports_need_tcp_or_udp(self) -> _Rule:
        if self.ports and self.protocol not in ("tcp", "udp"):
            raise ValueError(f"protocol {self.protocol} has no ports: remove `ports`")
        return self


class EgressRule(_Rule):
    """Enclaves of the app may open connections to `to`."""

    to: Peers


class IngressRule(_Rule):
    """`from` may open connections to the app's enclaves."""

    from_: Peers = Field(alias="from")


class Exposure(StrictModel):
    """An enclave service reachable on a gateway address (DNAT). The gateway tells the
    ruleset which enclave serves it; `from` says who may connect."""

    address: IPv4Address
    port: Port
    protocol: Literal["tcp", "udp"] = "tcp"
    to_port: Port | None = None  # the enclave's port; default: `port`
    from_: Peers = Field(alias="from")

    @property
    def target_port(self) -> int:
        return self.port if self.to_port is None else self.to_port


class Category(StrictModel):
    """Rules shared by every app that lists the category."""

    description: str = ""
    egress: list[EgressRule] = Field(default_factory=list)
    ingress: list[IngressRule] = Field(default_factory=list)


class App(StrictModel):
    name: Name
    mrenclave: Annotated[list[Measurement], BeforeValidator(_one_or_many)] = Field(min_length=1)
    mrsigner: Measurement | None = None
    min_isv_svn: int = Field(default=0, ge=0, le=0xFFFF)
    isv_prod_id: int | None = Field(default=None, ge=0, le=0xFFFF)
    allow_debug: bool = False
    categories: Annotated[list[Name], BeforeValidator(_one_or_many)] = Field(default_factory=list)
    # Client-host subnets the app may run from (the DTLS peer's address).
    hosts: Networks = Field(min_length=1)
    # The app's own enclave subnet; without one, its enclaves share `shared_subnet`.
    subnet: EnclaveSubnet | None = None
    egress: list[EgressRule] = Field(default_factory=list)
    ingress: list[IngressRule] = Field(default_factory=list)
    expose: list[Exposure] = Field(default_factory=list)
    # Log refused packets of this app (rate-limited); default: `defaults.log_refused`.
    log_refused: bool | None = None


class Defaults(StrictModel):
    # Everything not allowed is dropped; this only decides whether drops are logged.
    log_refused: bool = False
    log_rate: str = Field(default="10/minute", pattern=r"^[1-9][0-9]{0,5}/(second|minute|hour)$")


class Policy(StrictModel):
    # The gateway's own networks (LAN, external side): no enclave subnet may overlap them.
    gateway_networks: Networks = Field(default_factory=list)
    shared_subnet: EnclaveSubnet = DEFAULT_SHARED_SUBNET
    defaults: Defaults = Defaults()
    # Names are checked by cross_check, so that the error points at the name's line.
    categories: dict[str, Category] = Field(default_factory=dict)
    apps: list[App] = Field(default_factory=list)

    def subnet_of(self, app: App) -> EnclaveSubnet:
        return app.subnet or self.shared_subnet

    def enclave_subnets(self) -> list[EnclaveSubnet]:
        subnets = [self.shared_subnet]
        subnets += [app.subnet for app in self.apps if app.subnet is not None]
        return subnets

    def app(self, name: str) -> App:
        for app in self.apps:
            if app.name == name:
                return app
        raise KeyError(name)

    def members(self, category: str) -> list[App]:
        return [app for app in self.apps if category in app.categories]

    def host_prefixes(self) -> list[IPv4Network]:
        """The client-host prefixes that rules name (`host` selectors, `on_hosts`):
        label ids tell these hosts apart (`seng_fw.policy.labels.LabelTable`)."""
        return _host_prefixes(self, _selectors(self))

    def logs_refused(self, app: App) -> bool:
        return self.defaults.log_refused if app.log_refused is None else app.log_refused


# --- checks across apps -----------------------------------------------------------

Problem = tuple[Path_, str]


def _selectors(policy: Policy) -> Iterator[tuple[Path_, Peer]]:
    """Every peer of a rule (of categories and of apps) or of an exposure that names
    enclaves or the gateway, with its path: the only peers a check across apps looks at.
    (Most peers of a large policy are addresses; skipping them before their path is
    built makes the checks several times faster.)"""
    owners: list[tuple[Path_, Category | App]] = [
        (("categories", name), category) for name, category in policy.categories.items()
    ]
    owners += [(("apps", index), app) for index, app in enumerate(policy.apps)]
    for path, owner in owners:
        for r_index, egress in enumerate(owner.egress):
            for p_index, peer in enumerate(egress.to):
                if type(peer) is not IPv4Network:
                    yield (*path, "egress", r_index, "to", p_index), peer
        for r_index, ingress in enumerate(owner.ingress):
            for p_index, peer in enumerate(ingress.from_):
                if type(peer) is not IPv4Network:
                    yield (*path, "ingress", r_index, "from", p_index), peer
    for index, app in enumerate(policy.apps):
        for e_index, exposure in enumerate(app.expose):
            for p_index, peer in enumerate(exposure.from_):
                if type(peer) is not IPv4Network:
                    yield ("apps", index, "expose", e_index, "from", p_index), peer


def _host_prefixes(policy: Policy, selectors: Iterable[tuple[Path_, Peer]]) -> list[IPv4Network]:
    found = {p.host for _, p in selectors if isinstance(p, Ref) and p.host is not None}
    owners: list[Category | App] = [*policy.categories.values(), *policy.apps]
    for owner in owners:
        for rule in owner.egress:
            if rule.on_hosts:
                found.update(rule.on_hosts)
        for ingress in owner.ingress:
            if ingress.on_hosts:
                found.update(ingress.on_hosts)
    return sorted(found)


def cross_check(policy: Policy, where: Callable[[Path_], str] | None = None) -> list[Problem]:
    """Checks that span several apps; each problem comes with the path of the field at fault
    so the loader can name its file and line. `where(path)` describes another location
    in messages (default: the path itself)."""
    describe = where or format_path
    problems: list[Problem] = []
    names: dict[str, int] = {}
    claimed: dict[bytes, int] = {}
    subnets: ipam.DisjointNetworks[str] = ipam.DisjointNetworks()
    subnets.add(policy.shared_subnet.subnet, "shared_subnet")
    for name in policy.categories:
        if not re.match(NAME_PATTERN, name):
            problems.append((("categories", name), f"{name!r}: {PATTERN_WORDS[NAME_PATTERN]}"))
    if len(policy.apps) > MAX_APPS:
        problems.append((("apps",), f"{len(policy.apps)} apps: at most {MAX_APPS} are supported"))
    for g_index, network in enumerate(policy.gateway_networks):
        if network.overlaps(policy.shared_subnet.subnet):
            problems.append(
                (
                    ("shared_subnet", "subnet"),
                    f"{policy.shared_subnet.subnet} overlaps the gateway's network {network} "
                    f"(gateway_networks[{g_index}])",
                )
            )
    for index, app in enumerate(policy.apps):
        if app.name in names:
            other = describe(("apps", names[app.name], "name"))
            problems.append(
                (("apps", index, "name"), f"duplicate app name {app.name!r} (also at {other})")
            )
        names.setdefault(app.name, index)
        for m_index, measurement in enumerate(app.mrenclave):
            owner = claimed.setdefault(measurement, index)
            if owner != index:
                problems.append(
                    (
                        ("apps", index, "mrenclave", m_index),
                        f"MRENCLAVE {measurement.hex()} is already claimed by app "
                        f"{policy.apps[owner].name!r}",
                    )
                )
        for c_index, category in enumerate(app.categories):
            if category not in policy.categories:
                problems.append(
                    (
                        ("apps", index, "categories", c_index),
                        f"unknown category {category!r}{did_you_mean(category, policy.categories)}",
                    )
                )
        if app.subnet is not None:
            if (overlap := subnets.overlapping(app.subnet.subnet)) is not None:
                other_net, other_owner = overlap
                problems.append(
                    (
                        ("apps", index, "subnet", "subnet"),
                        f"{app.subnet.subnet} overlaps {other_net} of {other_owner}",
                    )
                )
            for network in policy.gateway_networks:
                if app.subnet.subnet.overlaps(network):
                    problems.append(
                        (
                            ("apps", index, "subnet", "subnet"),
                            f"{app.subnet.subnet} overlaps the gateway's network {network}",
                        )
                    )
            if overlap is None:  # (an overlapping one is reported, not kept)
                subnets.add(app.subnet.subnet, f"app {app.name!r}")
    selectors = list(_selectors(policy))  # (walked once for both checks)
    problems += _check_peers(policy, selectors)
    problems += _check_labels(policy, selectors)
    problems += _check_exposures(policy, describe)
    return problems


def _check_peers(policy: Policy, selectors: list[tuple[Path_, Peer]]) -> list[Problem]:
    problems: list[Problem] = []
    app_names = {app.name for app in policy.apps}
    subnet_of: dict[str, EnclaveSubnet | None] = {}  # (of the first app of a name, as app())
    for app in policy.apps:
        subnet_of.setdefault(app.name, app.subnet)
    for path, peer in selectors:
        if isinstance(peer, GatewayRef) and "from" in path:
            problems.append((path, _GATEWAY_FROM))
        if not isinstance(peer, Ref) or peer.kind is None:
            continue
        known = app_names if peer.kind == "app" else policy.categories
        if peer.name not in known:
            hint = did_you_mean(peer.name, known)
            problems.append((path, f"unknown {peer.kind} {peer.name!r}{hint}"))
            continue
        if peer.host is None or peer.kind != "app":
            continue
        if subnet_of[peer.name] is not None:
            problems.append((path, f"{peer} never matches: {_OWN_SUBNET}; remove `host`"))
    for index, app in enumerate(policy.apps):
        if app.subnet is None:
            continue
        for field, rules in (("egress", app.egress), ("ingress", app.ingress)):
            for r_index, rule in enumerate(rules):
                if rule.on_hosts:
                    where: Path_ = ("apps", index, field, r_index, "on_hosts")
                    problems.append((where, f"{_OWN_SUBNET}; remove `on_hosts`"))
    return problems


_GATEWAY_FROM = (
    "{gateway: true} is for egress `to` only (enclaves reaching the gateway); the gateway's "
    "own connections to enclaves are matched by its address"
)
_OWN_SUBNET = (
    "the app has its own subnet, where enclaves are told apart by address, not by client host"
)


def _check_labels(policy: Policy, selectors: list[tuple[Path_, Peer]]) -> list[Problem]:
    """The label ids (apps x host classes) must fit in 16 bits of the conntrack mark."""
    if len({app.name for app in policy.apps}) != len(policy.apps) or len(policy.apps) > MAX_APPS:
        return []  # reported as duplicate names, or too many apps
    prefixes = _host_prefixes(policy, selectors)
    if not prefixes:
        # One host class: every app gets one id (its hosts are never empty), and there
        # are at most MAX_APPS apps: the table fits (and building it costs 10,000 apps
        # a tenth of a second).
        return []
    try:
        LabelTable.from_policy(policy, prefixes)
    except ValueError as exc:
        return [(("apps",), str(exc))]
    return []


def _check_exposures(policy: Policy, describe: Callable[[Path_], str]) -> list[Problem]:
    problems: list[Problem] = []
    seen: dict[tuple[IPv4Address, str, int], Path_] = {}
    enclave_nets = [subnet.subnet for subnet in policy.enclave_subnets()]
    for index, app in enumerate(policy.apps):
        for e_index, exposure in enumerate(app.expose):
            path: Path_ = ("apps", index, "expose", e_index)
            inside = [net for net in enclave_nets if exposure.address in net]
            if inside:
                problems.append(
                    (
                        (*path, "address"),
                        f"{exposure.address} is inside the enclave subnet {inside[0]}: "
                        "expose services on an address of the gateway's other networks",
                    )
                )
            key = (exposure.address, exposure.protocol, exposure.port)
            if key in seen:
                problems.append(
                    (
                        (*path, "port"),
                        f"{exposure.address} {exposure.protocol}/{exposure.port} is already "
                        f"exposed at {describe(seen[key])}",
                    )
                )
            seen.setdefault(key, (*path, "port"))
    return problems
