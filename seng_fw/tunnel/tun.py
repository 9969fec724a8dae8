"""TUN device: raw IPv4 packets between the kernel and the tunnel code.

Used on both sides: the gateway's TUN carries one gateway address per enclave
subnet (``192.168.28.1/24`` ...); the enclave emulator's TUN carries the
assigned address (``/32``) and routes (`add_route`) through the device.

Namespaces: `TunDevice.create(netns=NAME)` opens the device from a helper
thread that has entered NAME (`seng_fw.system.netns.run_in_netns`); the kernel puts
the device in the namespace of whoever opened ``/dev/net/tun`` and the file
descriptor then works from any thread. A process started with
``ip netns exec NAME`` simply passes ``netns=None``.

Offloads (the gateway's device, `create(offload=True)`): the device carries a
virtio-net header on every read and write (``IFF_VNET_HDR``) and the kernel may hand
out TCP super-packets of up to 64 KB with their checksums left to us
(``TUNSETOFFLOAD``: ``TUN_F_CSUM | TUN_F_TSO4``): one read, one trip through the
forwarding path, instead of one per segment. `read_batch` still returns complete
IPv4 packets (split and checksummed by `seng_fw.tunnel.offload`), `write` writes one
packet, `write_gso` a coalesced super-packet. Where the kernel refuses, the device
works without (said once in the log).

Data path: the file descriptor is non-blocking. Register it with the event
loop (``loop.add_reader(tun.fileno(), ...)``) and drain it with
`read_batch()` on every wakeup, so one wakeup moves many packets (DESIGN.md
section 6).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from types import TracebackType
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from seng_fw.system.netns import NetnsError, run_in_netns
from seng_fw.tunnel import offload
from seng_fw.tunnel.offload import VNET_HDR_LEN, VNET_NONE, OffloadError

log = logging.getLogger("seng_fw.tunnel")

DEFAULT_NAME = "tunFA"  # the original SENG server's device
DEFAULT_MTU = 1432
# Without IFF_VNET_HDR the kernel never hands out packets larger than the MTU,
# but the MTU can be raised behind our back: read whole IPv4 maximum packets.
READ_SIZE = 65535
# With offloads: a virtio-net header, then a TSO super-packet of up to 64 KB.
VNET_READ_SIZE = VNET_HDR_LEN + 65535

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNSETPERSIST = 0x400454CB  # _IOW('T', 203, int)
TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int)
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000  # no 4-byte packet-info header: reads and writes are bare IP packets
IFF_VNET_HDR = 0x4000  # a virtio_net_hdr before every packet
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUN_F_CSUM = 0x01  # we take packets with partial checksums
TUN_F_TSO4 = 0x02  # ... and IPv4 TCP super-packets
OFFLOADS = TUN_F_CSUM | TUN_F_TSO4
IFNAMSIZ = 16

# Errors of a single write that are the packet's fault or transient memory
# pressure, not the device's: the packet is dropped and the caller counts it.
_DROP_ERRNOS = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM, errno.EINVAL})
# The device is gone (deleted, or its fd broken): nothing read or written will work again.
TUN_GONE_ERRNOS = frozenset({errno.EBADFD, errno.EIO, errno.ENODEV, errno.ENXIO, errno.EBADF})


class TunError(RuntimeError):
    """The TUN device could not be created or configured."""


def _open_tun(name: str, flags: int = IFF_TUN | IFF_NO_PI) -> tuple[int, str]:
    """Create (or attach to) TUN device `name` and return its queue fd and real name.

    Hand-written ioctl because the queue file descriptor only comes from
    TUNSETIFF on an open ``/dev/net/tun``: pyroute2's ``link('add',
    kind='tuntap')`` creates a persistent device and hands back no fd, and a
    non-persistent device has the nice property of vanishing with its fd when
    the process dies, even by SIGKILL.
    """
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifr = struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), flags)
        result = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as exc:
        os.close(fd)
        busy = exc.errno in (errno.EBUSY, errno.EINVAL)
        hint = " (name taken by another device or process?)" if busy else ""
        raise TunError(f"TUNSETIFF {name}: {exc.strerror}{hint}") from exc
    real_name = result[:IFNAMSIZ].split(b"\0", 1)[0].decode()
    return fd, real_name


def _open_with_offloads(name: str) -> tuple[int, str, int]:
    """Open with a virtio-net header and TSO, or without where the kernel refuses
    (said once in the log); returns the fd, the real name and the offloads granted."""
    try:
        fd, real_name = _open_tun(name, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
    except TunError as exc:
        fd, real_name = _open_tun(name)
        log.warning("TUN %s: no virtio-net header (%s): offloads off", real_name, exc)
        return fd, real_name, 0
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, OFFLOADS)
    except OSError as exc:
        # Header kept (writes still work, coalesced too): packets come one by one.
        log.warning("TUN %s: TUNSETOFFLOAD refused (%s): no TSO reads", real_name, exc.strerror)
        return fd, real_name, 0
    return fd, real_name, OFFLOADS


def _link_index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _disable_ipv6(name: str) -> None:
    # Keeps link-local addresses, router solicitations and MLD reports off an
    # IPv4-only tunnel. Runs in the caller's namespace thread, and /proc/sys/net
    # is per namespace of the calling thread.
    path = Path("/proc/sys/net/ipv6/conf", name, "disable_ipv6")
    with contextlib.suppress(FileNotFoundError):  # kernel without IPv6
        path.write_text("1\n")


def _has_vnet_hdr(fd: int) -> bool:
    """The device was opened with IFF_VNET_HDR (TUNGETIFF)."""
    ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    flags: int = struct.unpack_from("H", ifr, IFNAMSIZ)[0]
    return bool(flags & IFF_VNET_HDR)


class TunDevice:
    """An open, configured TUN device (IPv4, no packet-info header)."""

    def __init__(
        self,
        fd: int,
        name: str,
        index: int,
        mtu: int,
        netns: str | None,
        remove_on_close: bool,
        vnet_hdr: bool = False,
        offloads: int = 0,
    ) -> None:
        """Use `TunDevice.create`."""
        self._fd = fd
        # Reads and writes carry a virtio-net header; `offloads`: TUN_F_* granted.
        self.vnet_hdr = vnet_hdr
        self.offloads = offloads
        # Reads the offload code could not make into packets (counted by the caller).
        self.malformed = 0
        self.name = name
        self.index = index
        self.mtu = mtu
        self.netns = netns
        self.remove_on_close = remove_on_close
        self._closing = False

    @classmethod
    def create(
        cls,
        name: str = DEFAULT_NAME,
        *,
        mtu: int = DEFAULT_MTU,
        addresses: Iterable[IPv4Interface | str] = (),
        routes: Iterable[IPv4Network | str] = (),
        netns: str | None = None,
        remove_on_close: bool = True,
        txqueuelen: int | None = None,
        offload: bool = False,
    ) -> TunDevice:
        """Create the device, set its MTU and addresses, bring it up, add routes.

        `addresses` are interfaces (address/prefix; the prefix's route goes
        through the device). `txqueuelen` sizes the kernel's queue of packets
        waiting for `read_batch()` (default 500; beyond it packets are
        dropped). `name` may contain ``%d`` for the kernel to
        choose. If a persistent device of that name exists, it is taken over
        (`close()` then deletes it too, unless `remove_on_close` is False, e.g.
        for a device an administrator made for an unprivileged gateway). On
        any failure the fd is closed and, with `remove_on_close`, the device
        is gone. `offload`: virtio-net header and TSO (module docstring), where the
        kernel grants them.
        """
        if len(name.encode()) >= IFNAMSIZ:
            raise ValueError(f"interface name {name!r} longer than {IFNAMSIZ - 1} bytes")
        ifaces = [IPv4Interface(a) for a in addresses]
        nets = [IPv4Network(r) for r in routes]

        def build() -> TunDevice:
            if offload:
                fd, real_name, offloads = _open_with_offloads(name)
            else:
                fd, real_name, offloads = (*_open_tun(name), 0)
            try:
                vnet = offload and bool(offloads or _has_vnet_hdr(fd))
            except BaseException:
                os.close(fd)
                raise
            dev = cls(fd, real_name, 0, mtu, netns, remove_on_close, vnet, offloads)
            try:
                _disable_ipv6(real_name)  # before the link is up
                with IPRoute() as ipr:
                    index = _link_index(ipr, real_name)
                    if index is None:
                        raise TunError(f"{real_name} vanished right after creation")
                    dev.index = index
                    ipr.link("set", index=index, mtu=mtu)
                    if txqueuelen is not None:
                        ipr.link("set", index=index, txqlen=txqueuelen)
                    for iface in ifaces:
                        dev._addr(ipr, "add", iface)
                    ipr.link("set", index=index, state="up")
                    for net in nets:
                        dev._route(ipr, "add", net, None)
            except BaseException:
                dev._close_here()
                raise
            return dev

        try:
            return run_in_netns(netns, build)
        except NetlinkError as exc:
            raise TunError(f"configuring {name}: {exc}") from exc

    # --- configuration -----------------------------------------------------

    def _addr(self, ipr: Any, command: str, iface: IPv4Interface) -> None:
        try:
            ipr.addr(
                command, index=self.index, address=str(iface.ip), prefixlen=iface.network.prefixlen
            )
        except NetlinkError as exc:
            # Taking over a persistent device may find the address already there; one
            # being removed may be gone already.
            if (command, exc.code) not in (("add", errno.EEXIST), ("del", errno.EADDRNOTAVAIL)):
                raise

    def _route(self, ipr: Any, command: str, net: IPv4Network, src: IPv4Address | None) -> None:
        spec: dict[str, Any] = {"dst": str(net), "oif": self.index}
        if src is not None:
            spec["prefsrc"] = str(src)
        ipr.route(command, **spec)

    def _netlink(self, what: str, fn: Any, *args: Any) -> None:
        def job() -> None:
            with IPRoute() as ipr:
                fn(ipr, *args)

        try:
            run_in_netns(self.netns, job)
        except NetlinkError as exc:
            raise TunError(f"{self.name}: {what}: {exc}") from exc

    def change_addresses(
        self, add: Iterable[IPv4Interface] = (), remove: Iterable[IPv4Interface] = ()
    ) -> None:
        """Many addresses in one netlink session (one per enclave subnet: a policy of
        10,000 apps has as many, and the kernel takes 1-3 ms for each; callers run this
        in a worker thread). An address already there (add) or already gone (remove)
        is not an error."""
        added, removed = list(add), list(remove)

        def job(ipr: Any) -> None:
            for iface in removed:
                self._addr(ipr, "del", iface)
            for iface in added:
                self._addr(ipr, "add", iface)

        if added or removed:
            self._netlink(f"change {len(added)}+/{len(removed)}- addresses", job)

    def add_route(self, prefix: IPv4Network | str, *, src: IPv4Address | str | None = None) -> None:
        """Route `prefix` (``0.0.0.0/0`` for a default route) through the device."""
        net = IPv4Network(prefix)
        source = None if src is None else IPv4Address(src)
        self._netlink(f"add route {net}", self._route, "add", net, source)

    def remove_route(self, prefix: IPv4Network | str) -> None:
        net = IPv4Network(prefix)
        self._netlink(f"remove route {net}", self._route, "del", net, None)

    def set_persistent(self, persistent: bool) -> None:
        """TUNSETPERSIST: keep the device when the fd closes (mainly for tests)."""
        fcntl.ioctl(self._fd, TUNSETPERSIST, int(persistent))

    # --- data path ---------------------------------------------------------

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("TUN device is closed")
        return self._fd

    def read_batch(self, max_packets: int = 64) -> list[bytes]:
        """Read up to `max_packets` packets, stopping early when none is left.

        Returns an empty list when nothing was waiting.
        """
        if self.vnet_hdr:
            return self._read_vnet(max_packets)
        packets: list[bytes] = []
        read, fd = os.read, self._fd
        try:
            for _ in range(max_packets):
                packets.append(read(fd, READ_SIZE))
        except BlockingIOError:
            pass
        return packets

    def _read_vnet(self, max_packets: int) -> list[bytes]:
        """Up to `max_packets` reads; a super-packet gives many packets."""
        packets: list[bytes] = []
        read, fd = os.read, self._fd
        append, packets_of = packets.append, offload.packets_of
        try:
            for _ in range(max_packets):
                data = read(fd, VNET_READ_SIZE)
                if not data[0] and not data[1]:  # no flags, no GSO: a complete packet
                    append(data[VNET_HDR_LEN:])
                    continue
                try:
                    packets.extend(packets_of(data))
                except OffloadError as exc:
                    self.malformed += 1
                    log.debug("TUN %s: %s", self.name, exc)
        except BlockingIOError:
            pass
        return packets

    def write(self, packet: bytes | bytearray | memoryview) -> bool:
        """Inject one IPv4 packet; False if the kernel dropped it.

        Drops (malformed packet, no buffer) are the packet's problem and are
        only reported; errors of the device itself raise OSError.
        """
        try:
            if self.vnet_hdr:
                os.writev(self._fd, (VNET_NONE, packet))
            else:
                os.write(self._fd, packet)
        except OSError as exc:
            if exc.errno in _DROP_ERRNOS:
                return False
            raise
        return True

    def write_gso(self, header: bytes, parts: list[bytes]) -> bool:
        """Inject a coalesced super-packet (`offload.coalesce_tcp4`) in one write."""
        try:
            os.writev(self._fd, [header, *parts])
        except OSError as exc:
            if exc.errno in _DROP_ERRNOS:
                return False
            raise
        return True

    def write_batch(self, packets: Iterable[bytes | bytearray | memoryview]) -> int:
        """Write each packet; return how many the kernel accepted."""
        return sum(1 for p in packets if self.write(p))

    # --- life cycle --------------------------------------------------------

    def _close_here(self) -> None:
        """Close the fd and make sure the device is gone (current namespace)."""
        if self._fd >= 0:
            os.close(self._fd)  # a non-persistent device disappears here
            self._fd = -1
        if self.remove_on_close:
            # A persistent device (TUNSETPERSIST, or one we took over) survives
            # the close: delete it by name so no stale gateway routes remain.
            with IPRoute() as ipr:
                index = _link_index(ipr, self.name)
                if index is not None:
                    with contextlib.suppress(NetlinkError):
                        ipr.link("del", index=index)

    def close(self) -> None:
        """Close the device (idempotent). Tolerates its namespace being gone.

        Remove the fd from any event loop (``remove_reader``) first.
        """
        if self._closing:
            return
        self._closing = True
        try:
            run_in_netns(self.netns, self._close_here)
        except NetnsError:  # namespace deleted: the device went with it
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f" netns={self.netns}" if self.netns else ""
        offloads = f" offloads={self.offloads:#x}" if self.vnet_hdr else ""
        return f"<TunDevice {self.name} index={self.index} mtu={self.mtu}{where}{offloads}>"
