"""A `GatewayCore` and SENG clients joined in memory: real DTLS sessions, real lab-CA
RA-TLS certificates, real attestation and admission, no sockets, no root, explicit time.

    gateway = MemoryGateway(policy)
    enclave = gateway.enclave(gateway.cert(WEBAPP))
    enclave.connect()                    # tunnel #1, IpAssignment, tunnel #2
    enclave.send(packet)                 # enclave -> gateway: gateway.to_tun
    gateway.from_tun(packet)             # gateway -> enclave: enclave.received
    gateway.advance(31)                  # timers fire on both sides

Like aioquic's `tests/test_connection.py` (client and server in memory) and
wireguard-go's `TestTwoDevicePing`. The gateway stands in for the asyncio adapter the
way `seng_fw.gateway.server` does: it delivers the core's datagrams, keeps its TUN
packets and events, and confirms conntrack flushes of released addresses (unless
`flush_released` is off).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from seng_fw.attest.identity import EvidenceVerifier
from seng_fw.attest.policy import AttestationPolicy
from seng_fw.attest.verifier import IasVerifier
from seng_fw.gateway.config import TimeoutConfig
from seng_fw.gateway.core import AddressReleased, GatewayCore, GatewayEvent, Port
from seng_fw.gateway.limits import LimitsConfig
from seng_fw.lab.ca import EnclaveCert, LabCA
from seng_fw.policy.admission import Admission
from seng_fw.policy.ipam import LeaseStore
from seng_fw.policy.models import Policy
from seng_fw.tunnel.dtls import (
    ConnectionClosed,
    DtlsClientConfig,
    DtlsClientSession,
    DtlsEvent,
    DtlsServerConfig,
    HandshakeComplete,
    RecordReceived,
    make_client_config,
    make_server_config,
)
from seng_fw.tunnel.messages import IpAssignment
from seng_fw.tunnel.setup import ClientSetup
from tests.support.certs import Identity, make_identity

MRSIGNER = bytes([0xCD]) * 32
GATEWAY_HOST = "10.0.0.1"


@functools.cache
def lab_ca() -> LabCA:
    """One lab attestation CA per test process (an RSA-3072 key takes a while)."""
    return LabCA.generate()


@functools.cache
def other_ca() -> LabCA:
    """A CA the gateway does not trust."""
    return LabCA.generate()


@functools.cache
def server_identity() -> Identity:
    return make_identity("p256", "gateway")


@functools.cache
def server_config() -> DtlsServerConfig:
    server = server_identity()
    return make_server_config(server.cert_pem, server.key_pem)


@functools.cache
def flood_config() -> DtlsClientConfig:
    """A client that never gets as far as sending its certificate."""
    flood = make_identity("p256", "flood")
    return make_client_config(flood.cert_pem, flood.key_pem, server_identity().cert_der)


def verifier(ca: LabCA | None = None) -> EvidenceVerifier:
    ca = ca or lab_ca()
    return IasVerifier(
        AttestationPolicy(
            roots=(ca.root_cert,),
            allowed_statuses=frozenset({"OK"}),
            allow_debug=True,  # decided per app at admission, as `seng-fw serve` does
            max_age=None,
        )
    )


def ipv4_packet(source: IPv4Address | str, destination: IPv4Address | str, size: int = 28) -> bytes:
    """A minimal IPv4 header (protocol 17) padded to `size` bytes; checksum left 0."""
    header = bytearray(20)
    header[0] = 0x45
    header[2:4] = size.to_bytes(2, "big")
    header[8], header[9] = 64, 17
    header[12:16] = IPv4Address(source).packed
    header[16:20] = IPv4Address(destination).packed
    return bytes(header) + bytes(size - 20)


@dataclass(eq=False)
class Endpoint:
    """One client DTLS session on one gateway port, from one UDP address."""

    port: Port
    address: tuple[str, int]
    session: DtlsClientSession
    events: list[DtlsEvent] = field(default_factory=list)

    @property
    def closed_reasons(self) -> list[str]:
        return [e.reason for e in self.events if isinstance(e, ConnectionClosed)]


class MemoryEnclave:
    """A SENG client (what the SENG Runtime does): tunnel #1, the IpAssignment exchange,
    tunnel #2, one IPv4 packet per record."""

    def __init__(self, gateway: MemoryGateway, cert: EnclaveCert, host: str, port: int) -> None:
        self.gateway = gateway
        self.cert = cert
        self.host = host
        self.port = port
        self.config: DtlsClientConfig = make_client_config(
            cert.cert_pem, cert.key_pem, server_identity().cert_der
        )
        self.setup = ClientSetup()
        self.auto_ack = True  # answer every IpAssignment (set False to test resends)
        self.assignments_received = 0
        self.received: list[bytes] = []  # packets that came down tunnel #2
        self.uplink: Endpoint | None = None
        self.downlink: Endpoint | None = None

    @property
    def assignment(self) -> IpAssignment | None:
        return self.setup.assignment

    @property
    def address(self) -> IPv4Address:
        assert self.setup.assignment is not None, "no IpAssignment received"
        return self.setup.assignment.ip

    def open_uplink(self) -> Endpoint:
        self.uplink = self.gateway.open(self, Port.SETUP, self.port)
        return self.uplink

    def open_downlink(self) -> Endpoint:
        self.downlink = self.gateway.open(self, Port.DOWNLINK, self.port + 1)
        return self.downlink

    def connect(self) -> MemoryEnclave:
        """Both tunnels, as a SENG client opens them: #2 once #1 has its address."""
        self.open_uplink()
        self.gateway.pump()
        assert self.setup.assignment is not None, f"not admitted: {self.gateway.core.counters}"
        self.open_downlink()
        self.gateway.pump()
        return self

    def send(self, packet: bytes) -> None:
        """An IPv4 packet into tunnel #1."""
        assert self.uplink is not None
        self.uplink.session.send_record(packet)
        self.gateway.pump()

    def record(self, endpoint: Endpoint, data: bytes) -> None:
        if endpoint.port is Port.DOWNLINK:
            self.received.append(data)
            return
        self.assignments_received += 1
        acks = self.setup.receive_record(data)
        if self.auto_ack:
            for ack in acks:
                endpoint.session.send_record(ack)


