"""Enclave subnets and address leases (pure logic, no I/O).

An `AddressPool` hands out the host addresses of one `EnclaveSubnet`. An
address goes through three states::

    free --lease()--> leased --release()--> quarantined --confirm_flushed()--> free

The quarantine exists because conntrack entries (and their marks, which
identify the enclave that opened a connection) outlive the enclave: a new
enclave given the same address must not inherit the old one's connections.
The caller flushes them between the two steps, for example::

    addr = ipam.release(addr)
    await loop.run_in_executor(None, conntrack.flush_address, addr)
    ipam.confirm_flushed(addr)

Free addresses are handed out never-used first (ascending), then in the order
they were freed, so the most recently released address is re-used last.

Which addresses are never leased:
- prefix /0../30: the network and broadcast addresses and the gateway;
- /31 (RFC 3021 point-to-point, no network or broadcast address): both
  addresses are hosts, the gateway takes one and the pool holds the other;
- /32: the single address is the gateway, so the pool is empty and every
  `lease()` raises `PoolExhausted`.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Generic, Protocol, TypeVar

OwnerT = TypeVar("OwnerT", bound=Hashable)
T = TypeVar("T")


class DisjointNetworks(Generic[T]):
    """Networks that do not overlap, each with a value, sorted by address, so that the
    overlap check of a new one is a bisection: pairwise checks made loading 10,000 app
    subnets 50 million comparisons (minutes). CIDR networks either nest or are disjoint,
    so only the neighbours of a new network in address order can overlap it."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int]] = []  # (first, last) address, sorted
        self._values: list[T] = []

    def overlapping(self, network: IPv4Network) -> tuple[IPv4Network, T] | None:
        """A network already here that overlaps `network`, with its value; None if none."""
        first, last = int(network.network_address), int(network.broadcast_address)
        index = bisect.bisect_left(self._ranges, (first, last))
        for i in (index - 1, index):
            if 0 <= i < len(self._ranges):
                other_first, other_last = self._ranges[i]
                if other_first <= last and first <= other_last:
                    size = other_last - other_first + 1
                    other = IPv4Network((other_first, 32 - size.bit_length() + 1))
                    return other, self._values[i]
        return None

    def add(self, network: IPv4Network, value: T) -> None:
        """Raises ValueError if `network` overlaps one already here."""
        if (found := self.overlapping(network)) is not None:
            raise ValueError(f"subnet {network} overlaps {found[0]}")
        key = (int(network.network_address), int(network.broadcast_address))
        index = bisect.bisect_left(self._ranges, key)
        self._ranges.insert(index, key)
        self._values.insert(index, value)

    def remove(self, network: IPv4Network) -> None:
        key = (int(network.network_address), int(network.broadcast_address))
        index = bisect.bisect_left(self._ranges, key)
        if index == len(self._ranges) or self._ranges[index] != key:
            raise KeyError(network)
        del self._ranges[index]
        del self._values[index]


DEFAULT_SUBNET = IPv4Network("192.168.28.0/24")
DEFAULT_GATEWAY = IPv4Address("192.168.28.1")


class IpamError(Exception):
    """Base class of address management errors."""


class PoolExhausted(IpamError):
    """No free address is left in the pool (quarantined ones do not count)."""


class NotLeased(IpamError, KeyError):
    """The address is not in the state the operation needs (or not in any pool)."""


def _usable_range(network: IPv4Network) -> tuple[int, int]:
    """First and last host address (as ints) that may carry a host, gateway included."""
    first, last = int(network.network_address), int(network.broadcast_address)
    if network.prefixlen <= 30:
        return first + 1, last - 1
    return first, last  # /31 and /32 have no network or broadcast address


