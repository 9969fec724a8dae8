"""asyncio adapter around `GatewayCore`: two UDP sockets (and one per admitted enclave's
tunnel #1, `peersockets`), the TUN device, timers, conntrack flushes and signals. All
protocol decisions live in the core; all I/O lives here. After every input the adapter
sends the core's datagrams, writes its packets and acts on its events (`_flush`):
peer sockets, the labeller's registry, conntrack flushes (in a worker thread), and the
`event_consumers` the process adds (exposures, metrics), which must not block the loop.

Sockets and the TUN fd are read with `loop.add_reader` and drained in batches per wakeup
(up to `BATCH` datagrams or packets): one event-loop iteration per datagram was about 3x
slower (DESIGN.md section 6).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from ipaddress import IPv4Address, IPv4Interface
from typing import TYPE_CHECKING, Any, Protocol

from seng_fw.gateway.core import (
    AddressReleased,
    EnclaveAdmitted,
    EnclaveEnded,
    GatewayCore,
    GatewayEvent,
    Port,
)
from seng_fw.gateway.counters import Drop, Fault
from seng_fw.gateway.fastpath import FastPath, gso_sender
from seng_fw.gateway.peersockets import PeerSockets, reuse_port
from seng_fw.label.labelling import Labelling
from seng_fw.policy.ipam import EnclaveSubnet
from seng_fw.system import sdnotify
from seng_fw.system.memory import Trimmer
from seng_fw.tunnel.tun import TUN_GONE_ERRNOS, TunDevice

if TYPE_CHECKING:
    from seng_fw.policy.models import Policy

log = logging.getLogger("seng_fw.gateway")

BATCH = 64
MAX_DATAGRAM = 65535
TIMER_TICK = 0.2  # upper bound on the timer sleep: handshake and setup timers are >= 1 s
# The TUN device is gone (`ip link del`) or broken: every read fails at once, forever.
# The gateway stops and exits non-zero for its supervisor to restart it (recreating
# the device and its addresses from the configuration).


class GatewayServer:
    def __init__(
        self,
        core: GatewayCore,
        sockets: dict[Port, socket.socket],
        tun: TunDevice,
        flush_conntrack: Callable[[IPv4Address], int],
        labelling: Labelling | None = None,
        tun_coalesce: bool = True,
    ) -> None:
        self.core = core
        # Shared-subnet mode: the NFQUEUE labeller's registry follows the leases.
        self.labelling = labelling
        self.sockets = sockets
        self.tun = tun
        self._flush_conntrack = flush_conntrack
        self._reload: Callable[[], Awaitable[object]] | None = None
        self._stopping = asyncio.Event()
        self._wake_timers = asyncio.Event()
        # Background work (conntrack flushes, reloads, TUN address changes): kept here
        # so that the tasks are not garbage-collected while they run.
        self._tasks: set[asyncio.Task[None]] = set()
        self._tun_addresses: set[IPv4Interface] = set()
        self._unflushed: list[IPv4Address] = []
        self._tun_lock = asyncio.Lock()
        # Packets of paired enclaves bypass the core (fastpath.py); the rest, and every
        # protocol decision, is the core's.
        downlink = sockets[Port.DOWNLINK]
        self.fastpath = FastPath(
            core,
            tun.fileno(),
            downlink.sendto,
            self._flush,
            tun_lost=lambda exc: self._tun_failed("write", exc),
            # UDP GSO pays only with the long runs of equal records of TSO reads.
            send_gso=gso_sender(downlink) if tun.offloads else None,
            tun_vnet_hdr=tun.vnet_hdr,
            tun_coalesce=tun_coalesce,
        )
        self.peer_sockets = PeerSockets(
            sockets[Port.SETUP], self.fastpath.drain_uplink, core.counters
        )
        # Started once sockets and TUN are up, closed first at shutdown (control socket,
        # metrics endpoint).
        self.services: list[Service] = []
        # Why the gateway stopped on its own (None: a signal asked it to).
        self.failure: str | None = None
        # Returns the heap of dropped DTLS sessions to the kernel (system/memory.py).
        self.trimmer = Trimmer()
        # Told every core event after the adapter's own handling, on the event loop:
        # anything slow goes to a worker thread (`spawn`).
        self.event_consumers: list[Callable[[GatewayEvent], None]] = []

    # ----- event handlers ------------------------------------------------------------

    def _on_datagrams(self, port: Port, sock: socket.socket) -> None:
        now = time.monotonic()
        for _ in range(BATCH):
            try:
                data, address = sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. ICMP port unreachable reported on the socket
                log.debug("recvfrom on %s: %s", port.name, exc)
                continue
            try:
                self.core.datagram_received(port, address, data, now)
            except Exception:
                # One bad datagram must never stop the server from serving everyone else.
                self.core.counters.faults[Fault.INTERNAL_ERROR_DATAGRAM] += 1
                log.exception("internal error on a datagram from %s:%d", *address)
        self._flush()

    def _on_tun_readable(self) -> None:
        try:
            batch = self.tun.read_batch(BATCH)
        except OSError as exc:
            if exc.errno in TUN_GONE_ERRNOS:
                self._tun_failed("read", exc)
            else:
                self.core.counters.faults[Fault.TUN_READ_ERROR] += 1
                log.error("TUN read failed: %s", exc)
            return
        if self.tun.malformed:  # reads the offload code could not make into packets
            self.core.counters.dropped[Drop.TUN_NOT_IPV4] += self.tun.malformed
            self.tun.malformed = 0
        if batch:
            self.fastpath.tun_packets(batch)

    def _flush(self) -> None:
        core = self.core
        for port, address, datagram in core.datagrams_to_send():
            try:
                self.sockets[port].sendto(datagram, address)
            except OSError:
                core.counters.dropped[Drop.SEND_ERROR] += 1
        for packet in core.packets_for_tun():
            try:
                written = self.tun.write(packet)
            except OSError as exc:
                written = False
                if exc.errno in TUN_GONE_ERRNOS:
                    self._tun_failed("write", exc)
            if not written:
                core.counters.dropped[Drop.TUN_WRITE_ERROR] += 1
        for event in core.events():
            self._handle_event(event)

    def _handle_event(self, event: GatewayEvent) -> None:
        if isinstance(event, EnclaveAdmitted):
            self.peer_sockets.open(event.enclave)
            if self.labelling is not None:
                self.labelling.admitted(event.enclave)
        elif isinstance(event, EnclaveEnded):
            self.fastpath.forget(event.enclave)
            self.peer_sockets.close_for(event.enclave)
            if self.labelling is not None:
                # Before the address's conntrack flush (its AddressReleased comes next),
                # so no new connection can pick up the old label.
                self.labelling.released(event.enclave.address)
        elif isinstance(event, AddressReleased):
            if self._stopping.is_set():
                self._unflushed.append(event.address)  # flushed before the process ends
            else:
                self._spawn(self._flush_address(event.address))
        for consumer in self.event_consumers:
            try:
                consumer(event)
            except Exception:
                log.exception("internal error handling %s", type(event).__name__)

    async def _flush_address(self, address: IPv4Address) -> None:
        """Delete the conntrack entries of a released address, then free it for leasing."""
        loop = asyncio.get_running_loop()
        delay = 0.5
        while True:
            try:
                deleted = await loop.run_in_executor(None, self._flush_conntrack, address)
            except Exception as exc:
                # Fail closed: the address stays quarantined until a flush succeeds.
                log.error(
                    "conntrack flush of %s failed (%s); retrying in %.1fs", address, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            self.core.address_flushed(address)
            log.info("conntrack: deleted %d entries of %s; address free", deleted, address)
            return

    async def _timers(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            deadline = self.core.next_timeout()
            delay = TIMER_TICK if deadline is None else min(TIMER_TICK, max(0.0, deadline - now))
            await asyncio.sleep(delay)
            now = time.monotonic()
            # One failing pass must not end the task: without it no idle, pairing or
            # handshake timeout would ever fire again while the watchdog still says "up".
            try:
                self.core.handle_timers(now)
                self._flush()
                self.trimmer.maybe_trim(self.core.sessions_released, now)
            except Exception:
                self.core.counters.faults[Fault.INTERNAL_ERROR_TIMERS] += 1
                log.exception("internal error in a timer pass (counted; the gateway goes on)")

    # ----- lifecycle -----------------------------------------------------------------

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run background work on the loop, kept referenced until it ends."""
        self._spawn(coroutine)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stop(self) -> None:
        self._stopping.set()

    def _tun_failed(self, what: str, exc: OSError) -> None:
        """The TUN device is gone: stop reading it (a level-triggered reader on a dead
        fd spins the loop), admit no one, and stop; `failure` says why."""
        if self.failure is not None:
            return
        self.failure = f"TUN device {self.tun.name} lost ({what}: {exc.strerror})"
        self.core.counters.faults[Fault.TUN_LOST] += 1
        log.error("%s: stopping, to be restarted", self.failure)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(self.tun.fileno())
        for sock in self.sockets.values():  # no new handshakes meanwhile
            loop.remove_reader(sock.fileno())
        self.stop()

    def set_reload(self, reload: Callable[[], Awaitable[object]]) -> None:
        """What SIGHUP runs: `GatewayService.reload_on_signal` (loads the policy off the
        loop, applies it and logs the outcome)."""
        self._reload = reload

    def reload(self) -> None:
        if self._reload is None:
            return
        self._spawn(self._reload_logged(self._reload))

    async def _reload_logged(self, reload: Callable[[], Awaitable[object]]) -> None:
        try:
            await reload()
        except Exception:
            log.exception("internal error in a policy reload")

    def after_change(self) -> None:
        """After tunnels were closed or subnets changed outside a datagram (reload,
        revoke): send the queued alerts, start conntrack flushes, sync the TUN device."""
        self._spawn(self._sync_tun())
        if self.labelling is not None:
            policy = self.core.admission.policy
            self.labelling.policy_changed(policy, policy.host_prefixes())
        self._flush()

    def describe(self) -> str:
        ports = "/".join(str(sock.getsockname()[1]) for sock in self.sockets.values())
        address = next(iter(self.sockets.values())).getsockname()[0]
        subnets = ", ".join(str(subnet.network) for subnet in self.core.enclave_subnets())
        return f"{address}:{ports}, TUN {self.tun.name} ({subnets})"

    # ----- the gateway's address in each enclave subnet, on the TUN device ------------
    # (routes follow). 10,000 subnets take the kernel 15-30 s to add: after start-up the
    # changes are made from a worker thread, so tunnels keep flowing meanwhile.

    def _wanted_addresses(self, extra: Iterable[EnclaveSubnet] = ()) -> set[IPv4Interface]:
        return {subnet.gateway_interface for subnet in (*self.core.enclave_subnets(), *extra)}

    def sync_tun_addresses(self) -> None:
        """At start-up, before any enclave is admitted."""
        wanted = self._wanted_addresses()
        self.tun.change_addresses(wanted - self._tun_addresses, self._tun_addresses - wanted)
        self._tun_addresses = wanted

    async def prepare_subnets(self, policy: Policy) -> None:
        """Before a new policy takes effect: add its new subnets' addresses, so that no
        enclave is leased an address in a subnet the TUN device does not route yet."""
        await self._sync_tun([subnet.to_ipam() for subnet in policy.enclave_subnets()])

    async def _sync_tun(self, new_subnets: Sequence[EnclaveSubnet] = ()) -> None:
        """Bring the TUN addresses in line with the address pools (with `new_subnets`:
        only add theirs). One change at a time, each against the latest state."""
        async with self._tun_lock:
            wanted = self._wanted_addresses(new_subnets)
            add = wanted - self._tun_addresses
            remove = set() if new_subnets else self._tun_addresses - wanted
            if add or remove:
                try:
                    await asyncio.to_thread(self.tun.change_addresses, add, remove)
                except Exception as exc:
                    log.error("TUN addresses not changed (%d+/%d-): %s", len(add), len(remove), exc)
                    return
            self._tun_addresses = (self._tun_addresses | add) - remove

    async def run(self) -> None:
        """Serve until `stop()` (SIGTERM/SIGINT); SIGHUP reloads the admission policy."""
        loop = asyncio.get_running_loop()
        for port, sock in self.sockets.items():
            loop.add_reader(sock.fileno(), self._on_datagrams, port, sock)
        loop.add_reader(self.tun.fileno(), self._on_tun_readable)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if self.labelling is not None:
            await self.labelling.start()
            log.info("labeller: %s", self.labelling.status())
        for service in self.services:
            await service.start()
        timers = loop.create_task(self._timers())
        watchdog = loop.create_task(sdnotify.watchdog_loop())
        log.info("listening on %s", self.describe())
        sdnotify.ready(f"listening on {self.describe()}")
        try:
            await self._stopping.wait()
        finally:
            sdnotify.stopping()
            timers.cancel()
            watchdog.cancel()
            for service in self.services:
                await service.close()
            for sock in self.sockets.values():
                loop.remove_reader(sock.fileno())
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(self.tun.fileno())
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            self._shutdown()
            if self.labelling is not None:
                # The queue rules stay: new shared-subnet connections are dropped, not
                # passed unlabelled, until a labeller runs again (fail closed).
                await self.labelling.stop()

    def _shutdown(self) -> None:
        self._stopping.set()
        self.core.shutdown(time.monotonic())
        self._flush()  # sends the close_notify alerts
        self.peer_sockets.close()
        for task in self._tasks:
            task.cancel()
        for address in self._unflushed:
            try:
                self._flush_conntrack(address)
            except Exception as exc:
                log.warning("conntrack flush of %s at shutdown failed: %s", address, exc)
        self.tun.close()
        for sock in self.sockets.values():
            sock.close()
        counters = self.core.counters.flat()
        log.info(
            "gateway stopped: %s", " ".join(f"{k}={v}" for k, v in sorted(counters.items())),
            extra={"event": "stopped", "counters": counters},
        )  # fmt: skip


class Service(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...


def bind_udp(address: IPv4Address, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        reuse_port(sock)  # the enclaves' own sockets share the port (peersockets)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.setblocking(False)
        sock.bind((str(address), port))
    except BaseException:
        sock.close()  # e.g. the port is taken
        raise
    return sock
