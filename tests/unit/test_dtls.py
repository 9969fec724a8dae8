"""Sans-I/O DTLS sessions: in-memory exchanges, explicit time, no sockets."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mbedtls import pk, tls
from mbedtls import x509 as mx509

from seng_fw.tunnel import dtls, record
from seng_fw.tunnel.dtls import (
    CIPHER_ECDSA,
    CIPHER_RSA,
    DTLS_MTU,
    TUNNEL_MTU,
    CloseReason,
    ConnectionClosed,
    DtlsClientSession,
    DtlsCookieGate,
    DtlsEvent,
    DtlsServerSession,
    DtlsTiming,
    HandshakeComplete,
    NotEstablishedError,
    RecordReceived,
    make_client_config,
    make_server_config,
)
from seng_fw.tunnel.dtls_native import HandshakeClock
from tests.support.certs import Identity, make_identity

PEER = dtls.peer_id(("192.0.2.7", 40000))


# ----------------------------------------------------------------- certificates


_IDENTITIES: dict[tuple[str, str, int], Identity] = {}


def identity(kind: str, cn: str = "test", extra_bytes: int = 0) -> Identity:
    key = (kind, cn, extra_bytes)
    if key not in _IDENTITIES:
        _IDENTITIES[key] = make_identity(kind, cn, extra_bytes)
    return _IDENTITIES[key]


@pytest.fixture(scope="module")
def server_id() -> Identity:
    return identity("p256", "gateway")


@pytest.fixture(scope="module")
def server_config(server_id: Identity) -> dtls.DtlsServerConfig:
    return make_server_config(server_id.cert_pem, server_id.key_pem)


@pytest.fixture(scope="module")
def client_id() -> Identity:
    return identity("p384", "enclave")


@pytest.fixture(scope="module")
def client_config(client_id: Identity, server_id: Identity) -> dtls.DtlsClientConfig:
    return make_client_config(client_id.cert_pem, client_id.key_pem, server_id.cert_der)


# ----------------------------------------------------------------- in-memory link


@dataclass
class Link:
    """Client and server joined by in-memory lists, with a clock and a loss hook.

    `drop(direction, flight_number, datagram)` decides loss; a flight is everything
    one side emitted in one go.
    """

    client: DtlsClientSession
    server: DtlsServerSession
    now: float = 0.0
    drop: Callable[[str, int, bytes], bool] = lambda _d, _n, _b: False
    flights: dict[str, int] = field(default_factory=lambda: {"c2s": 0, "s2c": 0})
    client_events: list[DtlsEvent] = field(default_factory=list)
    server_events: list[DtlsEvent] = field(default_factory=list)
    wire: list[tuple[float, str, bytes]] = field(default_factory=list)

    def pump(self) -> None:
        """Deliver datagrams until both sides are quiet (no time passes)."""
        for _ in range(100):
            moved = self._move("c2s", self.client, self.server)
            moved |= self._move("s2c", self.server, self.client)
            self.client_events += self.client.events()
            self.server_events += self.server.events()
            if not moved:
                return
        raise AssertionError("link did not settle")

    def _move(self, direction: str, src: Any, dst: Any) -> bool:
        out = src.datagrams_to_send()
        if not out:
            return False
        self.flights[direction] += 1
        for datagram in out:
            self.wire.append((self.now, direction, datagram))
            if not self.drop(direction, self.flights[direction], datagram):
                dst.receive_datagram(datagram, self.now)
        return True

    def run(self, until: float = 200.0) -> None:
        """Pump, then jump to the next timer, until established, closed or `until`."""
        self.pump()
        while not self.settled() and self.now < until:
            due = [
                t for t in (self.client.next_timeout(), self.server.next_timeout()) if t is not None
            ]
            if not due:
                return
            self.now = min(due)
            self.client.handle_timeout(self.now)
            self.server.handle_timeout(self.now)
            self.pump()

    def settled(self) -> bool:
        both_up = self.client.established and self.server.established
        return both_up or self.client.closed or self.server.closed


def connect(
    client_config: dtls.DtlsClientConfig,
    server_config: dtls.DtlsServerConfig,
    drop: Callable[[str, int, bytes], bool] | None = None,
) -> Link:
    link = Link(DtlsClientSession(client_config, 0.0), DtlsServerSession(server_config, PEER, 0.0))
    if drop is not None:
        link.drop = drop
    link.run()
    return link


def of_type(events: Iterable[DtlsEvent], kind: type[Any]) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def payloads(events: Iterable[DtlsEvent]) -> list[bytes]:
    return [e.data for e in of_type(events, RecordReceived)]


def closed_reasons(events: Iterable[DtlsEvent]) -> list[str]:
    return [e.reason for e in of_type(events, ConnectionClosed)]


def established(client_config: dtls.DtlsClientConfig, server_config: dtls.DtlsServerConfig) -> Link:
    link = connect(client_config, server_config)
    assert link.client.established and link.server.established
    link.client_events.clear()
    link.server_events.clear()
    return link


def records(dgram: bytes) -> list[tuple[int, int, bytes]]:
    """(content type, epoch, fragment) of each DTLS record in a datagram."""
    out, offset = [], 0
    while offset + 13 <= len(dgram):
        length = int.from_bytes(dgram[offset + 11 : offset + 13], "big")
        out.append(
            (
                dgram[offset],
                int.from_bytes(dgram[offset + 3 : offset + 5], "big"),
                dgram[offset + 13 : offset + 13 + length],
            )
        )
        offset += 13 + length
    return out


def ecdhe_group(wire: Sequence[tuple[float, str, bytes]]) -> int | None:
    """TLS named group of the server's ServerKeyExchange (23 P-256, 24 P-384, 25 P-521)."""
    for _, direction, datagram in wire:
        if direction != "s2c":
            continue
        for content_type, epoch, fragment in records(datagram):
            if content_type == 22 and epoch == 0 and fragment[0] == 12:
                body = fragment[12:]
                assert body[0] == 3  # named_curve
                return int.from_bytes(body[1:3], "big")
    return None


