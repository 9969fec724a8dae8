"""Network-namespace topologies for the lab and the integration tests.

A `Topology` is declarative: hosts (one network namespace each, named
``prefix + host``) and segments (an IPv4 subnet joining a hub host to member
hosts). `up()` builds it and, on any failure, removes everything it created;
`down()` removes it and is idempotent; `cleanup(prefix)` removes whatever a
crashed run left behind. Everything lives inside the namespaces (both ends of
every veth are created directly in them), so deleting the namespaces deletes
everything and nothing is ever left in the root namespace.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from types import TracebackType
from typing import Any, TypeVar

from seng_fw.system.netns import (
    IFNAMSIZ,
    delete_namespace,
    ip,
    namespace_exists,
    netns_socket,
    run_in_netns,
    write_sysctl,
)
from seng_fw.tunnel.packets import inet_checksum

T = TypeVar("T")

LAB_PREFIX = "sfwlab-"


def ping(
    netns: str | None,
    address: IPv4Address | str,
    *,
    timeout: float = 1.0,
    count: int = 1,
    source: IPv4Address | str | None = None,
) -> bool:
    """ICMP echo from `netns`: True once a reply comes back within `timeout` per try.

    Built in because the ping binary (iputils-ping) is not installed everywhere.
    """
    dst = str(address)
    sock = netns_socket(netns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with sock:
        if source is not None:
            sock.bind((str(source), 0))
        ident = (os.getpid() ^ threading.get_ident()) & 0xFFFF
        for seq in range(1, count + 1):
            body = struct.pack("!HH", ident, seq) + b"seng-fw-ping"
            header = struct.pack("!BBH", 8, 0, inet_checksum(b"\x08\x00\x00\x00" + body))
            try:
                sock.sendto(header + body, (dst, 0))
            except OSError:  # no route, or ARP failed for the previous try
                time.sleep(min(timeout, 0.1))
                continue
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                if not select.select([sock], [], [], left)[0]:
                    break
                packet, (src, _) = sock.recvfrom(65535)
                ihl = (packet[0] & 0x0F) * 4
                icmp = packet[ihl : ihl + 8]
                if (
                    src == dst
                    and len(icmp) == 8
                    and icmp[0] == 0
                    and struct.unpack("!HH", icmp[4:8]) == (ident, seq)
                ):
                    return True
    return False


# --- declarative topology ----------------------------------------------------


@dataclass(frozen=True)
class Route:
    dst: IPv4Network
    via: IPv4Address

    @classmethod
    def parse(cls, dst: str, via: str) -> Route:
        return cls(IPv4Network(dst), IPv4Address(via))


@dataclass(frozen=True)
class Host:
    """One network namespace. Loopback is always up; IPv6 is off unless asked."""

    name: str
    forwarding: bool = False
    routes: tuple[Route, ...] = ()
    ipv6: bool = False
    sysctls: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Segment:
    """A subnet joining `hub` to `members`.

    In every host the interface facing the segment is named after it. With
    one member the segment is a plain veth pair; with several, the hub holds
    a bridge (carrying the hub's address) with one veth port per member,
    named ``NAME-pN``.
    """

    name: str
    network: IPv4Network
    hub: str
    hub_address: IPv4Address
    members: tuple[tuple[str, IPv4Address], ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.name) <= IFNAMSIZ - 4:
            raise ValueError(f"segment name {self.name!r}: 1..{IFNAMSIZ - 4} characters")
        if not self.members:
            raise ValueError(f"segment {self.name!r} has no members")
        addresses = [self.hub_address, *(a for _, a in self.members)]
        hosts = [self.hub, *(h for h, _ in self.members)]
        if len(set(addresses)) != len(addresses) or len(set(hosts)) != len(hosts):
            raise ValueError(f"segment {self.name!r}: duplicate host or address")
        for addr in addresses:
            if addr not in self.network:
                raise ValueError(f"segment {self.name!r}: {addr} not in {self.network}")

    def interface(self, address: IPv4Address) -> str:
        return str(IPv4Interface(f"{address}/{self.network.prefixlen}"))


class Topology:
    """Hosts and segments under a name prefix, so several labs coexist."""

    def __init__(self, prefix: str, hosts: Iterable[Host], segments: Iterable[Segment]) -> None:
        if not prefix or "/" in prefix:
            raise ValueError(f"bad namespace prefix {prefix!r}")
        self.prefix = prefix
        self.hosts: dict[str, Host] = {}
        for host in hosts:
            if host.name in self.hosts:
                raise ValueError(f"duplicate host {host.name!r}")
            self.hosts[host.name] = host
        self.segments: dict[str, Segment] = {}
        for seg in segments:
            if seg.name in self.segments:
                raise ValueError(f"duplicate segment {seg.name!r}")
            for name in (seg.hub, *(h for h, _ in seg.members)):
                if name not in self.hosts:
                    raise ValueError(f"segment {seg.name!r} names unknown host {name!r}")
            self.segments[seg.name] = seg

    # names and addresses

    def ns(self, host: str) -> str:
        """Namespace name of `host`."""
        if host not in self.hosts:
            raise KeyError(f"no host {host!r}")
        return self.prefix + host

    def address(self, host: str, segment: str) -> IPv4Address:
        """Address of `host` on `segment`."""
        seg = self.segments[segment]
        if host == seg.hub:
            return seg.hub_address
        for name, addr in seg.members:
            if name == host:
                return addr
        raise KeyError(f"host {host!r} is not on segment {segment!r}")

    # life cycle

    def up(self, *, replace: bool = False) -> None:
        """Create everything; on failure remove what was created and re-raise.

        A namespace that already exists is an error (it may be another run's)
        unless `replace` is set, in which case it is deleted first.
        """
        if replace:
            self.down()
        created: list[str] = []
        try:
            for host in self.hosts.values():
                name = self.ns(host.name)
                ip("netns", "add", name)
                created.append(name)
                self._configure_host(host)
            for seg in self.segments.values():
                self._build_segment(seg)
            for host in self.hosts.values():
                for route in host.routes:
                    ip(
                        "route",
                        "add",
                        str(route.dst),
                        "via",
                        str(route.via),
                        netns=self.ns(host.name),
                    )
        except BaseException:
            for name in reversed(created):
                with contextlib.suppress(Exception):
                    delete_namespace(name)
            raise

    def _configure_host(self, host: Host) -> None:
        netns = self.ns(host.name)
        # Before any interface exists, so no link-local address, DAD or router
        # solicitation ever appears in the lab's captures.
        if not host.ipv6:
            for key in ("net.ipv6.conf.default.disable_ipv6", "net.ipv6.conf.all.disable_ipv6"):
                with contextlib.suppress(FileNotFoundError):
                    write_sysctl(netns, key, 1)
        ip("link", "set", "dev", "lo", "up", netns=netns)
        # Always written: a new namespace inherits IPv4 settings from the host's
        # (net.core.devconf_inherit_init_net=0), so a forwarding host would leak in.
        write_sysctl(netns, "net.ipv4.ip_forward", 1 if host.forwarding else 0)
        for key, value in host.sysctls.items():
            write_sysctl(netns, key, value)

    def _build_segment(self, seg: Segment) -> None:
        hub_ns = self.ns(seg.hub)
        if len(seg.members) == 1:
            member, addr = seg.members[0]
            self._veth(hub_ns, seg.name, self.ns(member), seg.name)
            self._set_address(hub_ns, seg.name, seg.interface(seg.hub_address))
            self._set_address(self.ns(member), seg.name, seg.interface(addr))
            return
        ip("link", "add", "name", seg.name, "type", "bridge", netns=hub_ns)
        self._set_address(hub_ns, seg.name, seg.interface(seg.hub_address))
        for i, (member, addr) in enumerate(seg.members, start=1):
            port = f"{seg.name}-p{i}"
            self._veth(hub_ns, port, self.ns(member), seg.name)
            ip("link", "set", "dev", port, "master", seg.name, "up", netns=hub_ns)
            self._set_address(self.ns(member), seg.name, seg.interface(addr))

    @staticmethod
    def _veth(ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
        # Both ends are created in their namespaces: no name ever exists in the
        # root namespace, where two labs' interface names could collide.
        ip(
            "link",
            "add",
            "name",
            name_a,
            "type",
            "veth",
            "peer",
            "name",
            name_b,
            "netns",
            ns_b,
            netns=ns_a,
        )

    @staticmethod
    def _set_address(netns: str, ifname: str, interface: str) -> None:
        ip("addr", "add", interface, "dev", ifname, netns=netns)
        ip("link", "set", "dev", ifname, "up", netns=netns)

    def down(self) -> list[str]:
        """Remove the topology's namespaces (idempotent); return those deleted."""
        return [self.ns(h) for h in self.hosts if delete_namespace(self.ns(h))]

    def is_up(self) -> bool:
        return all(namespace_exists(self.ns(h)) for h in self.hosts)

    def __enter__(self) -> Topology:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    # running things inside hosts

    def exec_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """The command line that runs `argv` inside `host`."""
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def run(
        self,
        host: str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = 30.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside `host`, capturing text output."""
        return subprocess.run(
            self.exec_argv(host, argv),
            check=check,
            timeout=timeout,
            input=input,
            env=None if env is None else dict(env),
            capture_output=True,
            text=True,
        )

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a command inside `host`; keyword arguments go to `subprocess.Popen`.

        Processes still running in a host are ended by `down()`.
        """
        return subprocess.Popen(self.exec_argv(host, argv), **kwargs)

    def call(self, host: str, fn: Callable[..., T], *args: Any) -> T:
        """Call a Python function inside `host` (see `run_in_netns`)."""
        return run_in_netns(self.ns(host), fn, *args)

    def socket(self, host: str, family: int, type: int, proto: int = 0) -> socket.socket:
        return netns_socket(self.ns(host), family, type, proto)

    def ping(self, host: str, address: IPv4Address | str, *, timeout: float = 1.0) -> bool:
        return ping(self.ns(host), address, timeout=timeout)


# --- the lab of DESIGN.md section 5 -----------------------------------------

CLIENT_A, CLIENT_B, GATEWAY, EXTERNAL = "clienta", "clientb", "gw", "ext"
LAN, EXT = "lan", "ext"


def lab_topology(
    prefix: str = LAB_PREFIX,
    *,
    lan: IPv4Network | str = "10.77.1.0/24",
    ext: IPv4Network | str = "10.77.2.0/24",
    enclave_supernet: IPv4Network | str = "192.168.0.0/16",
) -> Topology:
    """Client hosts A and B on a LAN with the gateway; an external host behind it.

    ::

        clienta .10 --+
                      +-- lan (bridge in gw) .1  gw  .1 ext --- .2 ext
        clientb .20 --+

    The gateway forwards; the external host routes the enclave subnets back
    through it. Client hosts only need the gateway's LAN address (connected).
    """
    lan_net, ext_net = IPv4Network(lan), IPv4Network(ext)
    if lan_net.num_addresses < 32 or ext_net.num_addresses < 4:
        raise ValueError("lan needs at least a /27 and ext a /30")
    gw_ext = ext_net[1]
    return Topology(
        prefix,
        hosts=[
            Host(CLIENT_A),
            Host(CLIENT_B),
            Host(GATEWAY, forwarding=True),
            Host(EXTERNAL, routes=(Route(IPv4Network(enclave_supernet), gw_ext),)),
        ],
        segments=[
            Segment(
                LAN,
                lan_net,
                GATEWAY,
                lan_net[1],
                ((CLIENT_A, lan_net[10]), (CLIENT_B, lan_net[20])),
            ),
            Segment(EXT, ext_net, GATEWAY, gw_ext, ((EXTERNAL, ext_net[2]),)),
        ],
    )
