"""The enclave emulator: a SENG client speaking the same protocol as the SENG Runtime/SDK.

It opens tunnel #1 to the gateway's port P with an RA-TLS client certificate, takes the
`IpAssignment`, acknowledges it, opens tunnel #2 to port P+1 from the same host address,
and then brings up a TUN device with the assigned address so that ordinary programs
(curl, ping, nc, iperf3) send their traffic through the gateway:

- with `netns`, the TUN device goes into that (enclave) namespace with a default route
  through it: everything started there uses the tunnel, like code inside an enclave;
- without, it stays in the current namespace and a source-address routing rule sends
  only traffic *from* the assigned address through it (`ping -I ADDR`, `curl
  --interface ADDR`), so several enclaves can share one client host.

The UDP sockets always live in the current (client host) namespace: the gateway admits
enclaves by the client host address their tunnels come from.

With a keepalive (`keepalive=SECONDS`, seng_fw/lab/liveness.py) it notices a gateway that
no longer carries its tunnel (killed, restarted, or the session lost otherwise): no record
for that long, then no answer to a probe within as long again, or an ICMP error on its
sockets that a probe does not disprove. `run()` then tears the TUN device down and raises
EnclaveError; `run_reconnecting` starts over with exponential backoff, so a gateway
restart costs applications only the gap (and a new lease, perhaps another address).

Its RA-TLS certificate comes from a file (lab CA output) or, with `GramineAttestation`, from
Gramine's /dev/attestation interface, so the same client runs inside a real Gramine enclave
on SGX hardware: the key hash goes to `user_report_data`, the DCAP quote comes from `quote`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from seng_fw.lab.ca import ClientPrivateKey, build_ratls_certificate
from seng_fw.lab.dcap import (
    dice_report_data,
    dice_tagged_evidence,
    gramine_claims,
    gramine_extensions,
    gramine_report_data,
)
from seng_fw.lab.liveness import Liveness, is_probe_answer, probe_packet
from seng_fw.system.netns import ip
from seng_fw.tunnel.dtls import (
    ConnectionClosed,
    DtlsClientConfig,
    DtlsClientSession,
    HandshakeComplete,
    RecordReceived,
)
from seng_fw.tunnel.messages import IpAssignment
from seng_fw.tunnel.setup import ClientSetup, SetupFailed
from seng_fw.tunnel.tun import TunDevice
from seng_fw.tunnel.udp_offload import gso_control, gso_runs

log = logging.getLogger("seng_fw.lab.enclave")

SETUP_TIMEOUT = 30.0  # the gateway's own pairing timeout
BATCH = 64
ROUTING_TABLE_BASE = 4200  # policy-routing table = base + TUN ifindex (no netns mode)
# What an ICMP error on a connected UDP socket turns into (port, host, net unreachable).
_ICMP_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})



# The gateway sends an enclave's records in runs with UDP GSO (up to a TSO super-packet,
# ~45 records, at once): the default receive buffer (~208 KiB) overflowed in the data
# path benchmark and lost 10-17% of downlink records.
RECEIVE_BUFFER = 4 << 20
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; not in the socket module of Python 3.11


def _enlarge_receive_buffer(sock: socket.socket) -> None:
    """As large as `RECEIVE_BUFFER`: past net.core.rmem_max with CAP_NET_ADMIN (the lab
    runs as root), else as far as rmem_max allows."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
    except PermissionError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)

class EnclaveError(Exception):
    """The tunnel could not be set up or ended abnormally; the message says why."""


GRAMINE_ATTESTATION_DIR = Path("/dev/attestation")
_GRAMINE_QUOTE_MAX = 8192  # Gramine's SGX_QUOTE_MAX_SIZE