# ----------------------------------------------------------------- handshake


@pytest.mark.parametrize("server_kind", ["p256", "rsa2048"])
@pytest.mark.parametrize("client_kind", ["rsa2048", "p384", "p256"])
def test_handshake_with_cookie_exchange(server_kind: str, client_kind: str) -> None:
    server = identity(server_kind, "gateway")
    client = identity(client_kind, "enclave")
    link = connect(
        make_client_config(client.cert_pem, client.key_pem, server.cert_der),
        make_server_config(server.cert_pem, server.key_pem),
    )

    assert link.client.established and link.server.established
    assert link.server.hello_verify_requests_sent == 1
    # The HelloVerifyRequest (handshake type 3) was the server's first answer.
    first_reply = next(d for _, direction, d in link.wire if direction == "s2c")
    assert records(first_reply)[0][2][0] == 3
    [server_done] = of_type(link.server_events, HandshakeComplete)
    [client_done] = of_type(link.client_events, HandshakeComplete)
    assert server_done.peer_cert_der == client.cert_der
    assert client_done.peer_cert_der == server.cert_der
    expected_suite = CIPHER_RSA if server_kind.startswith("rsa") else CIPHER_ECDSA
    assert server_done.cipher_suite == client_done.cipher_suite == expected_suite
    assert link.server.peer_cert_der == client.cert_der
    assert link.now == 0.0  # no retransmission needed
    assert all(len(d) <= DTLS_MTU for _, _, d in link.wire)


def test_ecdhe_prefers_p256(
    client_config: dtls.DtlsClientConfig, server_config: dtls.DtlsServerConfig
) -> None:
    link = connect(client_config, server_config)
    assert ecdhe_group(link.wire) == 23  # secp256r1, not python-mbedtls's default P-521


def test_ecdhe_p384_only_server(client_config: dtls.DtlsClientConfig, server_id: Identity) -> None:
    server_config = make_server_config(server_id.cert_pem, server_id.key_pem, curves=("secp384r1",))
    link = connect(client_config, server_config)
    assert link.client.established
    assert ecdhe_group(link.wire) == 24


def test_large_client_certificate_is_fragmented_to_mtu(
    server_id: Identity, server_config: dtls.DtlsServerConfig
) -> None:
    big = identity("p384", "enclave-ratls", extra_bytes=6000)
    link = connect(make_client_config(big.cert_pem, big.key_pem, server_id.cert_der), server_config)
    assert link.server.peer_cert_der == big.cert_der
    client_datagrams = [d for _, direction, d in link.wire if direction == "c2s"]
    assert max(len(d) for d in client_datagrams) <= DTLS_MTU
    assert len(client_datagrams) > 6  # the certificate flight spans several datagrams


def test_client_without_certificate_is_refused(
    server_id: Identity, server_config: dtls.DtlsServerConfig
) -> None:
    link = connect(make_client_config(None, None, server_id.cert_der), server_config)
    assert not of_type(link.server_events, HandshakeComplete)
    assert closed_reasons(link.server_events) == [CloseReason.NO_CLIENT_CERTIFICATE]
    assert link.server.closed
    # The client learns through close_notify.
    assert closed_reasons(link.client_events) == [CloseReason.CLOSE_NOTIFY]


def test_wrong_pinned_server_certificate_fails(
    client_id: Identity, server_config: dtls.DtlsServerConfig
) -> None:
    other = identity("p256", "impostor-pin")
    link = connect(
        make_client_config(client_id.cert_pem, client_id.key_pem, other.cert_der), server_config
    )
    assert not of_type(link.client_events, HandshakeComplete)
    assert closed_reasons(link.client_events) == [CloseReason.SERVER_CERTIFICATE_MISMATCH]
    assert link.client.closed
    assert closed_reasons(link.server_events) == [CloseReason.CLOSE_NOTIFY]


def test_pinned_certificate_without_its_key_fails(
    client_config: dtls.DtlsClientConfig, server_id: Identity
) -> None:
    # An impostor presents the pinned certificate but signs with another key: the
    # pin check after the handshake is sound only because this fails.
    impostor = make_server_config(server_id.cert_pem, server_id.key_pem)
    other_key = identity("p256", "impostor-key").key_pem
    impostor.context = tls.ServerContext(
        tls.DTLSConfiguration(
            certificate_chain=(
                (mx509.CRT.from_DER(server_id.cert_der),),
                pk.ECC.from_buffer(other_key),
            ),
            ciphers=(CIPHER_ECDSA,),
            validate_certificates=False,
        )
    )
    link = connect(client_config, impostor)
    assert not of_type(link.client_events, HandshakeComplete)
    assert closed_reasons(link.client_events) == [CloseReason.HANDSHAKE_FAILED]
    assert not link.server.established