@dataclass(frozen=True)
class EnclaveSubnet:
    """An enclave subnet and the gateway address the TUN device holds in it."""

    network: IPv4Network
    gateway: IPv4Address

    def __post_init__(self) -> None:
        first, last = _usable_range(self.network)
        if not first <= int(self.gateway) <= last:
            raise ValueError(f"gateway {self.gateway} is not a host address of {self.network}")

    @classmethod
    def parse(
        cls, network: str | IPv4Network, gateway: str | IPv4Address | None = None
    ) -> EnclaveSubnet:
        """Subnet from text; the gateway defaults to the first host address."""
        net = IPv4Network(network)
        gw = IPv4Address(_usable_range(net)[0]) if gateway is None else IPv4Address(gateway)
        return cls(net, gw)

    @classmethod
    def default(cls) -> EnclaveSubnet:
        """The original SENG default: 192.168.28.0/24, gateway 192.168.28.1."""
        return cls(DEFAULT_SUBNET, DEFAULT_GATEWAY)

    @property
    def netmask(self) -> IPv4Address:
        return self.network.netmask

    @property
    def prefixlen(self) -> int:
        return self.network.prefixlen

    @property
    def gateway_interface(self) -> IPv4Interface:
        """Gateway address with the subnet's prefix, as configured on the TUN device."""
        return IPv4Interface(f"{self.gateway}/{self.network.prefixlen}")


class AddressPool(Generic[OwnerT]):
    """Leases of the host addresses of one subnet. All operations are O(1).

    Addresses are kept as ints; the never-used part of the range is a cursor,
    so a /8 pool costs no more memory than a /30 until addresses are used.
    """

    def __init__(self, subnet: EnclaveSubnet) -> None:
        self.subnet = subnet
        first, last = _usable_range(subnet.network)
        self._gateway = int(subnet.gateway)
        self._next_unused = first  # addresses >= this were never handed out
        self._last = last
        self._recycled: deque[int] = deque()  # freed addresses, oldest first
        self._leases: dict[int, OwnerT] = {}
        self._quarantine: set[int] = set()
        self._capacity = last - first + 1 - 1  # minus the gateway

    @property
    def network(self) -> IPv4Network:
        return self.subnet.network

    @property
    def capacity(self) -> int:
        """How many addresses the pool can lease at most."""
        return self._capacity

    @property
    def available(self) -> int:
        """How many addresses `lease()` can hand out right now."""
        return self._capacity - len(self._leases) - len(self._quarantine)

    def __contains__(self, address: object) -> bool:
        return isinstance(address, IPv4Address) and address in self.subnet.network

    def _take_free(self) -> int:
        while self._next_unused <= self._last:
            candidate = self._next_unused
            self._next_unused += 1
            if candidate != self._gateway:
                return candidate
        if self._recycled:
            return self._recycled.popleft()
        raise PoolExhausted(f"no free address in {self.subnet.network}")

    def lease(self, owner: OwnerT) -> IPv4Address:
        """Lease a free address to `owner`; raises `PoolExhausted`."""
        address = self._take_free()
        self._leases[address] = owner
        return IPv4Address(address)

    def release(self, address: IPv4Address) -> IPv4Address:
        """End a lease; the address goes to quarantine until `confirm_flushed()`.

        Returns the address whose conntrack entries must now be flushed.
        Releasing a quarantined address again is a no-op (the caller may
        retry a failed flush); releasing a free address raises `NotLeased`.
        """
        key = int(address)
        if key in self._quarantine:
            return IPv4Address(key)
        if key not in self._leases:
            raise NotLeased(f"{address} is not leased")
        del self._leases[key]
        self._quarantine.add(key)
        return IPv4Address(key)

    def confirm_flushed(self, address: IPv4Address) -> None:
        """The address's conntrack entries are gone: make it leasable again."""
        key = int(address)
        try:
            self._quarantine.remove(key)
        except KeyError:
            raise NotLeased(f"{address} is not quarantined") from None
        self._recycled.append(key)

    def owner_of(self, address: IPv4Address) -> OwnerT | None:
        """The owner of a leased address, None if it is not leased."""
        return self._leases.get(int(address))

    def is_quarantined(self, address: IPv4Address) -> bool:
        return int(address) in self._quarantine

    @property
    def leases(self) -> Mapping[IPv4Address, OwnerT]:
        """Snapshot of the current leases."""
        return {IPv4Address(a): o for a, o in self._leases.items()}

    @property
    def quarantined(self) -> frozenset[IPv4Address]:
        return frozenset(IPv4Address(a) for a in self._quarantine)