class GramineAttestation:
    """Quotes from Gramine's /dev/attestation pseudo-files (or a directory imitating them)."""

    def __init__(self, base: Path = GRAMINE_ATTESTATION_DIR) -> None:
        self.base = base

    def check_type(self) -> None:
        """Refuse a Gramine without DCAP attestation (attestation_type "none" or "epid")."""
        path = self.base / "attestation_type"
        try:
            kind = path.read_text().strip()
        except FileNotFoundError:
            return  # a minimal imitation of the interface may leave it out
        except OSError as exc:
            raise EnclaveError(f"gramine attestation: cannot read {path}: {exc}") from None
        if kind != "dcap":
            raise EnclaveError(f"gramine attestation type is {kind!r}, not 'dcap'")

    def quote(self, report_data: bytes) -> bytes:
        """Write the 64-byte report data, read the quote that now carries it."""
        if len(report_data) != 64:
            raise ValueError("report data is 64 bytes")
        try:
            # As Gramine's ra_tls_attest.c does: O_WRONLY on the existing pseudo-file.
            fd = os.open(self.base / "user_report_data", os.O_WRONLY)
            try:
                written = os.write(fd, report_data)
            finally:
                os.close(fd)
            if written != len(report_data):
                raise EnclaveError(f"gramine attestation: short write ({written} bytes)")
            with open(self.base / "quote", "rb") as quote_file:
                quote = quote_file.read(_GRAMINE_QUOTE_MAX + 1)
        except OSError as exc:
            raise EnclaveError(f"gramine attestation: {exc}") from None
        if not quote or len(quote) > _GRAMINE_QUOTE_MAX:
            raise EnclaveError(f"gramine attestation: quote of {len(quote)} bytes")
        return quote

    def ratls_certificate(self, key: ClientPrivateKey, *, dice: bool = False) -> bytes:
        """A Gramine-layout RA-TLS certificate (DER) for `key`, as ra_tls_attest.c builds
        it: the legacy quote extension bound to SHA-256 of the SubjectPublicKeyInfo and, with
        `dice`, the TCG DICE evidence whose own quote binds the serialized claims."""
        self.check_type()
        public_key = key.public_key()
        quote = self.quote(gramine_report_data(public_key))
        evidence = None
        if dice:
            claims = gramine_claims(public_key)
            evidence = dice_tagged_evidence(self.quote(dice_report_data(claims)), claims)
        return build_ratls_certificate(key, gramine_extensions(quote, evidence))