def test_server_without_common_cipher_suite_sends_fatal_alert(
    client_config: dtls.DtlsClientConfig, server_id: Identity
) -> None:
    server_config = make_server_config(server_id.cert_pem, server_id.key_pem)
    # Same certificate, but a suite the client does not offer.
    server_config.context = tls.ServerContext(
        tls.DTLSConfiguration(
            certificate_chain=server_config.context.configuration.certificate_chain,
            ciphers=("TLS-ECDHE-ECDSA-WITH-AES-256-GCM-SHA384",),
            validate_certificates=False,
        )
    )
    link = connect(client_config, server_config)
    assert closed_reasons(link.server_events) == [CloseReason.HANDSHAKE_FAILED]
    assert closed_reasons(link.client_events) == [CloseReason.FATAL_ALERT]


def test_config_rejects_unsuitable_server_keys(server_id: Identity) -> None:
    p521 = identity("p521", "big-curve")
    with pytest.raises(ValueError, match="P-256 or P-384"):
        make_server_config(p521.cert_pem, p521.key_pem)
    rsa1024 = identity("rsa1024", "short")
    with pytest.raises(ValueError, match="2048"):
        make_server_config(rsa1024.cert_pem, rsa1024.key_pem)
    with pytest.raises(ValueError, match="does not belong"):
        make_server_config(server_id.cert_pem, p521.key_pem)


def test_config_accepts_der_and_chains(server_id: Identity, client_id: Identity) -> None:
    key_der = serialization.load_pem_private_key(server_id.key_pem, None).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    config = make_server_config([server_id.cert_der], key_der)
    assert config.cert_chain_der == (server_id.cert_der,)
    assert config.cipher_suite == CIPHER_ECDSA
    client = make_client_config(client_id.cert_pem, client_id.key_pem, server_id.cert_pem)
    assert client.pinned_server_cert_der == server_id.cert_der


def test_sessions_keep_their_configuration_alive(server_id: Identity, client_id: Identity) -> None:
    # mbed TLS keeps a pointer to the curve list owned by the configuration object.
    client = DtlsClientSession(
        make_client_config(client_id.cert_pem, client_id.key_pem, server_id.cert_der), 0.0
    )
    server = DtlsServerSession(make_server_config(server_id.cert_pem, server_id.key_pem), PEER, 0.0)
    gc.collect()
    link = Link(client, server)
    link.run()
    assert link.client.established and link.server.established
    assert ecdhe_group(link.wire) == 23


# ----------------------------------------------------------------- data


def test_records_flow_both_ways(
    client_config: dtls.DtlsClientConfig, server_config: dtls.DtlsServerConfig
) -> None:
    link = established(client_config, server_config)
    packets = [b"\x45" + bytes(19), bytes(range(256)) * 5, b"\x45" * TUNNEL_MTU]
    for packet in packets:
        link.client.send_record(memoryview(bytearray(packet)))  # any bytes-like object
        link.server.send_record(packet[::-1])
    client_out = link.client.datagrams_to_send()
    assert len(client_out) == len(packets)  # one record, one datagram each
    assert len(client_out[-1]) == DTLS_MTU == TUNNEL_MTU + 37
    for datagram in client_out:
        link.server.receive_datagram(datagram, 1.0)
    for datagram in link.server.datagrams_to_send():
        link.client.receive_datagram(datagram, 1.0)
    assert payloads(link.server.events()) == packets
    assert payloads(link.client.events()) == [p[::-1] for p in packets]
    assert link.server.records_in == link.client.records_out == len(packets)


def test_record_size_and_state_checks(
    client_config: dtls.DtlsClientConfig, server_config: dtls.DtlsServerConfig
) -> None:
    client = DtlsClientSession(client_config, 0.0)
    with pytest.raises(NotEstablishedError):
        client.send_record(b"too early")
    link = established(client_config, server_config)
    with pytest.raises(ValueError, match="exceeds"):
        link.client.send_record(b"x" * (TUNNEL_MTU + 1))


@pytest.mark.parametrize("closer", ["client", "server"])
def test_close_notify_ends_the_other_side(
    closer: str, client_config: dtls.DtlsClientConfig, server_config: dtls.DtlsServerConfig
) -> None:
    link = established(client_config, server_config)
    local, remote = (link.client, link.server) if closer == "client" else (link.server, link.client)
    local.close()
    assert closed_reasons(local.events()) == [CloseReason.LOCAL]
    [alert] = local.datagrams_to_send()
    assert records(alert)[0][0] == 21  # an (encrypted) alert record
    remote.receive_datagram(alert, 1.0)
    assert closed_reasons(remote.events()) == [CloseReason.CLOSE_NOTIFY]
    assert remote.closed and local.closed
    # Closed sessions ignore everything and refuse to send.
    remote.receive_datagram(alert, 2.0)
    assert remote.events() == [] and remote.datagrams_to_send() == []
    with pytest.raises(NotEstablishedError):
        remote.send_record(b"late")
    local.close()  # idempotent
    assert local.events() == []


