"""Network-namespace topologies for the lab and the integration tests.

A `Topology` is declarative: hosts (one network namespace each, named
``prefix + host``) and segments (an IPv4 subnet joining a hub host to member
hosts). `up()` builds it and, on any failure, removes everything it created;
`down()` removes it and is idempotent; `cleanup(prefix)` removes whatever a
crashed run left behind. Everything lives inside the namespaces (both ends of
every veth are created directly in them), so deleting the namespaces deletes
everything and nothing is ever left in the root namespace.

The plumbing runs iproute2 commands rather than pyroute2: they are the
commands a human types to inspect or repair a lab, their errors are readable,
and pyroute2 forks a helper process for every netlink socket it opens in
another namespace anyway. Short Python jobs (sysctls, sockets, ping) run in a
thread that `setns()`es into the namespace (`run_in_netns`): a thread's
network namespace is its own, so the rest of the process is unaffected, and
sockets and TUN file descriptors keep their namespace after the thread ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from seng_fw.tunnel.packets import inet_checksum

T = TypeVar("T")

NETNS_RUN_DIR = Path("/run/netns")  # where `ip netns add` bind-mounts namespaces
CLONE_NEWNET = 0x40000000
IFNAMSIZ = 15  # usable characters of an interface name
LAB_PREFIX = "sfwlab-"

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    """An iproute2 command or a namespace operation failed."""


# --- primitives -------------------------------------------------------------


def ip(*args: str, netns: str | None = None) -> str:
    """Run `ip [-n NETNS] ARGS...`; return stdout, raise `NetnsError` with stderr."""
    argv = ["ip", *(("-n", netns) if netns else ()), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc.stdout


def list_namespaces(prefix: str = "") -> list[str]:
    """Names of the named network namespaces starting with `prefix`."""
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def namespace_exists(name: str) -> bool:
    return (NETNS_RUN_DIR / name).exists()


def _namespace_pids(name: str) -> list[int]:
    try:
        out = ip("netns", "pids", name)
    except NetnsError:
        return []
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def delete_namespace(name: str, *, kill_grace: float = 2.0) -> bool:
    """Delete a namespace, ending the processes still running in it first.

    The processes would otherwise keep the namespace (and its veths and
    addresses) alive after its name is gone. Returns False if it did not exist.
    """
    if not namespace_exists(name):
        return False
    pids = _namespace_pids(name)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + kill_grace
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            if pids:
                time.sleep(0.02)
        if not pids:
            break
    try:
        ip("netns", "delete", name)
    except NetnsError:
        if namespace_exists(name):
            raise
        return False  # raced with another cleanup
    return True


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def cleanup(prefix: str) -> list[str]:
    """Delete every namespace whose name starts with `prefix`; return their names."""
    if not prefix:
        raise ValueError("refusing to delete every namespace: empty prefix")
    return [name for name in list_namespaces(prefix) if delete_namespace(name)]


def _event_loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def run_in_netns(netns: str | None, fn: Callable[..., T], *args: Any) -> T:
    """Call `fn(*args)` in a thread that has entered namespace `netns`.

    With `netns=None` the call happens in the current namespace: directly, or in a
    helper thread when this thread runs an asyncio loop, because pyroute2's synchronous
    API drives an event loop of its own and cannot run inside a running one.
    Sockets, netlink sockets and TUN devices opened by `fn` belong to `netns`
    and stay usable from any thread afterwards.
    """
    if netns is None and not _event_loop_running():
        return fn(*args)
    result: list[T] = []
    error: list[BaseException] = []

    def enter(name: str) -> None:
        try:
            fd = os.open(NETNS_RUN_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NetnsError(f"no network namespace {name!r}") from None
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({name}): {os.strerror(err)}")
        finally:
            os.close(fd)

    def target() -> None:
        try:
            if netns is not None:
                enter(netns)
            result.append(fn(*args))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{netns or 'current'}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def netns_socket(netns: str | None, family: int, type: int, proto: int = 0) -> socket.socket:
    """A socket that lives in namespace `netns`."""
    return run_in_netns(netns, socket.socket, family, type, proto)


def write_sysctl(netns: str | None, key: str, value: str | int) -> None:
    """Set `key` (dotted, e.g. ``net.ipv4.ip_forward``) inside `netns`."""
    path = Path("/proc/sys", *key.split("."))

    def write() -> None:
        path.write_text(f"{value}\n")

    run_in_netns(netns, write)


def read_sysctl(netns: str | None, key: str) -> str:
    path = Path("/proc/sys", *key.split("."))
    return run_in_netns(netns, lambda: path.read_text().strip())


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
