"""Address pools: ranges per prefix length, exhaustion, quarantine, re-use order."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seng_fw.policy.ipam import (
    AddressPool,
    DisjointNetworks,
    EnclaveSubnet,
    Ipam,
    IpamError,
    NotLeased,
    PoolExhausted,
)


def drain(pool: AddressPool[str]) -> list[IPv4Address]:
    out: list[IPv4Address] = []
    while True:
        try:
            out.append(pool.lease(f"e{len(out)}"))
        except PoolExhausted:
            return out


def test_default_subnet_matches_original_seng() -> None:
    subnet = EnclaveSubnet.default()
    assert subnet.network == IPv4Network("192.168.28.0/24")
    assert subnet.gateway == IPv4Address("192.168.28.1")
    assert subnet.netmask == IPv4Address("255.255.255.0")
    assert str(subnet.gateway_interface) == "192.168.28.1/24"


def test_parse_defaults_gateway_to_first_host() -> None:
    assert EnclaveSubnet.parse("10.0.0.0/16").gateway == IPv4Address("10.0.0.1")
    assert EnclaveSubnet.parse("10.0.0.4/31").gateway == IPv4Address("10.0.0.4")
    assert EnclaveSubnet.parse("10.0.0.9/32").gateway == IPv4Address("10.0.0.9")


@pytest.mark.parametrize("gateway", ["10.0.0.0", "10.0.0.255", "10.0.1.1"])
def test_gateway_must_be_a_host_address(gateway: str) -> None:
    with pytest.raises(ValueError):
        EnclaveSubnet.parse("10.0.0.0/24", gateway)


@pytest.mark.parametrize(
    ("network", "gateway", "expected"),
    [
        ("10.0.0.0/30", None, ["10.0.0.2"]),
        ("10.0.0.0/30", "10.0.0.2", ["10.0.0.1"]),
        ("10.0.0.0/31", None, ["10.0.0.1"]),  # RFC 3021: both are hosts
        ("10.0.0.0/31", "10.0.0.1", ["10.0.0.0"]),
        ("10.0.0.7/32", None, []),  # the only address is the gateway
    ],
)
def test_small_prefixes(network: str, gateway: str | None, expected: list[str]) -> None:
    pool: AddressPool[str] = AddressPool(EnclaveSubnet.parse(network, gateway))
    assert pool.capacity == len(expected)
    assert drain(pool) == [IPv4Address(a) for a in expected]
    assert pool.available == 0


def test_slash24_leases_253_hosts_in_order_then_exhausts() -> None:
    pool: AddressPool[str] = AddressPool(EnclaveSubnet.default())
    leased = drain(pool)
    assert len(leased) == pool.capacity == 253
    assert leased[0] == IPv4Address("192.168.28.2")
    assert leased[-1] == IPv4Address("192.168.28.254")
    with pytest.raises(PoolExhausted):
        pool.lease("one more")


def test_gateway_in_the_middle_is_skipped() -> None:
    pool: AddressPool[str] = AddressPool(EnclaveSubnet.parse("10.0.0.0/29", "10.0.0.3"))
    assert [str(a) for a in drain(pool)] == [f"10.0.0.{i}" for i in (1, 2, 4, 5, 6)]


def test_slash16_is_lazy_and_complete() -> None:
    pool: AddressPool[int] = AddressPool(EnclaveSubnet.parse("10.1.0.0/16"))
    assert pool.capacity == 65533
    seen = {pool.lease(i) for i in range(pool.capacity)}
    assert len(seen) == 65533
    assert IPv4Address("10.1.0.0") not in seen
    assert IPv4Address("10.1.0.1") not in seen
    assert IPv4Address("10.1.255.255") not in seen
    with pytest.raises(PoolExhausted):
        pool.lease(-1)


def test_owner_lookup() -> None:
    pool: AddressPool[str] = AddressPool(EnclaveSubnet.default())
    a = pool.lease("alice")
    assert pool.owner_of(a) == "alice"
    assert pool.owner_of(IPv4Address("192.168.28.200")) is None
    assert pool.leases == {a: "alice"}


def test_quarantine_blocks_reuse_until_flushed() -> None:
    pool: AddressPool[str] = AddressPool(EnclaveSubnet.parse("10.0.0.0/30"))
    a = pool.lease("first")
    assert pool.release(a) == a
    assert pool.owner_of(a) is None
    assert pool.is_quarantined(a)
    assert pool.available == 0
    with pytest.raises(PoolExhausted):
        pool.lease("second")
    pool.confirm_flushed(a)
    assert not pool.is_quarantined(a)
    assert pool.lease("second") == a


def test_release_is_idempotent_during_quarantine_and_strict_otherwise() -> None:
    pool: AddressPool[str] = AddressPool(EnclaveSubnet.default())
    a = pool.lease("x")
    pool.release(a)
    assert pool.release(a) == a  # retry after a failed flush
    pool.confirm_flushed(a)
    with pytest.raises(NotLeased):
        pool.release(a)
    with pytest.raises(NotLeased):
        pool.confirm_flushed(a)
    with pytest.raises(KeyError):  # NotLeased is also a KeyError
        pool.release(IPv4Address("192.168.28.77"))


def test_recently_released_addresses_are_reused_last() -> None:
    pool: AddressPool[str] = AddressPool(EnclaveSubnet.parse("10.0.0.0/29"))  # .2-.6
    a, b, c = pool.lease("a"), pool.lease("b"), pool.lease("c")
    for addr in (b, a, c):  # b is released longest ago
        pool.confirm_flushed(pool.release(addr))
    # never-used addresses first, then the oldest release
    assert [pool.lease(n) for n in "defgh"] == [
        IPv4Address("10.0.0.5"),
        IPv4Address("10.0.0.6"),
        b,
        a,
        c,
    ]


def test_none_owner_is_allowed() -> None:
    pool: AddressPool[None] = AddressPool(EnclaveSubnet.default())
    a = pool.lease(None)
    assert pool.release(a) == a


def test_ipam_routes_addresses_to_their_pool() -> None:
    ipam: Ipam[str] = Ipam(
        [
            EnclaveSubnet.default(),
            EnclaveSubnet.parse("192.168.29.0/30"),
            EnclaveSubnet.parse("10.50.0.0/16"),
            EnclaveSubnet.parse("10.60.0.9/32"),
        ]
    )
    a = ipam.lease("192.168.28.0/24", "shared-1")
    b = ipam.lease(IPv4Network("192.168.29.0/30"), "app-1")
    c = ipam.lease("10.50.0.0/16", "app-2")
    assert (ipam.owner_of(a), ipam.owner_of(b), ipam.owner_of(c)) == ("shared-1", "app-1", "app-2")
    assert ipam.owner_of(IPv4Address("8.8.8.8")) is None
    assert ipam.pool_of(IPv4Address("10.60.0.9")) is ipam.pool("10.60.0.9/32")
    subnet = ipam.subnet_of(c)
    assert subnet is not None and subnet.network == IPv4Network("10.50.0.0/16")
    ipam.release(b)
    with pytest.raises(PoolExhausted):
        ipam.lease("192.168.29.0/30", "app-1b")
    ipam.confirm_flushed(b)
    assert ipam.lease("192.168.29.0/30", "app-1b") == b
    with pytest.raises(NotLeased):
        ipam.release(IPv4Address("8.8.8.8"))


def test_ipam_rejects_overlaps_and_unknown_subnets() -> None:
    ipam: Ipam[str] = Ipam.default()
    with pytest.raises(ValueError):
        ipam.add_subnet(EnclaveSubnet.parse("192.168.0.0/16"))
    with pytest.raises(KeyError):
        ipam.lease("10.0.0.0/8", "x")


def test_ipam_remove_subnet_only_when_idle() -> None:
    ipam: Ipam[str] = Ipam([EnclaveSubnet.parse("10.9.0.0/24")])
    a = ipam.lease("10.9.0.0/24", "x")
    with pytest.raises(IpamError):
        ipam.remove_subnet("10.9.0.0/24")
    ipam.confirm_flushed(ipam.release(a))
    ipam.remove_subnet("10.9.0.0/24")
    assert ipam.pool_of(a) is None
    ipam.add_subnet(EnclaveSubnet.parse("10.9.0.0/25"))  # no longer overlaps anything


# --- property: whatever the sequence of operations, the invariants hold ---

_NETWORKS = st.sampled_from(
    ["10.0.0.0/24", "10.0.0.0/28", "10.0.0.0/29", "10.0.0.0/30", "10.0.0.0/31", "10.0.0.0/32"]
)


@st.composite
def _subnets(draw: st.DrawFn) -> EnclaveSubnet:
    net = IPv4Network(draw(_NETWORKS))
    hosts = list(net.hosts()) if net.prefixlen < 31 else list(net)
    return EnclaveSubnet(net, draw(st.sampled_from(hosts)))


_OPS = st.lists(
    st.tuples(st.sampled_from(["lease", "release", "flush"]), st.integers(0, 300)), max_size=400
)


@settings(max_examples=150, deadline=None)
@given(subnet=_subnets(), ops=_OPS)
def test_pool_invariants(subnet: EnclaveSubnet, ops: list[tuple[str, int]]) -> None:
    pool: AddressPool[int] = AddressPool(subnet)
    net = subnet.network
    forbidden = {subnet.gateway}
    if net.prefixlen <= 30:
        forbidden |= {net.network_address, net.broadcast_address}
    leased: dict[IPv4Address, int] = {}
    quarantined: list[IPv4Address] = []
    for step, (op, n) in enumerate(ops):
        if op == "lease":
            try:
                addr = pool.lease(step)
            except PoolExhausted:
                assert pool.available == 0
                continue
            assert addr in net
            assert addr not in forbidden
            assert addr not in leased  # never double-leased
            assert addr not in quarantined  # never leased while quarantined
            leased[addr] = step
        elif op == "release" and leased:
            addr = sorted(leased)[n % len(leased)]
            del leased[addr]
            assert pool.release(addr) == addr
            quarantined.append(addr)
        elif op == "flush" and quarantined:
            pool.confirm_flushed(quarantined.pop(n % len(quarantined)))
        assert pool.leases == leased
        assert pool.quarantined == frozenset(quarantined)
        assert pool.available == pool.capacity - len(leased) - len(quarantined)
    assert pool.capacity == net.num_addresses - len(forbidden)


@pytest.mark.parametrize(
    "candidate", ["10.0.0.0/8", "10.1.2.0/24", "10.1.2.128/25", "10.1.3.0/24", "10.1.5.7/32"]
)
def test_overlap_found_among_many_subnets(candidate: str) -> None:
    ipam: Ipam[str] = Ipam(
        [EnclaveSubnet.parse(f"10.1.{i}.0/24") for i in range(0, 200, 2)]
        + [EnclaveSubnet.parse("10.1.3.0/28"), EnclaveSubnet.parse("10.1.5.0/29")]
    )
    with pytest.raises(ValueError, match="overlaps"):
        ipam.add_subnet(EnclaveSubnet.parse(candidate))
    ipam.add_subnet(EnclaveSubnet.parse("10.1.3.16/28"))  # the gap next to 10.1.3.0/28
    ipam.remove_subnet("10.1.3.16/28")
    ipam.add_subnet(EnclaveSubnet.parse("10.1.3.16/28"))


# Networks within 10.0.0.0/16 (many overlaps), any prefix length from /16 to /32.
_networks = st.builds(
    lambda offset, prefixlen: IPv4Network((0x0A000000 + offset, prefixlen), strict=False),
    st.integers(0, 0xFFFF),
    st.integers(16, 32),
)


@given(st.lists(_networks, max_size=40))
@settings(max_examples=300)
def test_disjoint_networks_find_what_a_pairwise_check_finds(networks: list[IPv4Network]) -> None:
    index: DisjointNetworks[int] = DisjointNetworks()
    kept: list[IPv4Network] = []
    for number, network in enumerate(networks):
        pairwise = [other for other in kept if other.overlaps(network)]
        found = index.overlapping(network)
        if pairwise:
            assert found is not None and found[0] in pairwise
            with pytest.raises(ValueError, match="overlaps"):
                index.add(network, number)
        else:
            assert found is None
            index.add(network, number)
            kept.append(network)
    for network in kept[::2]:
        index.remove(network)
    for network in kept[1::2]:
        found = index.overlapping(network)
        assert found is not None and found[0] == network
    with pytest.raises(KeyError):
        index.remove(IPv4Network("192.0.2.0/24"))