def test_garbage_truncated_and_replayed_datagrams_are_ignored(
    client_config: dtls.DtlsClientConfig, server_config: dtls.DtlsServerConfig
) -> None:
    link = established(client_config, server_config)
    link.client.send_record(b"first packet")
    [good] = link.client.datagrams_to_send()
    link.server.receive_datagram(good, 1.0)
    assert payloads(link.server.events()) == [b"first packet"]

    flipped = bytearray(good)
    flipped[-1] ^= 1
    header_only = good[:13]
    wrong_epoch = good[:3] + b"\x00\x07" + good[5:]
    bad_length = good[:11] + b"\xff\xff" + good[13:]
    junk = [
        good,  # replay
        good[:-5],  # truncated
        bytes(flipped),  # bad tag
        header_only,
        wrong_epoch,
        bad_length,
        b"",
        b"\x17",
        b"\x00" * 40,
        b"\x16\xfe\xfd" + bytes(200),  # handshake-looking nonsense
        b"\xff" * (dtls.MAX_DATAGRAM + 1),
        *JUNK,
    ]
    for datagram in junk:
        link.server.receive_datagram(datagram, 2.0)
    assert link.server.events() == []
    assert link.server.established
    assert link.server.datagrams_ignored == len(junk)

    link.client.send_record(b"second packet")
    for datagram in link.client.datagrams_to_send():
        link.server.receive_datagram(datagram, 3.0)
    assert payloads(link.server.events()) == [b"second packet"]


JUNK = [
    bytes(range(100)),
    b"\x16\xfe",
    b"\x16\xfe\xfd" + bytes(60),  # empty handshake record, then zeros
    b"\x15\xfe\xfd" + bytes(30),  # empty alert record
    b"\x17\xfe\xfd\x00\x01" + bytes(6) + b"\x00\x20" + bytes(32),  # epoch-1 application data
    b"\x16\xfe\xfd\x00\x01" + bytes(6) + b"\x00\x20" + bytes(32),  # epoch-1 handshake
    b"\x16\x03\x03" + bytes(8) + b"\x00\x10" + bytes(16),  # TLS, not DTLS
    b"\x16\xfe\xfd" + bytes(8) + b"\x40\x00" + bytes(16),  # length beyond the datagram
    # A truncated ClientHello: mbed TLS alone would fail the handshake (or, on an
    # established server, the session) on it.
    b"\x16\xfe\xfd" + bytes(8) + b"\x00\x10" + b"\x01\x00\x01\x00" + bytes(12),
]


@pytest.mark.parametrize("junk", JUNK, ids=range(len(JUNK)))
@pytest.mark.parametrize("victim", ["client", "server"])
def test_junk_during_the_handshake_is_ignored(
    junk: bytes,
    victim: str,
    client_config: dtls.DtlsClientConfig,
    server_config: dtls.DtlsServerConfig,
) -> None:
    def inject(_direction: str, _flight: int, _datagram: bytes) -> bool:
        # Before every flight, from the very first datagram the server sees.
        getattr(link, victim).receive_datagram(junk, link.now)
        return False

    link = Link(
        DtlsClientSession(client_config, 0.0),
        DtlsServerSession(server_config, PEER, 0.0),
        drop=inject,
    )
    link.run()
    assert link.client.established and link.server.established
    assert not closed_reasons(link.client_events + link.server_events)
    assert link.now <= 1.0  # at worst one retransmission


# ----------------------------------------------------------------- timers


def test_first_timer_is_the_minimum_handshake_timeout(client_config: dtls.DtlsClientConfig) -> None:
    client = DtlsClientSession(client_config, 100.0)
    assert client.next_timeout() == pytest.approx(101.0)
    client.handle_timeout(100.5)  # early: nothing happens
    assert len(client.datagrams_to_send()) == 1  # only the initial ClientHello
    client.handle_timeout(101.0)
    assert len(client.datagrams_to_send()) == 1  # the retransmission
    assert client.next_timeout() == pytest.approx(103.0)  # doubled


@pytest.mark.parametrize(
    ("lost_flight", "description"),
    [
        (1, "HelloVerifyRequest"),
        (2, "ServerHello..ServerHelloDone"),
        (3, "ChangeCipherSpec+Finished"),
    ],
)
def test_lost_server_flight_is_recovered_by_timers(
    lost_flight: int,
    description: str,
    client_config: dtls.DtlsClientConfig,
    server_config: dtls.DtlsServerConfig,
) -> None:
    link = connect(
        client_config, server_config, drop=lambda d, n, _b: d == "s2c" and n == lost_flight
    )
    assert link.client.established and link.server.established, description
    assert link.now == pytest.approx(1.0)  # one retransmission after hs_timeout_min
    assert len(of_type(link.client_events, HandshakeComplete)) == 1
    assert len(of_type(link.server_events, HandshakeComplete)) == 1
    # Data flows afterwards.
    link.client.send_record(b"ping")
    for datagram in link.client.datagrams_to_send():
        link.server.receive_datagram(datagram, link.now)
    assert payloads(link.server.events()) == [b"ping"]


def test_lost_client_flight_is_recovered_by_timers(
    client_config: dtls.DtlsClientConfig, server_config: dtls.DtlsServerConfig
) -> None:
    # Flight 3 of the client is Certificate..Finished.
    link = connect(client_config, server_config, drop=lambda d, n, _b: d == "c2s" and n == 3)
    assert link.client.established and link.server.established
    assert link.now == pytest.approx(1.0)