class Ipam(Generic[OwnerT]):
    """Address pools keyed by subnet (one per application subnet plus the shared one).

    Subnets must not overlap, so an address belongs to at most one pool. To
    find it without scanning the pools, the address is masked with each
    prefix length in use and looked up in a dict: at most 33 lookups,
    usually one or two, whatever the number of pools.
    """

    def __init__(self, subnets: Iterable[EnclaveSubnet] = ()) -> None:
        self._pools: dict[IPv4Network, AddressPool[OwnerT]] = {}
        self._prefixlens: list[int] = []  # distinct prefix lengths, longest first
        self._networks: DisjointNetworks[None] = DisjointNetworks()
        for subnet in subnets:
            self.add_subnet(subnet)

    @classmethod
    def default(cls) -> Ipam[OwnerT]:
        return cls([EnclaveSubnet.default()])

    def add_subnet(self, subnet: EnclaveSubnet) -> AddressPool[OwnerT]:
        self._networks.add(subnet.network, None)
        pool: AddressPool[OwnerT] = AddressPool(subnet)
        self._pools[subnet.network] = pool
        if subnet.prefixlen not in self._prefixlens:
            self._prefixlens.append(subnet.prefixlen)
            self._prefixlens.sort(reverse=True)
        return pool

    def remove_subnet(self, network: IPv4Network | str) -> None:
        """Drop an idle pool; refuses while it has leases or quarantined addresses."""
        pool = self.pool(network)
        if pool.leases or pool.quarantined:
            raise IpamError(f"subnet {pool.network} still has leased or quarantined addresses")
        del self._pools[pool.network]
        self._networks.remove(pool.network)
        if all(n.prefixlen != pool.network.prefixlen for n in self._pools):
            self._prefixlens.remove(pool.network.prefixlen)

    def pool(self, network: IPv4Network | str) -> AddressPool[OwnerT]:
        try:
            return self._pools[IPv4Network(network)]
        except KeyError:
            raise KeyError(f"no pool for subnet {network}") from None

    def pools(self) -> Iterator[AddressPool[OwnerT]]:
        return iter(self._pools.values())

    def pool_of(self, address: IPv4Address) -> AddressPool[OwnerT] | None:
        """The pool whose subnet contains `address`, if any."""
        value = int(address)
        for plen in self._prefixlens:
            mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
            pool = self._pools.get(IPv4Network((value & mask, plen)))
            if pool is not None:
                return pool
        return None

    def lease(self, network: IPv4Network | str, owner: OwnerT) -> IPv4Address:
        return self.pool(network).lease(owner)

    def _pool_for(self, address: IPv4Address) -> AddressPool[OwnerT]:
        pool = self.pool_of(address)
        if pool is None:
            raise NotLeased(f"{address} is in no enclave subnet")
        return pool

    def release(self, address: IPv4Address) -> IPv4Address:
        """See `AddressPool.release`."""
        return self._pool_for(address).release(address)

    def confirm_flushed(self, address: IPv4Address) -> None:
        self._pool_for(address).confirm_flushed(address)

    def owner_of(self, address: IPv4Address) -> OwnerT | None:
        pool = self.pool_of(address)
        return None if pool is None else pool.owner_of(address)

    def subnet_of(self, address: IPv4Address) -> EnclaveSubnet | None:
        pool = self.pool_of(address)
        return None if pool is None else pool.subnet


class LeaseStore(Protocol[OwnerT]):
    """What the gateway core needs of its address leases. `Ipam` keeps them in this
    process; a store shared by two gateways (failover) implements the same calls, so the
    core does not change when leases move out of the process."""

    def pools(self) -> Iterator[AddressPool[OwnerT]]: ...

    def add_subnet(self, subnet: EnclaveSubnet) -> AddressPool[OwnerT]: ...

    def remove_subnet(self, network: IPv4Network | str) -> None: ...

    def lease(self, network: IPv4Network | str, owner: OwnerT) -> IPv4Address: ...

    def release(self, address: IPv4Address) -> IPv4Address: ...

    def confirm_flushed(self, address: IPv4Address) -> None: ...