@dataclass
class _Tunnel:
    """One DTLS client session over one connected UDP socket.

    With a `sink` (tunnel #2 once the TUN device is up), application data goes straight
    from the socket to it in one loop (`_drain`), without events or the queue: the
    emulator forwards as fast as the gateway (issue 12, lever 4)."""

    sock: socket.socket
    session: DtlsClientSession
    records: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    handshake: asyncio.Future[None] | None = None
    closed_reason: str | None = None
    sink: Callable[[bytes], object] | None = None
    _buffer: bytearray = field(default_factory=lambda: bytearray(65535))
    liveness: Liveness | None = None  # set once the tunnel is up
    icmp_errors: int = 0

    def _socket_error(self, exc: OSError) -> None:
        if exc.errno not in _ICMP_ERRNOS:
            log.debug("socket: %s", exc)
            return
        self.icmp_errors += 1
        why = f"ICMP error on port {self.sock.getpeername()[1]}: {exc.strerror}"
        if self.handshake is not None and not self.handshake.done():
            # Nobody listens there (yet): fail the attempt now, not at the setup timeout.
            self.handshake.set_exception(EnclaveError(f"gateway unreachable: {why}"))
        elif self.liveness is not None:
            if self.liveness.suspicion is None:
                log.warning("%s: probing the gateway", why)
            self.liveness.suspect(why)

    def flush(self) -> None:
        for datagram in self.session.datagrams_to_send():
            try:
                self.sock.send(datagram)
            except OSError as exc:  # e.g. ECONNREFUSED from an earlier ICMP error
                self._socket_error(exc)

    def dispatch(self) -> None:
        for event in self.session.events():
            if isinstance(event, HandshakeComplete):
                if self.handshake is not None and not self.handshake.done():
                    self.handshake.set_result(None)
            elif isinstance(event, RecordReceived):
                if self.liveness is not None:
                    self.liveness.heard(time.monotonic())
                self.records.put_nowait(event.data)
            elif isinstance(event, ConnectionClosed):
                self.closed_reason = f"{event.reason} {event.detail}".strip()
                if self.handshake is not None and not self.handshake.done():
                    self.handshake.set_exception(EnclaveError(f"handshake: {self.closed_reason}"))
                self.records.put_nowait(None)

    def on_readable(self) -> None:
        now = time.monotonic()
        if self.sink is not None:
            self._drain(self.sink, now)
            return
        for _ in range(BATCH):
            try:
                data = self.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._socket_error(exc)
                continue
            self.session.receive_datagram(data, now)
        self.dispatch()
        self.flush()

    def _drain(self, sink: Callable[[bytes], object], now: float) -> None:
        buffer = self._buffer
        view = memoryview(buffer)
        recv_into, receive = self.sock.recv_into, self.session.receive_data
        other = heard = False
        for _ in range(BATCH):
            try:
                n = recv_into(buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._socket_error(exc)
                continue
            payloads = receive(view[:n], now)
            if payloads is None:  # not just data: the session queued events or output
                other = True
                continue
            heard = True
            for payload in payloads:
                sink(payload)
        if heard and self.liveness is not None:
            self.liveness.heard(now)
        if other:
            self.dispatch()
            self.flush()

    def on_timer(self) -> None:
        deadline = self.session.next_timeout()
        if deadline is not None and time.monotonic() >= deadline:
            self.session.handle_timeout(time.monotonic())
            self.dispatch()
            self.flush()

    def send_record(self, data: bytes) -> None:
        self.session.send_record(data)
        self.flush()


class EnclaveClient:
    def __init__(
        self,
        server: tuple[str, int],
        config: DtlsClientConfig,
        *,
        tun_name: str = "seng0",
        netns: str | None = None,
        state_file: Path | None = None,
        keepalive: float | None = None,
    ) -> None:
        self.server = server
        self.config = config
        self.tun_name = tun_name
        self.netns = netns
        self.state_file = state_file
        self.keepalive = keepalive
        self.assignment: IpAssignment | None = None
        self.was_up = False
        self.reconnects = 0  # how many clients ran before this one (run_reconnecting)
        self.liveness: Liveness | None = None
        self.dead_reason: str | None = None
        self._probe_ident = random.getrandbits(16)
        self._probe_seq = 0
        self._tunnels: list[_Tunnel] = []
        self._tun: TunDevice | None = None
        self._rule_table: int | None = None
        self._stop = asyncio.Event()
        self.local: tuple[str, int] | None = None  # our UDP address for tunnel #1
        self._started = 0.0  # when the first datagram left
        self._gso = True  # UDP GSO on the uplink until the kernel refuses it

    def write_state(self, **state: Any) -> None:
        """Progress for scripts and the lab: {"status": connecting|up|refused|down, ...}."""
        if self.state_file is not None:
            state.setdefault("local", self.local)
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(state) + "\n")
            tmp.replace(self.state_file)

    async def _open(self, port: int, local_host: str = "") -> _Tunnel:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        _enlarge_receive_buffer(sock)
        sock.bind((local_host, 0))
        sock.connect((self.server[0], port))
        if self.local is None:
            self.local = sock.getsockname()
            self._started = time.monotonic()
            self.write_state(status="connecting")
        tunnel = _Tunnel(sock, DtlsClientSession(self.config, time.monotonic()))
        tunnel.handshake = loop.create_future()
        self._tunnels.append(tunnel)
        loop.add_reader(sock.fileno(), tunnel.on_readable)
        tunnel.flush()  # the ClientHello
        await tunnel.handshake
        return tunnel

    async def _timers(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            for tunnel in self._tunnels:
                tunnel.on_timer()
            self._check_liveness()

    def _check_liveness(self) -> None:
        liveness, assignment = self.liveness, self.assignment
        if liveness is None or assignment is None or self.dead_reason is not None:
            return
        now = time.monotonic()
        reason = liveness.dead(now)
        if reason is not None:
            self.dead_reason = reason
            log.warning("tunnel dead: %s", reason)
            self._stop.set()
        elif liveness.probe_due(now):
            self._probe_seq += 1
            probe = probe_packet(assignment.ip, self._probe_ident, self._probe_seq)
            with contextlib.suppress(Exception):  # a closed session: dead() decides
                self._tunnels[0].send_record(probe)

    def request_stop(self) -> None:
        """End `run()` normally (SIGTERM, or `run_reconnecting` being stopped)."""
        self._stop.set()

    async def _setup(self) -> tuple[_Tunnel, _Tunnel]:
        uplink = await self._open(self.server[1])
        local_host = uplink.sock.getsockname()[0]
        setup = ClientSetup()
        while setup.assignment is None:
            record = await uplink.records.get()
            if record is None:
                raise EnclaveError(
                    f"gateway closed tunnel #1 before assigning an address ({uplink.closed_reason})"
                )
            for reply in setup.receive_record(record):
                uplink.send_record(reply)
        self.assignment = setup.assignment
        # Later copies of the assignment (resends) are acknowledged in the background.
        asyncio.get_running_loop().create_task(self._acknowledge_resends(uplink, setup))
        downlink = await self._open(self.server[1] + 1, local_host)
        return uplink, downlink

    async def _acknowledge_resends(self, uplink: _Tunnel, setup: ClientSetup) -> None:
        while (record := await uplink.records.get()) is not None:
            try:
                for reply in setup.receive_record(record):
                    uplink.send_record(reply)
            except SetupFailed as failure:
                log.warning("ignoring setup message: %s", failure)
        self._stop.set()

    def _bring_up_tun(self, assignment: IpAssignment) -> TunDevice:
        address = f"{assignment.ip}/32"
        if self.netns is not None:
            return TunDevice.create(
                self.tun_name, addresses=[address], routes=["0.0.0.0/0"], netns=self.netns
            )
        tun = TunDevice.create(self.tun_name, addresses=[address])
        self._rule_table = ROUTING_TABLE_BASE + tun.index
        ip("route", "add", "default", "dev", tun.name, "table", str(self._rule_table))
        ip("rule", "add", "from", str(assignment.ip), "lookup", str(self._rule_table))
        return tun

    def _forward_from_tun(self, uplink: _Tunnel) -> None:
        assert self._tun is not None
        session = uplink.session
        records, limit = session.record_layer, session.max_record
        sealed: list[bytes] = []
        for packet in self._tun.read_batch(BATCH):
            if records is not None and len(packet) <= limit and not records.closed:
                # The common case, sealed here (no queue, no per-record call into the
                # session) and sent with the others of this batch.
                try:
                    sealed.append(records.seal(packet))
                    continue
                except Exception:  # sequence numbers used up: the session decides, below
                    records = None
            self._send_sealed(uplink, sealed)  # in order, before this one
            sealed = []
            try:
                session.send_record(packet)
            except Exception as exc:  # session closed under us: stop forwarding
                log.debug("uplink send: %s", exc)
                break
        self._send_sealed(uplink, sealed)
        uplink.flush()

    def _send_sealed(self, uplink: _Tunnel, sealed: list[bytes]) -> None:
        """Datagrams of one TUN batch, in order: runs of equal sizes in one UDP GSO
        sendmsg each (udp_offload; the gateway's GRO socket then takes them in one
        receive), the rest one by one."""
        if not sealed:
            return
        sock = uplink.sock
        if len(sealed) == 1 or not self._gso:
            for datagram in sealed:
                try:
                    sock.send(datagram)
                except OSError as exc:  # e.g. ECONNREFUSED from an earlier ICMP error
                    uplink._socket_error(exc)
            return
        for first, end in gso_runs([len(datagram) for datagram in sealed]):
            try:
                if end - first == 1:
                    sock.send(sealed[first])
                else:
                    sock.sendmsg([b"".join(sealed[first:end])], gso_control(len(sealed[first])))
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                    self._gso = False  # no UDP GSO here: the rest one by one
                    log.info("no UDP GSO on this host (%s): datagrams sent one by one", exc)
                    self._send_sealed(uplink, sealed[first:])
                    return
                uplink._socket_error(exc)

    def _write_tun(self, packet: bytes) -> None:
        assert self._tun is not None and self.assignment is not None
        if is_probe_answer(packet, self.assignment.ip, self._probe_ident):
            return  # the keepalive's own answer: not for the applications
        try:
            self._tun.write(packet)
        except OSError as exc:
            log.debug("TUN write: %s", exc)

    async def _forward_to_tun(self, downlink: _Tunnel) -> None:
        assert self._tun is not None
        assert self.assignment is not None
        address, ident = self.assignment.ip, self._probe_ident
        while (record := await downlink.records.get()) is not None:
            if is_probe_answer(record, address, ident):
                continue  # the keepalive's own answer: not for the applications
            self._tun.write(record)
        self._stop.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Set up the tunnels and forward until SIGTERM/SIGINT (or `request_stop`); raises
        EnclaveError if the gateway refuses or ends the tunnel, or the tunnel dies."""
        loop = asyncio.get_running_loop()
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._stop.set)
        timers = loop.create_task(self._timers())
        try:
            try:
                uplink, downlink = await asyncio.wait_for(self._setup(), SETUP_TIMEOUT)
            except TimeoutError:
                raise EnclaveError("no tunnel within the setup timeout") from None
            assert self.assignment is not None
            self._tun = self._bring_up_tun(self.assignment)
            self.liveness = Liveness(self.keepalive, time.monotonic())
            uplink.liveness = downlink.liveness = self.liveness
            loop.add_reader(self._tun.fileno(), self._forward_from_tun, uplink)
            downlink.sink = self._write_tun
            to_tun = loop.create_task(self._forward_to_tun(downlink))
            self.write_state(
                status="up",
                address=str(self.assignment.ip),
                netmask=str(self.assignment.netmask),
                gateway=str(self.assignment.gateway),
                tun=self._tun.name,
                # First datagram to a usable address (both tunnels and the TUN up).
                setup_seconds=round(time.monotonic() - self._started, 4),
                up_at=time.time(),
                keepalive=self.keepalive,
                reconnects=self.reconnects,
            )
            self.was_up = True
            log.info("tunnel up: %s via gateway %s", self.assignment.ip, self.assignment.gateway)
            await self._stop.wait()
            to_tun.cancel()
            if self.dead_reason is not None:
                raise EnclaveError(f"tunnel dead: {self.dead_reason}")
            ended_by_gateway = any(t.closed_reason for t in (uplink, downlink))
            if ended_by_gateway:
                reasons = [t.closed_reason for t in (uplink, downlink) if t.closed_reason]
                raise EnclaveError(f"gateway ended the tunnel: {', '.join(reasons)}")
        finally:
            timers.cancel()
            self._close()

    def _close(self) -> None:
        loop = asyncio.get_running_loop()
        for tunnel in self._tunnels:
            tunnel.session.close()  # close_notify, if established
            tunnel.flush()
            loop.remove_reader(tunnel.sock.fileno())
            tunnel.sock.close()
        if self._tun is not None:
            loop.remove_reader(self._tun.fileno())
            if self._rule_table is not None and self.assignment is not None:
                ip("rule", "del", "from", str(self.assignment.ip), "lookup", str(self._rule_table))
            self._tun.close()  # its routes go with it


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff between reconnect attempts, with +-20 % jitter so that the
    enclaves of a restarted gateway do not all come back in the same instant."""

    initial: float = 0.5
    maximum: float = 10.0

    def delay(self, failures: int) -> float:
        """The wait after `failures` attempts in a row that never came up (0: the tunnel
        was up, and died)."""
        base: float = min(self.maximum, self.initial * 2 ** min(failures, 30))
        return base * random.uniform(0.8, 1.2)


async def run_reconnecting(
    new_client: Callable[[], EnclaveClient], backoff: Backoff = Backoff()
) -> None:
    """Run clients one after the other until SIGTERM/SIGINT: whenever one fails (refused,
    ended by the gateway, dead tunnel; its TUN device is gone by then), wait and start a
    new one. Each writes its state file; between them the state is "reconnecting"."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    current: EnclaveClient | None = None

    def stop() -> None:
        stopping.set()
        if current is not None:
            current.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    failures = 0
    reconnects = 0
    while not stopping.is_set():
        current = new_client()
        current.reconnects = reconnects
        try:
            await current.run(handle_signals=False)
            return  # stopped
        except EnclaveError as exc:
            if stopping.is_set():
                return
            failures = 0 if current.was_up else failures + 1
            delay = backoff.delay(failures)
            reconnects += 1
            was = "down" if current.was_up else "refused"
            log.warning("tunnel %s: %s; reconnecting in %.1f s", was, exc, delay)
            current.write_state(
                status="reconnecting", was=was, reason=str(exc), retry_in=round(delay, 3),
                reconnects=reconnects,
            )  # fmt: skip
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay)


def parse_server(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        return str(IPv4Address(host)), int(port)
    except ValueError:
        raise ValueError(f"--server must be IPV4:PORT, got {text!r}") from None