def test_handshake_timeout(
    client_config: dtls.DtlsClientConfig, server_config: dtls.DtlsServerConfig
) -> None:
    link = connect(client_config, server_config, drop=lambda d, _n, _b: d == "s2c")
    assert closed_reasons(link.client_events) == [CloseReason.HANDSHAKE_TIMEOUT]
    assert closed_reasons(link.server_events) == [CloseReason.HANDSHAKE_TIMEOUT]
    assert link.now == pytest.approx(60.0)
    # Exponential backoff from 1 s: sends at 0, 1, 3, 7, 15, 31 s.
    client_sends = sorted({t for t, direction, _ in link.wire if direction == "c2s"})
    assert client_sends == pytest.approx([0.0, 1.0, 3.0, 7.0, 15.0, 31.0])
    assert link.client.next_timeout() is None and link.server.next_timeout() is None


def test_handshake_timeout_is_configurable(server_id: Identity, client_id: Identity) -> None:
    timing = DtlsTiming(hs_timeout_min=0.25, hs_timeout_max=1.0, handshake_timeout=30.0)
    client_config = make_client_config(
        client_id.cert_pem, client_id.key_pem, server_id.cert_der, timing=timing
    )
    client = DtlsClientSession(client_config, 0.0)
    sends, now = [], 0.0
    while not client.closed:
        if client.datagrams_to_send():
            sends.append(now)
        due = client.next_timeout()
        assert due is not None
        now = due
        client.handle_timeout(now)
    # Timeouts 0.25, 0.5, 1.0 s; mbed TLS gives up when the one at hs_timeout_max expires.
    assert sends == pytest.approx([0.0, 0.25, 0.75])
    assert now == pytest.approx(1.75)
    assert closed_reasons(client.events()) == [CloseReason.HANDSHAKE_TIMEOUT]


# ----------------------------------------------------------------- cookie gate


def test_cookie_gate_is_stateless_until_the_cookie_checks_out(
    client_config: dtls.DtlsClientConfig, server_config: dtls.DtlsServerConfig
) -> None:
    gate = DtlsCookieGate(server_config)
    client = DtlsClientSession(client_config, 0.0)
    [hello] = client.datagrams_to_send()

    first = gate.check(hello, PEER)
    assert not first.accepted and first.reply is not None
    assert records(first.reply)[0][2][0] == 3  # HelloVerifyRequest
    client.receive_datagram(first.reply, 0.0)
    [hello_with_cookie] = client.datagrams_to_send()

    # The cookie is bound to the peer address.
    other = gate.check(hello_with_cookie, dtls.peer_id(("192.0.2.8", 40000)))
    assert not other.accepted and other.reply is not None
    assert gate.check(b"\x17\xfe\xfd" + bytes(40), PEER) == dtls.CookieCheck(False)
    assert gate.check(hello_with_cookie[:40], PEER).reply is None  # truncated ClientHello

    assert gate.check(hello_with_cookie, PEER).accepted
    # Only now does the server allocate a session, which re-reads the same datagram.
    link = Link(client, DtlsServerSession(server_config, PEER, 0.0))
    link.server.receive_datagram(hello_with_cookie, 0.0)
    link.run()
    assert link.client.established and link.server.established
    assert link.server.hello_verify_requests_sent == 0
    assert (gate.accepted, gate.hello_verify_requests_sent, gate.dropped) == (1, 2, 2)


def test_peer_reconnect_from_the_same_address(
    client_config: dtls.DtlsClientConfig, server_config: dtls.DtlsServerConfig
) -> None:
    link = established(client_config, server_config)
    old_server = link.server
    # The enclave restarts and opens a new tunnel from the same address and port.
    client = DtlsClientSession(client_config, 5.0)
    [hello] = client.datagrams_to_send()
    old_server.receive_datagram(hello, 5.0)
    [verify_request] = old_server.datagrams_to_send()  # answered by the cookie gate
    assert old_server.established and old_server.events() == []
    client.receive_datagram(verify_request, 5.0)
    [hello_with_cookie] = client.datagrams_to_send()
    old_server.receive_datagram(hello_with_cookie, 5.0)
    # The old session stays up (the hello may be a replay) and reports the request.
    assert old_server.events() == [dtls.ReconnectRequested(hello_with_cookie)]
    assert old_server.established
    # The caller hands the same datagram to a fresh session.
    new_link = Link(client, DtlsServerSession(server_config, PEER, 5.0), now=5.0)
    new_link.server.receive_datagram(hello_with_cookie, 5.0)
    new_link.run()
    assert new_link.client.established and new_link.server.established
    # A replay of the same hello, later, changes nothing on the old session.
    old_server.receive_datagram(hello_with_cookie, 6.0)
    assert old_server.established
    assert not closed_reasons(old_server.events())


# ----------------------------------------------------------------- helpers


def test_split_datagrams_packs_records_up_to_the_mtu() -> None:
    def record(size: int) -> bytes:
        return b"\x16\xfe\xfd" + bytes(8) + size.to_bytes(2, "big") + b"r" * size

    stream = record(100) + record(200) + record(300) + record(50)
    assert [len(d) for d in dtls._split_datagrams(stream, 350)] == [113 + 213, 313, 63]
    assert dtls._split_datagrams(record(400), 350) == [record(400)]  # oversized stays whole


def test_handshake_clock_follows_mbedtls_timer_protocol() -> None:
    clock = HandshakeClock(10.0)
    assert clock.get() == -1  # cancelled
    clock.set(250, 1000)
    assert clock.get() == 0
    clock.now = 10.25
    assert clock.get() == 1  # intermediate delay passed
    clock.now = 11.0
    assert clock.get() == 2  # expired
    clock.running_forever = True  # established: never expires inside mbed TLS
    assert clock.get() == 0
    clock.running_forever = False
    clock.set(0, 0)
    assert clock.get() == -1


