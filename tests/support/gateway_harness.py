"""A `GatewayCore` with real DTLS sessions and no sockets: enclave clients and the core
exchange datagrams through in-memory queues, with a clock the test moves.

For tests of the core's own decisions (limits, half-open handshakes, packet checks);
the namespace tests (tests/integration) run the same paths over real sockets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address
from typing import Any

from seng_fw.attest.identity import EnclaveIdentity
from seng_fw.gateway.config import TimeoutConfig
from seng_fw.gateway.core import Address, GatewayCore, Port
from seng_fw.policy.admission import Admission
from seng_fw.policy.models import Policy
from seng_fw.tunnel.dtls import (
    ConnectionClosed,
    DtlsClientSession,
    HandshakeComplete,
    RecordReceived,
    make_client_config,
    make_server_config,
)
from seng_fw.tunnel.messages import IpAssignAck, IpAssignment
from tests.support.certs import Identity, make_identity

GATEWAY = "10.0.0.1"
APP_MRENCLAVE = bytes([1]) * 32
POLICY = {
    "apps": [
        {
            "name": "webapp",
            "mrenclave": APP_MRENCLAVE.hex(),
            "hosts": ["10.0.0.0/16"],
            "subnet": {"subnet": "192.168.29.0/24"},
        }
    ]
}

_CERTS: dict[str, Identity] = {}


def cert(name: str) -> Identity:
    if name not in _CERTS:
        _CERTS[name] = make_identity("p256", name)
    return _CERTS[name]


class CertVerifier:
    """Every certificate attests as an enclave of `APP_MRENCLAVE`; the evidence (and so
    the identity) differs per certificate, as with real RA-TLS certificates."""

    def verify_certificate(self, cert_der: bytes) -> EnclaveIdentity:
        return EnclaveIdentity(
            mrenclave=APP_MRENCLAVE,
            mrsigner=bytes(32),
            isv_prod_id=0,
            isv_svn=0,
            debug=False,
            quote_status="OK",
            timestamp=datetime(2026, 1, 1, tzinfo=UTC),
            report_data=cert_der[-64:],
        )


@dataclass
class Client:
    """One client DTLS session from `address` to one of the gateway's ports."""

    port: Port
    address: Address
    session: DtlsClientSession
    records: list[bytes] = field(default_factory=list)
    closed: str | None = None
    established: bool = False
    assignment: IpAssignment | None = None

    @property
    def address_assigned(self) -> IPv4Address:
        assert self.assignment is not None
        return self.assignment.ip


class Harness:
    def __init__(self, policy: dict[str, Any] | None = None, **core_options: Any) -> None:
        server = cert("gateway")
        self.server_der = server.cert_der
        dtls = make_server_config(server.cert_pem, server.key_pem)
        self.core = GatewayCore(
            Admission(Policy.model_validate(policy or POLICY)),
            CertVerifier(),
            {Port.SETUP: dtls, Port.DOWNLINK: dtls},
            TimeoutConfig(),
            **core_options,
        )
        self.now = 0.0
        self.clients: dict[tuple[Port, Address], Client] = {}
        self.tun: list[bytes] = []

    def open(self, port: Port, address: Address, name: str = "enclave") -> Client:
        identity = cert(name)
        config = make_client_config(identity.cert_pem, identity.key_pem, self.server_der)
        client = Client(port, address, DtlsClientSession(config, self.now))
        self.clients[(port, address)] = client
        return client

    def abandon(self, address: Address, port: Port = Port.SETUP) -> None:
        """A client that answers the cookie, gets the server's flight and walks away."""
        client = self.open(port, address, "flood")
        for _ in range(2):  # ClientHello, HelloVerifyRequest, ClientHello + cookie
            for datagram in client.session.datagrams_to_send():
                self.core.datagram_received(port, address, datagram, self.now)
            for _port, to, datagram in self.core.datagrams_to_send():
                if to == address:
                    client.session.receive_datagram(datagram, self.now)
        del self.clients[(port, address)]

    def pump(self, rounds: int = 50) -> None:
        """Move datagrams both ways until nothing moves (no time passes)."""
        for _ in range(rounds):
            moved = False
            for client in list(self.clients.values()):
                for datagram in client.session.datagrams_to_send():
                    moved = True
                    self.core.datagram_received(client.port, client.address, datagram, self.now)
            for port, address, datagram in self.core.datagrams_to_send():
                moved = True
                target = self.clients.get((port, address))
                if target is not None:
                    target.session.receive_datagram(datagram, self.now)
            for client in self.clients.values():
                for event in client.session.events():
                    if isinstance(event, HandshakeComplete):
                        client.established = True
                    elif isinstance(event, RecordReceived):
                        client.records.append(event.data)
                    elif isinstance(event, ConnectionClosed):
                        client.closed = event.reason
            self.tun += self.core.packets_for_tun()
            if not moved:
                return

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.core.handle_timers(self.now)
        for client in self.clients.values():
            deadline = client.session.next_timeout()
            if deadline is not None and self.now >= deadline:
                client.session.handle_timeout(self.now)
        self.pump()

    def connect(self, host: str, name: str = "enclave", port: int = 40000) -> tuple[Client, Client]:
        """The whole SENG setup: tunnel #1, IpAssignment + ACK, tunnel #2."""
        uplink = self.open(Port.SETUP, (host, port), name)
        self.pump()
        assert uplink.established and uplink.records, uplink.closed
        uplink.assignment = IpAssignment.decode(uplink.records.pop(0))
        uplink.session.send_record(IpAssignAck(uplink.assignment.ip).encode())
        downlink = self.open(Port.DOWNLINK, (host, port + 1), name)
        self.pump()
        assert downlink.established, downlink.closed
        return uplink, downlink
