"""The gateway's protocol core, free of I/O (sans-I/O, like h11 and aioquic).

Inputs: datagrams received on the two SENG ports, packets read from the TUN device, the
passage of time, policy reloads. Outputs, drained by the asyncio adapter: datagrams to
send, packets to write to the TUN device, and events (`events()`): what happened, for
the adapter to act on (peer sockets, the labeller's registry, exposures, metrics) and
released addresses whose conntrack entries must be deleted before the address may be
leased again. Nothing here does I/O or calls out while it handles an input.

One enclave = tunnel #1 (port P: enclave -> gateway packets and the setup exchange) and
tunnel #2 (port P+1: gateway -> enclave packets), paired by client host address and
identical attestation evidence.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from seng_fw.attest.identity import AttestationRejected, EnclaveIdentity, EvidenceVerifier
from seng_fw.gateway.config import TimeoutConfig
from seng_fw.gateway.counters import (
    Drop,
    EndKind,
    EndReason,
    GatewayCounters,
    Limit,
    PeerClosed,
    Refusal,
    RejectReason,
    Revoked,
    Traffic,
)
from seng_fw.gateway.handshakes import HalfOpenHandshakes, HandshakeQueue
from seng_fw.gateway.limits import LimitsConfig, TunnelCounts
from seng_fw.policy.admission import Admission, AdmissionRejected
from seng_fw.policy.ipam import EnclaveSubnet, Ipam, LeaseStore, PoolExhausted
from seng_fw.policy.models import App
from seng_fw.tunnel import packets
from seng_fw.tunnel.dtls import (
    ConnectionClosed,
    DtlsEvent,
    DtlsServerConfig,
    DtlsServerSession,
    HandshakeComplete,
    ReconnectRequested,
    RecordReceived,
    peer_id,
)
from seng_fw.tunnel.messages import IpAssignment
from seng_fw.tunnel.setup import ServerSetup, ServerSetupState, SetupFailed

log = logging.getLogger("seng_fw.gateway")

Address = tuple[str, int]  # a UDP peer (host, port)


class Port(enum.IntEnum):
    SETUP = 0  # tunnel #1, UDP port P
    DOWNLINK = 1  # tunnel #2, UDP port P + 1


@dataclass(eq=False)
class Enclave:
    """An admitted enclave and its tunnels; identity equality is by object."""

    identity: EnclaveIdentity
    app: App
    host: IPv4Address
    address: IPv4Address
    uplink_peer: Address
    uplink: DtlsServerSession
    setup: ServerSetup
    pairing_deadline: float
    admitted_at: float
    last_activity: float
    downlink_peer: Address | None = None
    downlink: DtlsServerSession | None = None
    traffic: Traffic = field(default_factory=Traffic)

    @property
    def address_bytes(self) -> bytes:
        return self.address.packed

    def describe(self) -> str:
        return (
            f"app={self.app.name} address={self.address} host={self.host} "
            f"mrenclave={self.identity.mrenclave.hex()[:16]}"
        )

    def log_fields(self, event: str, **more: object) -> dict[str, object]:
        """`extra=` of a log line about this enclave: fields of the JSON logs."""
        return {
            "event": event,
            "app": self.app.name,
            "enclave": self.identity.mrenclave.hex(),
            "address": str(self.address),
            "host": str(self.host),
            **more,
        }


@dataclass(eq=False)
class Peer:
    """One DTLS session on one port, before or after it belongs to an enclave."""

    port: Port
    address: Address
    session: DtlsServerSession
    created: float
    enclave: Enclave | None = None
    # A new handshake from the same address (the peer restarted, or a replayed hello):
    # it replaces `session` only once it completes.
    candidate: DtlsServerSession | None = None


# ----- events: what happened, drained by the adapter (in order) ------------------------


@dataclass(frozen=True, eq=False)
class EnclaveAdmitted:
    """An enclave was admitted and leased `enclave.address` (tunnel #2 may follow)."""

    enclave: Enclave


@dataclass(frozen=True, eq=False)
class EnclaveEnded:
    """An enclave's tunnels were closed; its address no longer belongs to it."""

    enclave: Enclave
    reason: EndReason


@dataclass(frozen=True)
class AddressReleased:
    """A released address: delete its conntrack entries, then call `address_flushed()`.
    Always after the `EnclaveEnded` of its enclave."""

    address: IPv4Address


@dataclass(frozen=True)
class HandshakeCompleted:
    """A DTLS handshake ended (before attestation): seconds since the peer's first
    datagram that passed the cookie check."""

    port: Port
    seconds: float


GatewayEvent = EnclaveAdmitted | EnclaveEnded | AddressReleased | HandshakeCompleted


class GatewayCore:
    def __init__(
        self,
        admission: Admission,
        verifier: EvidenceVerifier,
        dtls: dict[Port, DtlsServerConfig],
        timeouts: TimeoutConfig,
        limits: LimitsConfig | None = None,
        leases: LeaseStore[str] | None = None,
    ) -> None:
        self.admission = admission
        self.verifier = verifier
        self.timeouts = timeouts
        self._dtls = dtls
        # Lease owners are app names (for status); the data path looks enclaves up by
        # packed address in `_enclave_by_address`, one dict probe per packet.
        self.ipam: LeaseStore[str] = (
            leases if leases is not None else Ipam(_ipam_subnets(admission))
        )
        self.counters = GatewayCounters()
        self._peers: dict[tuple[Port, Address], Peer] = {}
        self._enclave_by_address: dict[bytes, Enclave] = {}
        # Enclaves whose tunnel #2 has not arrived yet, by (client host, identity).
        self._pending: dict[tuple[IPv4Address, EnclaveIdentity], Enclave] = {}
        self._outgoing: list[tuple[Port, Address, bytes]] = []
        self._to_tun: list[bytes] = []
        self._events: list[GatewayEvent] = []
        # Sessions past the cookie check that have not completed (seng_fw.gateway.handshakes).
        self.limits = limits = limits or LimitsConfig()
        self.handshakes: HalfOpenHandshakes[tuple[Port, Address]] = HalfOpenHandshakes(
            limits.handshakes(), self.counters
        )
        # Cookie-checked hellos waiting for one of `max_handshakes_in_progress` slots.
        self.waiting: HandshakeQueue[tuple[Port, Address]] = HandshakeQueue(
            limits.handshakes(), self.counters
        )
        self.tunnel_counts = TunnelCounts(limits, self.counters)
        # DTLS sessions dropped so far (the adapter returns freed memory to the OS).
        self.sessions_released = 0

    # ----- outputs -------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[Port, Address, bytes]]:
        out, self._outgoing = self._outgoing, []
        return out

    def packets_for_tun(self) -> list[bytes]:
        out, self._to_tun = self._to_tun, []
        return out

    def events(self) -> list[GatewayEvent]:
        """What happened since the last call, in order."""
        out, self._events = self._events, []
        return out

    def address_flushed(self, address: IPv4Address) -> None:
        self.ipam.confirm_flushed(address)

    @property
    def enclaves(self) -> list[Enclave]:
        return list(self._enclave_by_address.values())

    def enclave_subnets(self) -> list[EnclaveSubnet]:
        return [pool.subnet for pool in self.ipam.pools()]

    # ----- inputs --------------------------------------------------------------------

    def datagram_received(self, port: Port, address: Address, data: bytes, now: float) -> None:
        if len(data) > self.limits.max_datagram:
            self.counters.limits[Limit.MAX_DATAGRAM] += 1
            return
        peer = self._peers.get((port, address))
        if peer is None:
            # Datagrams from unknown addresses pass a stateless cookie check first, so
            # spoofed floods cost no per-peer state (RFC 6347 4.2.1).
            if self.handshakes.throttled(address[0], now):
                return  # over its handshake rate (counted): not even a cookie check
            cookie_id = peer_id(address)
            verdict = self._dtls[port].cookie_gate.check(data, cookie_id)
            if not verdict.accepted:
                if verdict.reply is not None:
                    self._outgoing.append((port, address, verdict.reply))
                else:
                    self.counters.dropped[Drop.NOT_CLIENT_HELLO] += 1
                return
            key = (port, address)
            if key in self.waiting:
                self.waiting.refresh(key, data)  # a retransmission: keeps its place
                return
            if not self.handshakes.may_start(address[0], now):
                return  # rate-limited (counted): the client retries with a new cookie
            if self.waiting or len(self.handshakes) >= self.handshakes.limits.max_active:
                # Work-conserving: the handshakes under way finish first (FIFO).
                # Tunnels #2 first: their enclaves are admitted and waiting to pair.
                first = self._awaits_pairing(port, address)
                self.waiting.add(key, address[0], data, now, first=first)
                return
            peer = self._start_handshake(port, address, now)
        elif peer.candidate is not None:
            # A reconnect handshake is under way from this address: it sees every
            # datagram too (each session silently drops what is not its own epoch/keys).
            peer.candidate.receive_datagram(data, now)
            self._candidate_events(peer, now)
        peer.session.receive_datagram(data, now)
        self._handle_events(peer, peer.session.events(), now)
        self._collect(peer)
        if self.waiting:
            self._start_waiting(now)

    def _awaits_pairing(self, port: Port, address: Address) -> bool:
        """A tunnel #2 hello from a host with an admitted enclave waiting for it: it goes
        ahead in the queue (only then: the port alone is the sender's choice)."""
        if port is not Port.DOWNLINK:
            return False
        host = IPv4Address(address[0])
        return any(pending_host == host for pending_host, _ in self._pending)

    def _start_handshake(self, port: Port, address: Address, now: float) -> Peer:
        session = DtlsServerSession(self._dtls[port], peer_id(address), now)
        peer = self._peers[(port, address)] = Peer(port, address, session, now)
        for key in self.handshakes.started((port, address), address[0], now):
            self._drop_half_open(key)
        return peer

    def _start_waiting(self, now: float) -> None:
        """Start waiting handshakes while slots are free (after every input)."""
        waiting, handshakes = self.waiting, self.handshakes
        while waiting:
            if len(handshakes) >= handshakes.limits.max_active:
                stalled = handshakes.stalled(now, self._has_client_certificate)
                if stalled is None:
                    return
                self._drop_half_open(stalled)  # its slot goes to the oldest waiting hello
            popped = waiting.pop(now, lambda source: not handshakes.at_source_cap(source))
            if popped is None:
                return
            (port, address), hello = popped
            if (port, address) in self._peers:
                continue  # cannot happen (a waiting peer has no session); be safe
            peer = self._start_handshake(port, address, now)
            peer.session.receive_datagram(hello, now)
            self._handle_events(peer, peer.session.events(), now)
            self._collect(peer)

    def enclave_at(self, address: bytes) -> Enclave | None:
        """The enclave leased this packed address, if any (the fast path's lookup)."""
        return self._enclave_by_address.get(address)

    def session_activity(self, port: Port, address: Address, now: float) -> None:
        """The fast path fed a datagram to a peer's session itself and the session did
        more than decrypt data (`DtlsServerSession.receive_data` returned None): handle
        its events and output as `datagram_received` would have."""
        peer = self._peers.get((port, address))
        if peer is None:
            return
        self._handle_events(peer, peer.session.events(), now)
        self._collect(peer)
        if self.waiting:
            self._start_waiting(now)

    def tun_packets(self, batch: list[bytes], now: float) -> None:
        """Packets read from the TUN device: each goes to the enclave owning its destination."""
        by_address = self._enclave_by_address
        for packet in batch:
            if not packets.is_ipv4(packet):
                self.counters.dropped[Drop.TUN_NOT_IPV4] += 1
                continue
            enclave = by_address.get(packets.destination(packet))
            if enclave is None or enclave.downlink is None:
                self.counters.dropped[Drop.NO_ENCLAVE] += 1
                continue
            enclave.downlink.send_record(packet)
            enclave.traffic.packets_out += 1
            enclave.traffic.bytes_out += len(packet)
            assert enclave.downlink_peer is not None
            self._queue_datagrams(Port.DOWNLINK, enclave.downlink_peer, enclave.downlink)

    def handle_timers(self, now: float) -> None:
        for peer in list(self._peers.values()):
            deadline = peer.session.next_timeout()
            if deadline is not None and now >= deadline:
                peer.session.handle_timeout(now)
                self._handle_events(peer, peer.session.events(), now)
                self._collect(peer)
            if peer.candidate is not None and now >= (peer.candidate.next_timeout() or now + 1):
                peer.candidate.handle_timeout(now)
                self._candidate_events(peer, now)
        for key in self.handshakes.expired(now, self._has_client_certificate):
            self._drop_half_open(key)
        for enclave in list(self._enclave_by_address.values()):
            if enclave.downlink is None and now >= enclave.pairing_deadline:
                self._end_enclave(enclave, EndKind.PAIRING_TIMEOUT, now)
            elif now - enclave.last_activity >= self.timeouts.idle:
                self._end_enclave(enclave, EndKind.IDLE_TIMEOUT, now)
            else:
                self._send_setup(enclave, now)
        self._start_waiting(now)

    def next_timeout(self) -> float | None:
        deadlines = [d for p in self._peers.values() if (d := p.session.next_timeout()) is not None]
        if (half_open := self.handshakes.next_deadline()) is not None:
            deadlines.append(half_open)
        if self.waiting and (stall := self.handshakes.stall_deadline()) is not None:
            deadlines.append(stall)  # a stalled handshake's slot goes to a waiting hello
        for enclave in self._enclave_by_address.values():
            deadlines.append(enclave.last_activity + self.timeouts.idle)
            if enclave.downlink is None:
                deadlines.append(enclave.pairing_deadline)
            if (resend := enclave.setup.next_timeout()) is not None:
                deadlines.append(resend)
        return min(deadlines, default=None)

    def reload(self, admission: Admission, now: float, cause: str = "policy reload") -> None:
        """A new policy: enclaves it no longer admits (or whose subnet moved) are closed.
        `cause` names why in the log: a policy reload, or an operator's revocation."""
        self.admission = admission
        for enclave in list(self._enclave_by_address.values()):
            try:
                app = admission.admit(enclave.identity, enclave.host)
            except AdmissionRejected as refusal:
                log.info(
                    "%s: closing %s: %s", cause, enclave.describe(), refusal,
                    extra=enclave.log_fields(cause.replace(" ", "_"), check=str(refusal.check)),
                )  # fmt: skip
                self._end_enclave(enclave, Revoked(refusal.check), now)
                continue
            new_subnet = admission.policy.subnet_of(app)
            if enclave.address not in new_subnet.subnet:
                self._end_enclave(enclave, Revoked("subnet_changed"), now)
            else:
                enclave.app = app
        wanted = {s.network: s for s in _ipam_subnets(admission)}
        for pool in list(self.ipam.pools()):
            if wanted.get(pool.network) != pool.subnet and not pool.leases and not pool.quarantined:
                self.ipam.remove_subnet(pool.network)
        existing = {pool.network for pool in self.ipam.pools()}
        for network, subnet in wanted.items():
            if network not in existing:
                self.ipam.add_subnet(subnet)

    def revoke(self, matches: Callable[[Enclave], bool], reason: EndReason, now: float) -> int:
        """Close the tunnels of every enclave `matches` selects; returns how many."""
        chosen = [enclave for enclave in self._enclave_by_address.values() if matches(enclave)]
        for enclave in chosen:
            self._end_enclave(enclave, reason, now)
        return len(chosen)

    def shutdown(self, now: float) -> None:
        """Close every tunnel with close_notify (the adapter then sends what is queued)."""
        for enclave in list(self._enclave_by_address.values()):
            self._end_enclave(enclave, EndKind.SHUTDOWN, now)
        for peer in list(self._peers.values()):
            peer.session.close()
            self._collect(peer)
            self._forget(peer)

    # ----- internals -----------------------------------------------------------------

    def _collect(self, peer: Peer) -> None:
        self._queue_datagrams(peer.port, peer.address, peer.session)
        if peer.session.closed and self._peers.get((peer.port, peer.address)) is peer:
            self._forget(peer)

    def _queue_datagrams(self, port: Port, address: Address, session: DtlsServerSession) -> None:
        for datagram in session.datagrams_to_send():
            self._outgoing.append((port, address, datagram))

    def _forget(self, peer: Peer) -> None:
        key = (peer.port, peer.address)
        self.handshakes.discard(key)
        if self._peers.pop(key, None) is not None:
            self.sessions_released += 1

    def _has_client_certificate(self, key: tuple[Port, Address]) -> bool:
        peer = self._peers.get(key)
        return peer is not None and peer.session.client_certificate_received

    def _drop_half_open(self, key: tuple[Port, Address]) -> None:
        """Evicted or timed out before completing: forgotten without an alert."""
        peer = self._peers.get(key)
        if peer is not None and peer.enclave is None and not peer.session.established:
            self._forget(peer)

    def _handle_events(self, peer: Peer, events: list[DtlsEvent], now: float) -> None:
        for event in events:
            if isinstance(event, RecordReceived):
                self._record(peer, event.data, now)
            elif isinstance(event, HandshakeComplete):
                self._handshake_complete(peer, event.peer_cert_der, now)
            elif isinstance(event, ConnectionClosed):
                self.counters.closed[event.reason] += 1
                if peer.enclave is not None:
                    self._end_enclave(peer.enclave, PeerClosed(event.reason), now)
            elif isinstance(event, ReconnectRequested) and peer.candidate is None:
                self.counters.reconnect_attempts += 1
                peer.candidate = DtlsServerSession(
                    self._dtls[peer.port], peer_id(peer.address), now
                )
                peer.candidate.receive_datagram(event.client_hello, now)
                self._candidate_events(peer, now)

    def _candidate_events(self, peer: Peer, now: float) -> None:
        """Drive a reconnect handshake; on success it replaces the old session."""
        candidate = peer.candidate
        assert candidate is not None
        self._queue_datagrams(peer.port, peer.address, candidate)
        for event in candidate.events():
            if isinstance(event, ConnectionClosed):
                peer.candidate = None  # e.g. a replayed hello: the old session carries on
                self.counters.reconnect_failed[event.reason] += 1
            elif isinstance(event, HandshakeComplete):
                peer.candidate = None
                if peer.enclave is not None:
                    self._end_enclave(peer.enclave, EndKind.RECONNECTED, now)
                else:
                    peer.session.close()
                    self._queue_datagrams(peer.port, peer.address, peer.session)
                peer.session, peer.enclave, peer.created = candidate, None, now
                self._peers[(peer.port, peer.address)] = peer
                self._handshake_complete(peer, event.peer_cert_der, now)

    def _attest(self, peer: Peer, cert_der: bytes) -> EnclaveIdentity | None:
        host = IPv4Address(peer.address[0])
        try:
            return self.verifier.verify_certificate(cert_der)
        except AttestationRejected as rejection:
            self._refuse(peer, rejection.check, str(rejection), host)
            return None

    def _refuse(self, peer: Peer, check: RejectReason, reason: str, host: IPv4Address) -> None:
        self.counters.rejected[check] += 1
        log.warning(
            "rejected host=%s port=%d: %s", host, peer.address[1], reason,
            extra={"event": "rejected", "host": str(host), "check": str(check)},
        )  # fmt: skip
        peer.session.close()

    def _handshake_complete(self, peer: Peer, cert_der: bytes, now: float) -> None:
        self.handshakes.discard((peer.port, peer.address))
        self._events.append(HandshakeCompleted(peer.port, now - peer.created))
        identity = self._attest(peer, cert_der)
        if identity is None:
            return
        host = IPv4Address(peer.address[0])
        if peer.port is Port.DOWNLINK:
            self._pair_downlink(peer, identity, host, now)
            return
        try:
            app = self.admission.admit(identity, host)
        except AdmissionRejected as refusal:
            self._refuse(peer, refusal.check, str(refusal), host)
            return
        subnet = self.admission.policy.subnet_of(app)
        if (host, identity) in self._pending:
            # The same enclave retried before pairing: the old attempt is abandoned.
            self._end_enclave(self._pending[(host, identity)], EndKind.SUPERSEDED, now)
        if (limit := self.tunnel_counts.refusal(host)) is not None:
            self._refuse(peer, *limit, host)
            return
        try:
            address = self.ipam.lease(subnet.subnet, app.name)
        except PoolExhausted:
            self._refuse(peer, Refusal.POOL_EXHAUSTED, f"no free address in {subnet.subnet}", host)
            return
        assignment = IpAssignment(address, subnet.subnet.netmask, subnet.gateway_address)
        enclave = Enclave(
            identity=identity,
            app=app,
            host=host,
            address=address,
            uplink_peer=peer.address,
            uplink=peer.session,
            setup=ServerSetup(
                assignment,
                now,
                self.timeouts.assignment_resend,
                self.timeouts.assignment_attempts,
            ),
            pairing_deadline=now + self.timeouts.pairing,
            admitted_at=now,
            last_activity=now,
        )
        peer.enclave = enclave
        self._enclave_by_address[address.packed] = enclave
        self._pending[(host, identity)] = enclave
        self.counters.admitted += 1
        self.tunnel_counts.admitted(host)
        self._events.append(EnclaveAdmitted(enclave))
        log.info(
            "admitted %s quote_status=%s", enclave.describe(), identity.quote_status,
            extra=enclave.log_fields("admitted", quote_status=identity.quote_status),
        )  # fmt: skip
        log.info(
            "leased %s to app=%s host=%s", address, app.name, host,
            extra=enclave.log_fields("leased"),
        )  # fmt: skip
        self._send_setup(enclave, now)

    def _pair_downlink(
        self, peer: Peer, identity: EnclaveIdentity, host: IPv4Address, now: float
    ) -> None:
        enclave = self._pending.pop((host, identity), None)
        if enclave is None:
            message = "tunnel #2 matches no pending tunnel #1"
            self._refuse(peer, Refusal.UNPAIRED_DOWNLINK, message, host)
            return
        enclave.downlink, enclave.downlink_peer = peer.session, peer.address
        enclave.setup.acknowledge_implicitly()
        enclave.last_activity = now
        peer.enclave = enclave
        log.info("tunnels paired %s", enclave.describe(), extra=enclave.log_fields("paired"))

    def _send_setup(self, enclave: Enclave, now: float) -> None:
        try:
            records = enclave.setup.records_due(now)
        except SetupFailed as failure:
            self._end_enclave(enclave, failure.check, now)
            return
        for record in records:
            enclave.uplink.send_record(record)
        if records:
            self._queue_datagrams(Port.SETUP, enclave.uplink_peer, enclave.uplink)

    def _record(self, peer: Peer, data: bytes, now: float) -> None:
        enclave = peer.enclave
        if enclave is None:
            return  # a record before admission finished: nothing to do with it
        if peer.port is Port.DOWNLINK:
            self.counters.dropped[Drop.DOWNLINK_RECORD] += 1  # SENG clients send nothing on #2
            return
        if not packets.is_ipv4(data):
            if enclave.setup.state is ServerSetupState.AWAITING_ACK:
                try:
                    enclave.setup.receive_ack(data)
                except SetupFailed as failure:
                    self._end_enclave(enclave, failure.check, now)
                return
            self.counters.dropped[Drop.NOT_IPV4] += 1
            return
        if packets.source(data) != enclave.address_bytes:
            self.counters.dropped[Drop.SPOOFED] += 1
            enclave.traffic.dropped_spoofed += 1
            return
        if packets.has_options(data) and self.limits.ip_options == "drop":
            # IP options (source routes, record route, timestamps, router alert) are
            # not forwarded: applications behind SENG never need them, and they are a
            # way around the firewall's view of a packet. Dropped, not stripped (that
            # would rewrite every such header on the data path), and counted.
            self.counters.dropped[Drop.IP_OPTIONS] += 1
            return
        enclave.setup.acknowledge_implicitly()
        enclave.last_activity = now
        enclave.traffic.packets_in += 1
        enclave.traffic.bytes_in += len(data)
        self._to_tun.append(data)

    def _end_enclave(self, enclave: Enclave, reason: EndReason, now: float) -> None:
        if self._enclave_by_address.get(enclave.address_bytes) is not enclave:
            return  # already ended
        del self._enclave_by_address[enclave.address_bytes]
        self.tunnel_counts.ended(enclave.host)
        self._pending.pop((enclave.host, enclave.identity), None)
        for port, peer_address, session in (
            (Port.SETUP, enclave.uplink_peer, enclave.uplink),
            (Port.DOWNLINK, enclave.downlink_peer, enclave.downlink),
        ):
            if session is None or peer_address is None:
                continue
            session.close()
            self._queue_datagrams(port, peer_address, session)
            peer = self._peers.get((port, peer_address))
            if peer is not None and peer.session is session:
                self._forget(peer)
        released = self.ipam.release(enclave.address)
        # Per-app totals outlive the enclave, so status and metrics never go back.
        self.counters.ended_traffic.setdefault(enclave.app.name, Traffic()).add(enclave.traffic)
        # The labeller forgets the address before its conntrack entries go (the other
        # order lets a connection opened in between keep the old label).
        self._events += [EnclaveEnded(enclave, reason), AddressReleased(released)]
        self.counters.ended[reason] += 1
        log.info(
            "tunnel end %s reason=%s duration=%.1fs in=%d/%dB out=%d/%dB",
            enclave.describe(),
            reason,
            now - enclave.admitted_at,
            enclave.traffic.packets_in,
            enclave.traffic.bytes_in,
            enclave.traffic.packets_out,
            enclave.traffic.bytes_out,
            extra=enclave.log_fields("tunnel_end", reason=str(reason)),
        )
        log.info(
            "released %s (conntrack flush pending)", enclave.address,
            extra=enclave.log_fields("released"),
        )  # fmt: skip


def _ipam_subnets(admission: Admission) -> list[EnclaveSubnet]:
    return [subnet.to_ipam() for subnet in admission.policy.enclave_subnets()]