def test_unknown_curve_is_rejected(server_id: Identity) -> None:
    with pytest.raises(ValueError, match="unsupported curve"):
        make_server_config(server_id.cert_pem, server_id.key_pem, curves=("x25519",))


def test_peer_id_packs_address_and_port() -> None:
    assert dtls.peer_id(("127.0.0.1", 12345)) == b"\x7f\x00\x00\x01\x30\x39"
    assert len(dtls.peer_id(("::1", 1, 0, 0))) == 18


# ----------------------------------------------------------------- forged datagrams (issue 14)


def _forged(k: int, epoch: int = 0) -> bytes:
    # A record mbed TLS discards (old epoch, or an already-seen sequence number in the
    # current one) followed by k stray bytes: mbed TLS 2.28 answered it with an
    # internal error, which ended the session.
    return b"\x17\xfe\xfd" + epoch.to_bytes(2, "big") + bytes(6) + b"\x00\x01\x00" + b"x" * k


@pytest.mark.parametrize("record_layer", [True, False], ids=["ours", "mbedtls"])
@pytest.mark.parametrize("victim", ["client", "server"])
def test_one_forged_datagram_never_ends_an_established_session(
    victim: str,
    record_layer: bool,
    client_config: dtls.DtlsClientConfig,
    server_config: dtls.DtlsServerConfig,
) -> None:
    link = Link(
        DtlsClientSession(client_config, 0.0, record_layer=record_layer),
        DtlsServerSession(server_config, PEER, 0.0, record_layer=record_layer),
    )
    link.run()
    session = getattr(link, victim)
    session.events()
    forged = [_forged(k) for k in range(1, 13)]
    # Epoch 1, sequence number 0: the peer's Finished had it, so a replay in mbed TLS's eyes.
    forged += [_forged(k, epoch=1) for k in range(1, 13)]
    for datagram in forged:
        session.receive_datagram(datagram, 1.0)
        assert session.established, datagram.hex()
    assert closed_reasons(session.events()) == []
    assert session.datagrams_ignored == len(forged)
    # The tunnel still carries data both ways.
    link.client.send_record(b"after")
    link.server.send_record(b"reply")
    for datagram in link.client.datagrams_to_send():
        link.server.receive_datagram(datagram, 2.0)
    for datagram in link.server.datagrams_to_send():
        link.client.receive_datagram(datagram, 2.0)
    assert payloads(link.server.events()) == [b"after"]
    assert payloads(link.client.events()) == [b"reply"]


# ----------------------------------------------------------------- our record layer vs mbed TLS's


def _link(
    client_config: dtls.DtlsClientConfig,
    server_config: dtls.DtlsServerConfig,
    *,
    client_rl: bool = True,
    server_rl: bool = True,
    drop: Callable[[str, int, bytes], bool] | None = None,
) -> Link:
    link = Link(
        DtlsClientSession(client_config, 0.0, record_layer=client_rl),
        DtlsServerSession(server_config, PEER, 0.0, record_layer=server_rl),
    )
    if drop is not None:
        link.drop = drop
    link.run()
    assert link.client.established and link.server.established
    link.client_events.clear()
    link.server_events.clear()
    return link


def _deliver(datagrams: Iterable[bytes], dst: Any, now: float = 1.0) -> list[bytes]:
    for datagram in datagrams:
        dst.receive_datagram(datagram, now)
    return payloads(dst.events())


# (client uses our record layer, server uses it): one side on mbed TLS's records.
MIXED = [(False, True), (True, False)]


@pytest.mark.parametrize(
    ("client_rl", "server_rl"), MIXED, ids=["mbedtls-client", "mbedtls-server"]
)
def test_records_interoperate_with_mbedtls_both_ways(
    client_rl: bool,
    server_rl: bool,
    client_config: dtls.DtlsClientConfig,
    server_config: dtls.DtlsServerConfig,
) -> None:
    link = _link(client_config, server_config, client_rl=client_rl, server_rl=server_rl)
    ours = link.server if server_rl else link.client
    theirs = link.client if server_rl else link.server
    assert ours._records is not None and ours._buf is None  # mbed TLS released
    assert theirs._records is None and theirs._buf is not None
    assert not ours._keys.captured and not theirs._keys.captured  # exported keys wiped
    packets = [
        b"\x45",
        b"\x45" + bytes(63),
        bytes(range(256)) * 5 + bytes(120),
        b"\x45" * TUNNEL_MTU,
    ]
    for packet in packets * 3:  # enough records to move both sides' windows
        theirs.send_record(packet)
        ours.send_record(packet[::-1])
    sealed_by_mbedtls = theirs.datagrams_to_send()
    sealed_by_us = ours.datagrams_to_send()
    assert [len(d) for d in sealed_by_us] == [len(d) for d in sealed_by_mbedtls]
    assert _deliver(sealed_by_mbedtls, ours) == packets * 3
    assert _deliver(sealed_by_us, theirs) == [p[::-1] for p in packets * 3]
    assert {r: n for r, n in ours.drops.items() if n} == {}