class MemoryGateway:
    """A real `GatewayCore` and the clients talking to it, joined by lists."""

    def __init__(
        self,
        policy: Policy | dict[str, Any],
        *,
        timeouts: TimeoutConfig | None = None,
        ca: LabCA | None = None,
        limits: LimitsConfig | None = None,
        leases: LeaseStore[str] | None = None,
    ) -> None:
        if not isinstance(policy, Policy):
            policy = Policy.model_validate(policy)
        self.now = 1000.0
        self.core = GatewayCore(
            Admission(policy),
            verifier(ca),
            {Port.SETUP: server_config(), Port.DOWNLINK: server_config()},
            timeouts or TimeoutConfig(),
            limits,
            leases,
        )
        self.events: list[GatewayEvent] = []
        self.to_tun: list[bytes] = []
        self.flush_released = True
        self._endpoints: dict[tuple[Port, tuple[str, int]], tuple[MemoryEnclave, Endpoint]] = {}
        self._next_port = 40000

    # --- clients ---------------------------------------------------------------------

    def cert(self, mrenclave: bytes, *, ca: LabCA | None = None, **kwargs: Any) -> EnclaveCert:
        kwargs.setdefault("mrsigner", MRSIGNER)
        return (ca or lab_ca()).issue_enclave_cert(mrenclave=mrenclave, **kwargs)

    def enclave(self, cert: EnclaveCert, host: str = "10.0.0.10") -> MemoryEnclave:
        self._next_port += 2
        return MemoryEnclave(self, cert, host, self._next_port)

    def open(self, enclave: MemoryEnclave, port: Port, udp_port: int) -> Endpoint:
        address = (enclave.host, udp_port)
        endpoint = Endpoint(port, address, DtlsClientSession(enclave.config, self.now))
        self._endpoints[(port, address)] = (enclave, endpoint)
        return endpoint

    def abandon(self, address: tuple[str, int], port: Port = Port.SETUP) -> None:
        """A client that answers the cookie, takes the server's first flight and walks
        away (a handshake flood): the gateway is left with a half-open handshake."""
        session = DtlsClientSession(flood_config(), self.now)
        for _ in range(2):  # ClientHello; HelloVerifyRequest; ClientHello with the cookie
            for datagram in session.datagrams_to_send():
                self.core.datagram_received(port, address, datagram, self.now)
            for to_port, to, datagram in self.core.datagrams_to_send():
                if (to_port, to) == (port, address):
                    session.receive_datagram(datagram, self.now)
                else:
                    self._deliver(to_port, to, datagram)

    def _deliver(self, port: Port, address: tuple[str, int], datagram: bytes) -> None:
        found = self._endpoints.get((port, address))
        if found is not None:
            found[1].session.receive_datagram(datagram, self.now)

    def inject(self, port: Port, address: tuple[str, int], data: bytes) -> None:
        """A raw datagram from anywhere (forged, replayed, garbage)."""
        self.core.datagram_received(port, address, data, self.now)
        self.pump()

    # --- the adapter's part ----------------------------------------------------------

    def pump(self) -> None:
        """Deliver datagrams both ways until everyone is quiet (no time passes)."""
        for _ in range(200):
            moved = False
            for port, address, datagram in self.core.datagrams_to_send():
                moved = True
                self._deliver(port, address, datagram)
            for enclave, endpoint in list(self._endpoints.values()):
                for datagram in endpoint.session.datagrams_to_send():
                    moved = True
                    self.core.datagram_received(endpoint.port, endpoint.address, datagram, self.now)
                for event in endpoint.session.events():
                    endpoint.events.append(event)
                    if isinstance(event, RecordReceived):
                        enclave.record(endpoint, event.data)
                        moved = True
            self.to_tun += self.core.packets_for_tun()
            for happened in self.core.events():
                self.events.append(happened)
                if isinstance(happened, AddressReleased) and self.flush_released:
                    self.core.address_flushed(happened.address)
            if not moved:
                return
        raise AssertionError("the gateway and its clients did not settle")

    def from_tun(self, *packets: bytes) -> None:
        self.core.tun_packets(list(packets), self.now)
        self.pump()

    def advance(self, seconds: float) -> None:
        """Let time pass in steps of at most a second, firing every timer on the way."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + 1.0)
            self.core.handle_timers(self.now)
            for _, endpoint in list(self._endpoints.values()):
                deadline = endpoint.session.next_timeout()
                if deadline is not None and self.now >= deadline:
                    endpoint.session.handle_timeout(self.now)
            self.pump()

    def events_of(self, kind: type[Any]) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]


def handshake_done(endpoint: Endpoint) -> bool:
    return any(isinstance(e, HandshakeComplete) for e in endpoint.events)
