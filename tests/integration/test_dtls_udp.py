"""The sans-I/O DTLS sessions over real UDP sockets on 127.0.0.1.

A deliberately tiny asyncio driver lives here (the gateway's real adapter is
elsewhere): per-address server sessions behind the cookie gate, an echo service, timers
on loop.time(), and a client that sends packets and waits for their echo.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import pytest

from seng_fw.tunnel.dtls import (
    TUNNEL_MTU,
    CloseReason,
    ConnectionClosed,
    DtlsClientConfig,
    DtlsClientSession,
    DtlsServerConfig,
    DtlsServerSession,
    DtlsTiming,
    HandshakeComplete,
    RecordReceived,
    make_client_config,
    make_server_config,
    peer_id,
)
from tests.support.certs import make_identity

Address = tuple[str, int]


def self_signed(kind: str, cn: str) -> tuple[bytes, bytes, bytes]:
    """(certificate PEM, key PEM, certificate DER)."""
    made = make_identity(kind, cn)
    return made.cert_pem, made.key_pem, made.cert_der


# ----------------------------------------------------------------- server driver


class EchoServer(asyncio.DatagramProtocol):
    """Demultiplexes peers by address; echoes every record back on its session."""

    def __init__(self, config: DtlsServerConfig) -> None:
        self.config = config
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.DatagramTransport | None = None
        self.sessions: dict[Address, DtlsServerSession] = {}
        self.timers: dict[Address, asyncio.TimerHandle] = {}
        self.completed: dict[Address, bytes] = {}  # peer certificate per address
        self.closed: dict[Address, str] = {}
        self.sessions_created = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (_SelectorDatagramTransport does not subclass DatagramTransport.)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        assert self.transport is not None
        now = self.loop.time()
        session = self.sessions.get(addr)
        if session is None:
            # Nothing is allocated for an address until its cookie checks out.
            verdict = self.config.cookie_gate.check(data, peer_id(addr))
            if verdict.reply is not None:
                self.transport.sendto(verdict.reply, addr)
            if not verdict.accepted:
                return
            session = self.sessions[addr] = DtlsServerSession(self.config, peer_id(addr), now)
            self.sessions_created += 1
        session.receive_datagram(data, now)
        self.service(addr, session)

    def service(self, addr: Address, session: DtlsServerSession) -> None:
        assert self.transport is not None
        for event in session.events():
            if isinstance(event, HandshakeComplete):
                self.completed[addr] = event.peer_cert_der
            elif isinstance(event, RecordReceived):
                session.send_record(event.data)
            elif isinstance(event, ConnectionClosed):
                self.closed[addr] = event.reason
        for datagram in session.datagrams_to_send():
            self.transport.sendto(datagram, addr)
        if session.closed:
            del self.sessions[addr]
        self.schedule(addr, session)

    def schedule(self, addr: Address, session: DtlsServerSession) -> None:
        old = self.timers.pop(addr, None)
        if old is not None:
            old.cancel()
        due = session.next_timeout()
        if due is not None and not session.closed:
            self.timers[addr] = self.loop.call_at(due, self.on_timer, addr, session)

    def on_timer(self, addr: Address, session: DtlsServerSession) -> None:
        self.timers.pop(addr, None)
        session.handle_timeout(self.loop.time())
        self.service(addr, session)


# ----------------------------------------------------------------- client driver


class Client(asyncio.DatagramProtocol):
    """One tunnel client on a connected UDP socket. `drop_incoming(n)` can simulate
    loss of the n-th datagram from the server (1-based)."""

    def __init__(
        self, config: DtlsClientConfig, drop_incoming: Callable[[int], bool] | None = None
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.session = DtlsClientSession(config, self.loop.time())
        self.drop_incoming = drop_incoming or (lambda _n: False)
        self.incoming = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.handshake_done = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_reason: str | None = None
        self.records: asyncio.Queue[bytes] = asyncio.Queue()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (_SelectorDatagramTransport does not subclass DatagramTransport.)
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.service()  # sends the ClientHello queued at creation

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.incoming += 1
        if self.drop_incoming(self.incoming):
            return
        self.session.receive_datagram(data, self.loop.time())
        self.service()

    def send(self, packet: bytes) -> None:
        self.session.send_record(packet)
        self.service()

    def close(self) -> None:
        self.session.close()
        self.service()

    def service(self) -> None:
        assert self.transport is not None
        for event in self.session.events():
            if isinstance(event, HandshakeComplete):
                self.handshake_done.set()
            elif isinstance(event, RecordReceived):
                self.records.put_nowait(event.data)
            elif isinstance(event, ConnectionClosed):
                self.close_reason = event.reason
                self.closed.set()
        for datagram in self.session.datagrams_to_send():
            self.transport.sendto(datagram)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        due = self.session.next_timeout()
        if due is not None:
            self.timer = self.loop.call_at(due, self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        self.session.handle_timeout(self.loop.time())
        self.service()


# ----------------------------------------------------------------- fixtures and tests


@pytest.fixture(scope="module")
def server_identity() -> tuple[bytes, bytes, bytes]:
    return self_signed("p256", "seng-gateway")


async def start_server(config: DtlsServerConfig) -> tuple[EchoServer, asyncio.DatagramTransport]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: EchoServer(config), local_addr=("127.0.0.1", 0)
    )
    return protocol, transport


async def start_client(
    config: DtlsClientConfig, server: Address, drop_incoming: Callable[[int], bool] | None = None
) -> tuple[Client, asyncio.DatagramTransport]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: Client(config, drop_incoming), remote_addr=server
    )
    return protocol, transport


async def exchange(client: Client, packets: list[bytes]) -> None:
    await asyncio.wait_for(client.handshake_done.wait(), 5)
    for packet in packets:
        client.send(packet)
    echoed = [await asyncio.wait_for(client.records.get(), 5) for _ in packets]
    assert echoed == packets


def test_echo_over_udp_with_rsa_and_ecdsa_clients(
    server_identity: tuple[bytes, bytes, bytes],
) -> None:
    server_cert, server_key, server_der = server_identity

    async def main() -> None:
        server, server_transport = await start_server(make_server_config(server_cert, server_key))
        server_addr = server_transport.get_extra_info("sockname")
        identities = [self_signed("rsa2048", "enclave-rsa"), self_signed("p384", "enclave-ecdsa")]
        clients = [
            await start_client(make_client_config(cert, key, server_der), server_addr)
            for cert, key, _ in identities
        ]
        packets = [
            bytes([i % 256]) * size for i, size in enumerate((20, 576, 1000, TUNNEL_MTU) * 5)
        ]
        try:
            await asyncio.gather(*(exchange(client, packets) for client, _ in clients))
            for client, _ in clients:
                client.close()
            await asyncio.sleep(0.05)  # let close_notify arrive
        finally:
            for _, transport in clients:
                transport.close()
            server_transport.close()

        client_addrs = [t.get_extra_info("sockname") for _, t in clients]
        assert [server.completed[a] for a in client_addrs] == [der for _, _, der in identities]
        assert [server.closed[a] for a in client_addrs] == [CloseReason.CLOSE_NOTIFY] * 2
        assert [c.close_reason for c, _ in clients] == [CloseReason.LOCAL] * 2
        assert server.sessions == {} and server.sessions_created == 2

    asyncio.run(main())


def test_lost_datagrams_are_retransmitted_on_loop_time(
    server_identity: tuple[bytes, bytes, bytes],
) -> None:
    server_cert, server_key, server_der = server_identity
    fast = DtlsTiming(hs_timeout_min=0.05, hs_timeout_max=1.0, handshake_timeout=5.0)

    async def main() -> None:
        server, server_transport = await start_server(
            make_server_config(server_cert, server_key, timing=fast)
        )
        cert, key, _ = self_signed("p256", "enclave")
        # Lose the HelloVerifyRequest and the first datagram of the server's next flight.
        client, client_transport = await start_client(
            make_client_config(cert, key, server_der, timing=fast),
            server_transport.get_extra_info("sockname"),
            drop_incoming=lambda n: n in (1, 2),
        )
        started = asyncio.get_running_loop().time()
        try:
            await exchange(client, [b"after loss"])
        finally:
            client_transport.close()
            server_transport.close()
        elapsed = asyncio.get_running_loop().time() - started
        assert 0.05 <= elapsed < 2.0
        assert server.sessions_created == 1

    asyncio.run(main())


def test_handshake_times_out_without_server(server_identity: tuple[bytes, bytes, bytes]) -> None:
    _, _, server_der = server_identity
    fast = DtlsTiming(hs_timeout_min=0.05, hs_timeout_max=0.2, handshake_timeout=0.5)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        # A bound socket that never answers.
        silent, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
        )
        cert, key, _ = self_signed("p256", "enclave")
        client, transport = await start_client(
            make_client_config(cert, key, server_der, timing=fast),
            silent.get_extra_info("sockname"),
        )
        try:
            await asyncio.wait_for(client.closed.wait(), 5)
        finally:
            transport.close()
            silent.close()
        assert client.close_reason == CloseReason.HANDSHAKE_TIMEOUT

    asyncio.run(main())