@pytest.mark.parametrize(
    ("client_rl", "server_rl"), MIXED, ids=["mbedtls-client", "mbedtls-server"]
)
def test_records_that_mbedtls_sealed_are_refused_when_tampered_replayed_or_stale(
    client_rl: bool,
    server_rl: bool,
    client_config: dtls.DtlsClientConfig,
    server_config: dtls.DtlsServerConfig,
) -> None:
    link = _link(client_config, server_config, client_rl=client_rl, server_rl=server_rl)
    ours = link.server if server_rl else link.client
    theirs = link.client if server_rl else link.server
    for i in range(70):
        theirs.send_record(b"packet %d" % i)
    sealed = theirs.datagrams_to_send()
    tampered = bytearray(sealed[0])
    tampered[30] ^= 0x01
    old_epoch = sealed[1][:3] + b"\x00\x00" + sealed[1][5:]
    assert _deliver([bytes(tampered), old_epoch], ours) == []
    assert _deliver(sealed[69:], ours) == [b"packet 69"]
    assert _deliver(sealed[69:], ours) == []  # replay
    assert _deliver(sealed[2:3], ours) == []  # 67 behind the newest: too old
    assert _deliver(sealed[6:7], ours) == [b"packet 6"]  # 63 behind: still in the window
    drops = {r: n for r, n in ours.drops.items() if n}
    assert drops == {
        record.DropReason.BAD_TAG: 1,
        record.DropReason.WRONG_EPOCH: 1,
        record.DropReason.REPLAY: 1,
        record.DropReason.TOO_OLD: 1,
    }
    assert ours.established and ours.datagrams_ignored == 4
    assert ours.events() == []


@pytest.mark.parametrize(
    ("client_rl", "server_rl"), MIXED, ids=["mbedtls-client", "mbedtls-server"]
)
def test_mbedtls_refuses_what_we_sealed_when_tampered_or_replayed(
    client_rl: bool,
    server_rl: bool,
    client_config: dtls.DtlsClientConfig,
    server_config: dtls.DtlsServerConfig,
) -> None:
    link = _link(client_config, server_config, client_rl=client_rl, server_rl=server_rl)
    ours = link.server if server_rl else link.client
    theirs = link.client if server_rl else link.server
    ours.send_record(b"one")
    ours.send_record(b"two")
    first, second = ours.datagrams_to_send()
    tampered = first[:-1] + bytes([first[-1] ^ 1])
    assert _deliver([tampered], theirs) == []
    assert _deliver([first, first, second], theirs) == [b"one", b"two"]
    assert theirs.established and not closed_reasons(theirs.events())


@pytest.mark.parametrize("closer_uses_rl", [True, False])
def test_close_notify_across_record_layers(
    closer_uses_rl: bool, client_config: dtls.DtlsClientConfig, server_config: dtls.DtlsServerConfig
) -> None:
    link = _link(
        client_config, server_config, client_rl=closer_uses_rl, server_rl=not closer_uses_rl
    )
    link.client.close()
    [alert] = link.client.datagrams_to_send()
    assert records(alert)[0][0] == 21
    link.server.receive_datagram(alert, 1.0)
    assert closed_reasons(link.server.events()) == [CloseReason.CLOSE_NOTIFY]


def test_fatal_and_warning_alerts_after_the_handshake(
    client_config: dtls.DtlsClientConfig, server_config: dtls.DtlsServerConfig
) -> None:
    link = established(client_config, server_config)
    client_records = link.client._records
    assert client_records is not None
    warning = client_records.seal(b"\x01\x64", record.CONTENT_ALERT)  # no_renegotiation
    link.server.receive_datagram(warning, 1.0)
    assert link.server.established and link.server.events() == []
    fatal = client_records.seal(b"\x02\x50", record.CONTENT_ALERT)  # internal_error
    link.server.receive_datagram(fatal, 1.0)
    [closed] = of_type(link.server.events(), ConnectionClosed)
    assert closed.reason == CloseReason.FATAL_ALERT and "80" in closed.detail
    assert link.server.drops[record.DropReason.WARNING_ALERT] == 1


def test_renegotiation_is_refused(
    client_config: dtls.DtlsClientConfig, server_config: dtls.DtlsServerConfig
) -> None:
    link = established(client_config, server_config)
    client_records, server_records = link.client._records, link.server._records
    assert client_records is not None and server_records is not None
    # An authenticated ClientHello in epoch 1 (a renegotiation attempt), and a server
    # HelloRequest: dropped, counted, never answered, the session stays up.
    hello = b"\x01" + bytes(11) + b"\xfe\xfd" + bytes(32)
    link.server.receive_datagram(client_records.seal(hello, record.CONTENT_HANDSHAKE), 1.0)
    link.client.receive_datagram(server_records.seal(bytes(12), record.CONTENT_HANDSHAKE), 1.0)
    for side in (link.server, link.client):
        assert side.established and side.events() == [] and side.datagrams_to_send() == []
        assert side.drops[record.DropReason.HANDSHAKE] == 1
    assert link.server.flight_resends == 0


@pytest.mark.parametrize("client_rl", [True, False])
def test_lost_final_flight_is_resent_by_our_record_layer(
    client_rl: bool, client_config: dtls.DtlsClientConfig, server_config: dtls.DtlsServerConfig
) -> None:
    # The server's ChangeCipherSpec+Finished is lost: the client repeats its last
    # flight, and the server (already on our record layer, mbed TLS released) resends
    # its own from what it kept, without sealing anything new.
    link = _link(
        client_config,
        server_config,
        client_rl=client_rl,
        drop=lambda d, n, _b: d == "s2c" and n == 3,
    )
    assert link.server.flight_resends == 1
    assert link.server._buf is None
    # The resent flight is the lost one, byte for byte: ChangeCipherSpec, Finished.
    server_sent = [d for _, direction, d in link.wire if direction == "s2c"]
    [final] = [d for d in server_sent if any(epoch == 1 for _, epoch, _ in records(d))][:1]
    assert server_sent.count(final) == 2
    assert [(t, e) for t, e, _ in records(final)] == [(20, 0), (22, 1)]
    link.client.send_record(b"data")
    assert _deliver(link.client.datagrams_to_send(), link.server) == [b"data"]
    # Once the client sent data it has our Finished: a repeated Finished is refused.
    assert link.server._final_flight is None
    link.server.send_record(b"back")
    assert _deliver(link.server.datagrams_to_send(), link.client) == [b"back"]


def test_keys_are_dropped_when_the_session_ends(
    client_config: dtls.DtlsClientConfig, server_config: dtls.DtlsServerConfig
) -> None:
    link = established(client_config, server_config)
    for side in (link.client, link.server):
        assert not side._keys.captured  # the exported copy was wiped at the hand-over
        assert side._buf is None  # and mbed TLS's went with its context
    server_records = link.server._records
    assert server_records is not None
    link.server.close()
    assert server_records.closed and bytes(server_records._write_salt) == bytes(4)
    [alert] = link.server.datagrams_to_send()
    link.client.receive_datagram(alert, 1.0)
    assert link.client._records is not None and link.client._records.closed


def test_several_records_in_one_datagram_reach_the_session(
    client_config: dtls.DtlsClientConfig, server_config: dtls.DtlsServerConfig
) -> None:
    link = established(client_config, server_config)
    for packet in (b"a", b"b", b"c"):
        link.client.send_record(packet)
    assert _deliver([b"".join(link.client.datagrams_to_send())], link.server) == [b"a", b"b", b"c"]


def test_application_data_right_after_the_finished_is_delivered(
    client_config: dtls.DtlsClientConfig, server_config: dtls.DtlsServerConfig
) -> None:
    # A peer may pack its first application record behind its Finished: mbed TLS has
    # not read it when the handshake completes, so our record layer opens it.
    client = DtlsClientSession(client_config, 0.0)
    server = DtlsServerSession(server_config, PEER, 0.0)
    link = Link(client, server)
    held: list[bytes] = []

    def hold_finished(direction: str, _n: int, datagram: bytes) -> bool:
        if direction == "s2c" and any(e == 1 for _, e, _ in records(datagram)):
            held.append(datagram)
            return True
        return False

    link.drop = hold_finished
    link.pump()
    assert server.established and not client.established and len(held) == 1
    server.send_record(b"early")
    [data] = server.datagrams_to_send()
    client.receive_datagram(held[0] + data, 0.0)
    events = client.events()
    assert client.established
    assert of_type(events, HandshakeComplete) and payloads(events) == [b"early"]
    assert client.datagrams_ignored == 0


def test_a_key_block_that_disagrees_with_ours_fails_the_session_closed(
    monkeypatch: pytest.MonkeyPatch,
    client_config: dtls.DtlsClientConfig,
    server_config: dtls.DtlsServerConfig,
) -> None:
    monkeypatch.setattr(dtls, "derive_key_block", lambda *_args: bytearray(40))
    link = connect(client_config, server_config)
    assert closed_reasons(link.client_events) == [CloseReason.ERROR]
    assert "differs" in of_type(link.client_events, ConnectionClosed)[0].detail
    assert not of_type(link.client_events, HandshakeComplete)
    assert not link.server.established


def test_no_exported_keys_fails_the_session_closed(
    monkeypatch: pytest.MonkeyPatch,
    client_config: dtls.DtlsClientConfig,
    server_config: dtls.DtlsServerConfig,
) -> None:
    @contextlib.contextmanager
    def nowhere(_sink: object) -> Iterator[None]:
        yield

    monkeypatch.setattr(dtls.NativeHandle, "capture_keys", staticmethod(nowhere))
    link = connect(client_config, server_config)
    assert closed_reasons(link.client_events) == [CloseReason.ERROR]
    assert not of_type(link.client_events + link.server_events, HandshakeComplete)


_FUZZ_LINKS: dict[str, Link] = {}


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_no_datagram_ends_an_established_session(
    data: st.DataObject, client_config: dtls.DtlsClientConfig, server_config: dtls.DtlsServerConfig
) -> None:
    if "link" not in _FUZZ_LINKS:
        _FUZZ_LINKS["link"] = established(client_config, server_config)
    link = _FUZZ_LINKS["link"]
    victim = data.draw(st.sampled_from(["client", "server"]))
    session, peer = (link.client, link.server) if victim == "client" else (link.server, link.client)
    peer.send_record(b"genuine")
    [genuine] = peer.datagrams_to_send()
    datagram = bytearray(
        data.draw(
            st.one_of(
                st.binary(max_size=100),
                st.just(genuine),
                st.builds(lambda k: _forged(k), st.integers(1, 12)),
            )
        )
    )
    for _ in range(data.draw(st.integers(0, 3))):
        if datagram:
            datagram[data.draw(st.integers(0, len(datagram) - 1))] = data.draw(st.integers(0, 255))
    datagram += data.draw(st.binary(max_size=13))
    session.receive_datagram(bytes(datagram), 1.0)
    assert not closed_reasons(session.events())
    assert session.established
