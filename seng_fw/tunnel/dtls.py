"""Sans-I/O DTLS 1.2 sessions for the SENG tunnels, on python-mbedtls buffer mode.

A session never touches a socket or a clock. The caller (an asyncio adapter, a test)
feeds every datagram received from the peer to `receive_datagram(data, now)`, sends
whatever `datagrams_to_send()` returns, collects `events()`, and calls
`handle_timeout(now)` once `now >= next_timeout()`. One application record carries
one IPv4 packet (`send_record`, `RecordReceived`).

Handshake retransmission is mbed TLS's own (RFC 6347 4.2.4: a fresh record sequence
number per retransmission, timer doubling from `hs_timeout_min` to `hs_timeout_max`,
the server answering a repeated client Finished with its last flight). python-mbedtls
drives those timers from the wall clock; `dtls_native` swaps in callbacks that read
the session's `now` instead, so `next_timeout()` is exact and tests can drive time.
On top of mbed TLS's limit a session gives up after `handshake_timeout` seconds in
total (default 60 s).

Server side, the cookie exchange (HelloVerifyRequest, RFC 6347 4.2.1) happens before
any expensive work. `config.cookie_gate` (a `DtlsCookieGate`) answers cookie-less
ClientHellos from unknown addresses without any per-peer state; create a
`DtlsServerSession` only for a datagram the gate accepted, and feed it that datagram.
A `DtlsServerSession` created straight away does the cookie exchange itself too, but
then an unverified (possibly spoofed) source address costs a session: about 46 KiB
resident as measured (python-mbedtls's two 32 KiB ring buffers, mbed TLS's 16.7 KiB
input and output buffers, mostly untouched). Once established, a session on our
record layer has released all of that: about 10 KiB (55 KiB with record_layer=False).

Established sessions seal and open their records with our own record layer
(`record.RecordLayer`, AES-128-GCM on `cryptography`), not mbed TLS's: a quarter of
the CPU per packet (bench/bench_record.py). The hand-over, when mbed TLS reports the
handshake over:
- keys: mbed TLS exports master secret, key block and randoms through its key-export
  callback (`dtls_native`); we derive the key block again with our TLS 1.2 PRF and
  refuse the session (close_notify, ERROR) unless both agree, the suite is one of
  our two AES-128-GCM suites and the PRF is SHA-256. Our copies are zeroed once
  AESGCM holds the keys, and the record layer's when the session ends;
- sequence numbers: ours continue after the highest epoch-1 number mbed TLS used
  (read from its output), and mbed TLS's context is then released, so it can never
  seal under the same key and nonce again (and its copy of the keys goes with it);
- the last flight: a client that lost the server's ChangeCipherSpec+Finished repeats
  its Finished (RFC 6347 4.2.4). The server keeps the datagrams of its last flight
  and resends them byte for byte on every authenticated Finished (at most 16 times),
  until the client's first application record shows it has them;
- records behind the peer's Finished in the same datagram are opened by us; records
  mbed TLS buffered from earlier datagrams are lost like any reordered datagram.
After the hand-over nothing that arrives ends the session except an authenticated
close_notify (CLOSE_NOTIFY) or fatal alert (FATAL_ALERT). Everything else is dropped
and counted by reason (`drops`): bad framing, other epochs, replays, sequence numbers
left of the 64-record window, failed authentication, warning alerts. Handshake
records after the handshake (renegotiation, a HelloRequest) are refused the same way:
dropped, counted, unanswered; the peer's renegotiation times out and the session
goes on. A ClientHello in epoch 0 is still the server's reconnect check (below).

`record_layer=False` keeps mbed TLS's record layer (the benchmark's baseline, and
tests of interoperability with it); its datagrams pass our framing check first,
because mbed TLS 2.28 fails the session on a discarded record with stray bytes
behind it.

Record sizes: `setmtu(DTLS_MTU)` bounds every datagram (handshake flights are
fragmented and packed to it). DTLS_MTU = 1432-byte inner packet + 37 bytes of
record overhead (13 header, 8 explicit GCM nonce, 16 tag) = 1469-byte UDP payload,
i.e. 1497-byte IPv4 datagrams: below a 1500-byte Ethernet MTU.

Not thread-safe: use a session (and sessions of one configuration) from one thread.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias, cast

from cryptography import x509 as cx509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from mbedtls import pk, tls
from mbedtls import x509 as mx509
from mbedtls.exceptions import TLSError

from seng_fw.tunnel.dtls_native import (
    PRF_SHA256,
    ExportedKeys,
    HandshakeClock,
    NativeHandle,
    handshake_state,
    reset_session,
    set_curves,
)
from seng_fw.tunnel.record import (
    ALERT_CLOSE_NOTIFY,
    CLOSE_NOTIFY_ALERT,
    CONTENT_ALERT,
    KEY_LEN,
    SALT_LEN,
    DropReason,
    RecordLayer,
    SequenceExhausted,
    check_framing,
    derive_key_block,
    same_secret,
    zero,
)

TUNNEL_MTU: Final = 1432
# DTLS 1.2 record header (13) + AES-GCM explicit nonce (8) + GCM tag (16).
RECORD_OVERHEAD: Final = 13 + 8 + 16
DTLS_MTU: Final = TUNNEL_MTU + RECORD_OVERHEAD  # 1469-byte UDP payload, 1497-byte IPv4 packet

CIPHER_ECDSA: Final = "TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256"
CIPHER_RSA: Final = "TLS-ECDHE-RSA-WITH-AES-128-GCM-SHA256"
# P-256 first: it costs a fraction of P-384; P-384 because SENG clients may insist on it.
DEFAULT_CURVES: Final = ("secp256r1", "secp384r1")

# mbed TLS's largest input: 16 KiB plaintext + header + expansion (MBEDTLS_SSL_IN_BUFFER_LEN).
MAX_DATAGRAM: Final = 16384 + 13 + 320
_READ_CHUNK: Final = 16384
_MAX_HANDSHAKE_STEPS: Final = 64

# mbed TLS error codes (python-mbedtls reports them as positive `TLSError.err`).
_ERR_PEER_CLOSE_NOTIFY: Final = 0x7880
_ERR_FATAL_ALERT: Final = 0x7780
_ERR_TIMEOUT: Final = 0x6800
_ERR_CLIENT_RECONNECT: Final = 0x6780
_ERR_BAD_HS_CLIENT_HELLO: Final = 0x7900

# Looked up by name: python-mbedtls's stubs type the members as int.
_HANDSHAKE_OVER: Final = tls.HandshakeStep["HANDSHAKE_OVER"]
_HELLO_REQUEST: Final = tls.HandshakeStep["HELLO_REQUEST"]
_SERVER_CERTIFICATE: Final = tls.HandshakeStep["SERVER_CERTIFICATE"]
# Server side: the steps after the client's Certificate message.
_AFTER_CLIENT_CERTIFICATE: Final = frozenset(
    tls.HandshakeStep[name]
    for name in (
        "CLIENT_KEY_EXCHANGE", "CERTIFICATE_VERIFY", "CLIENT_CHANGE_CIPHER_SPEC",
        "CLIENT_FINISHED", "SERVER_CHANGE_CIPHER_SPEC", "SERVER_FINISHED", "FLUSH_BUFFERS",
        "HANDSHAKE_WRAPUP", "HANDSHAKE_OVER",
    )
)  # fmt: skip
_BEFORE_SERVER_HELLO: Final = frozenset(
    tls.HandshakeStep[name] for name in ("HELLO_REQUEST", "CLIENT_HELLO", "SERVER_HELLO")
)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """The handshake is over and the peer passed this layer's checks (server: it sent a
    certificate; client: the server's certificate is the pinned one). Attestation of
    the client certificate is the caller's job."""

    peer_cert_der: bytes
    cipher_suite: str


@dataclass(frozen=True, slots=True)
class RecordReceived:
    """One decrypted application record (one IPv4 packet in SENG)."""

    data: bytes


class CloseReason(enum.StrEnum):
    CLOSE_NOTIFY = "close_notify"  # the peer closed cleanly
    FATAL_ALERT = "fatal_alert"  # the peer sent a fatal alert
    HANDSHAKE_FAILED = "handshake_failed"  # mbed TLS rejected the handshake
    HANDSHAKE_TIMEOUT = "handshake_timeout"  # no handshake within the time limit
    NO_CLIENT_CERTIFICATE = "no_client_certificate"
    SERVER_CERTIFICATE_MISMATCH = "server_certificate_mismatch"
    # A ClientHello with a valid cookie from the same address and port: the peer
    # restarted. Give the datagram that caused it to a fresh session.
    PEER_RECONNECT = "peer_reconnect"
    LOCAL = "local"  # close() was called
    ERROR = "error"  # any other mbed TLS error on an established session


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The session is over; it ignores further input. `detail` is free text for logs."""

    reason: CloseReason
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ReconnectRequested:
    """Server side: a ClientHello with a valid cookie arrived on an established session
    (the peer restarted on the same address and port, or someone replays its hello).
    The session stays established; to let the peer reconnect, feed `client_hello` to a
    fresh session and replace this one only when that handshake completes."""

    client_hello: bytes


DtlsEvent: TypeAlias = HandshakeComplete | RecordReceived | ConnectionClosed | ReconnectRequested


class SessionState(enum.Enum):
    HANDSHAKING = "handshaking"
    ESTABLISHED = "established"
    CLOSED = "closed"


class NotEstablishedError(RuntimeError):
    """send_record() on a session that is not established."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class DtlsTiming:
    """Handshake timers: mbed TLS retransmits after hs_timeout_min, doubling up to
    hs_timeout_max; the session gives up `handshake_timeout` after it started."""

    hs_timeout_min: float = 1.0
    hs_timeout_max: float = 60.0
    handshake_timeout: float = 60.0


def _load_certificates(data: bytes | Sequence[bytes]) -> list[cx509.Certificate]:
    blobs = [data] if isinstance(data, bytes | bytearray) else list(data)
    certs: list[cx509.Certificate] = []
    for blob in blobs:
        # DER starts with a SEQUENCE tag; looking for "-----BEGIN" instead would take a DER
        # DCAP RA-TLS certificate for PEM (its quote embeds the PCK chain as PEM).
        if bytes(blob[:1]) == b"\x30":
            certs.append(cx509.load_der_x509_certificate(bytes(blob)))
        else:
            certs.extend(cx509.load_pem_x509_certificates(bytes(blob)))
    if not certs:
        raise ValueError("no certificate given")
    return certs


def _load_private_key(data: bytes) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    if b"-----BEGIN" in data:
        key = serialization.load_pem_private_key(data, password=None)
    else:
        key = serialization.load_der_private_key(data, password=None)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError(f"unsupported key type {type(key).__name__}; use RSA or ECDSA")
    return key


def _mbedtls_key(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> pk.CipherBase:
    # python-mbedtls's RSA.from_buffer happily wraps an EC key (and ECC.curve misreports
    # curves), so the key type is decided with `cryptography` and passed as DER.
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if isinstance(key, rsa.RSAPrivateKey):
        return pk.RSA.from_DER(der)
    return pk.ECC.from_DER(der)


def _check_key_matches(
    cert: cx509.Certificate, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
) -> None:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise ValueError("the private key does not belong to the (leaf) certificate")


def _dtls_configuration(
    chain: tuple[tuple[mx509.CRT, ...], pk.CipherBase] | None,
    ciphers: tuple[str, ...],
    timing: DtlsTiming,
) -> tls.DTLSConfiguration:
    return tls.DTLSConfiguration(
        certificate_chain=chain,
        ciphers=ciphers,
        lowest_supported_version=tls.DTLSVersion.DTLSv1_2,
        highest_supported_version=tls.DTLSVersion.DTLSv1_2,
        # Client certificates are self-signed RA-TLS certificates: the caller checks
        # the attestation. Server side, "optional" still requests the certificate;
        # a missing one is refused after the handshake (see _on_handshake_over).
        # Client side, the server certificate is pinned by exact DER after the
        # handshake (see DtlsClientConfig).
        validate_certificates=False,
        anti_replay=True,
        handshake_timeout_min=timing.hs_timeout_min,
        handshake_timeout_max=timing.hs_timeout_max,
    )


class _EndpointConfig:
    """What server and client configurations share. Sessions keep their
    configuration alive: mbed TLS holds a pointer into `_curves`, so do not use
    `context` without keeping this object referenced."""

    context: tls.ServerContext | tls.ClientContext
    mtu: int
    timing: DtlsTiming
    read_buffer: bytearray

    def _finish_setup(
        self,
        context: tls.ServerContext | tls.ClientContext,
        curves: Sequence[str],
        mtu: int,
        timing: DtlsTiming,
    ) -> None:
        if not RECORD_OVERHEAD + 64 <= mtu <= MAX_DATAGRAM:
            raise ValueError(f"unusable DTLS MTU {mtu}")
        self.mtu = mtu
        self.timing = timing
        self._curves = set_curves(context, curves)  # the C array mbed TLS points to
        self.read_buffer = bytearray(_READ_CHUNK)  # scratch shared by the sessions


class DtlsServerConfig(_EndpointConfig):
    """One listening endpoint's TLS context. All sessions and the cookie gate of one
    endpoint must share it: the cookie secret lives in the context."""

    context: tls.ServerContext

    def __init__(
        self,
        cert_chain: bytes | Sequence[bytes],
        key: bytes,
        *,
        curves: Sequence[str] = DEFAULT_CURVES,
        mtu: int = DTLS_MTU,
        timing: DtlsTiming | None = None,
    ) -> None:
        certs = _load_certificates(cert_chain)
        private_key = _load_private_key(key)
        _check_key_matches(certs[0], private_key)
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            if private_key.curve.name not in ("secp256r1", "secp384r1"):
                # The key's curve must be one we offer, or mbed TLS finds no usable cert.
                raise ValueError(
                    f"server ECDSA key on {private_key.curve.name}; use P-256 or P-384"
                )
            cipher = CIPHER_ECDSA
        else:
            if private_key.key_size < 2048:
                raise ValueError("server RSA key shorter than 2048 bits")
            cipher = CIPHER_RSA
        self.cipher_suite: str = cipher
        timing = timing or DtlsTiming()
        self.cert_chain_der: tuple[bytes, ...] = tuple(
            c.public_bytes(serialization.Encoding.DER) for c in certs
        )
        chain = (
            tuple(mx509.CRT.from_DER(d) for d in self.cert_chain_der),
            _mbedtls_key(private_key),
        )
        self.context = tls.ServerContext(_dtls_configuration(chain, (cipher,), timing))
        self._finish_setup(self.context, curves, mtu, timing)
        self._cookie_gate: DtlsCookieGate | None = None

    @property
    def cookie_gate(self) -> DtlsCookieGate:
        """The endpoint's stateless cookie check (shared; see DtlsCookieGate)."""
        if self._cookie_gate is None:
            self._cookie_gate = DtlsCookieGate(self)
        return self._cookie_gate


class DtlsClientConfig(_EndpointConfig):
    """An enclave's (or the emulator's) tunnel client configuration.

    The server certificate is pinned by exact DER match, checked when mbed TLS reports
    the handshake over and before HandshakeComplete or any application data: the
    session then sends close_notify and ends with SERVER_CERTIFICATE_MISMATCH. Why not
    a TrustStore holding the pinned certificate: mbed TLS would accept any
    certificate *issued by* the pinned one as well as the pinned one, would add
    validity-period and key-usage checks, and cannot pin a CA-issued certificate
    without trusting its CA. Checking afterwards is sound because mbed TLS verifies
    the ServerKeyExchange signature with the presented certificate's key in every
    authentication mode: a completed handshake with the pinned DER proves the peer
    holds the pinned key. The cost: a wrong server sees our (public) client
    certificate and one CertificateVerify bound to its own transcript.
    """

    context: tls.ClientContext

    def __init__(
        self,
        client_cert: bytes | None,
        client_key: bytes | None,
        pinned_server_cert_der: bytes,
        *,
        curves: Sequence[str] = DEFAULT_CURVES,
        mtu: int = DTLS_MTU,
        timing: DtlsTiming | None = None,
    ) -> None:
        chain: tuple[tuple[mx509.CRT, ...], pk.CipherBase] | None = None
        if client_cert is not None and client_key is not None:
            certs = _load_certificates(client_cert)
            private_key = _load_private_key(client_key)
            _check_key_matches(certs[0], private_key)
            der_chain = tuple(c.public_bytes(serialization.Encoding.DER) for c in certs)
            chain = (tuple(mx509.CRT.from_DER(d) for d in der_chain), _mbedtls_key(private_key))
        elif client_cert is not None or client_key is not None:
            raise ValueError("give both client_cert and client_key, or neither")
        self.pinned_server_cert_der: bytes = _load_certificates(pinned_server_cert_der)[
            0
        ].public_bytes(serialization.Encoding.DER)
        timing = timing or DtlsTiming()
        self.context = tls.ClientContext(
            _dtls_configuration(chain, (CIPHER_ECDSA, CIPHER_RSA), timing)
        )
        self._finish_setup(self.context, curves, mtu, timing)


def make_server_config(
    cert_chain_pem: bytes | Sequence[bytes],
    key_pem: bytes,
    *,
    curves: Sequence[str] = DEFAULT_CURVES,
    mtu: int = DTLS_MTU,
    timing: DtlsTiming | None = None,
) -> DtlsServerConfig:
    """Server configuration; the key type picks the cipher suite (ECDSA P-256/P-384 ->
    ECDHE-ECDSA, RSA >= 2048 -> ECDHE-RSA, both AES-128-GCM-SHA256). PEM or DER;
    leaf certificate first."""
    return DtlsServerConfig(cert_chain_pem, key_pem, curves=curves, mtu=mtu, timing=timing)


def make_client_config(
    client_cert: bytes | None,
    client_key: bytes | None,
    pinned_server_cert_der: bytes,
    *,
    curves: Sequence[str] = DEFAULT_CURVES,
    mtu: int = DTLS_MTU,
    timing: DtlsTiming | None = None,
) -> DtlsClientConfig:
    """Client configuration (RSA or ECDSA client certificate, PEM or DER). A client
    without certificate (None, None) exists only to test the server's refusal."""
    return DtlsClientConfig(
        client_cert, client_key, pinned_server_cert_der, curves=curves, mtu=mtu, timing=timing
    )


def peer_id(address: tuple[str, int] | tuple[str, int, int, int]) -> bytes:
    """Cookie parameter for a UDP peer address: packed IP address + port, so a cookie
    is only valid for the transport address it was sent to."""
    return ipaddress.ip_address(address[0]).packed + address[1].to_bytes(2, "big")


# --------------------------------------------------------------------------- datagrams


def _split_datagrams(data: bytes, mtu: int) -> list[bytes]:
    """Cut mbed TLS's output stream back into datagrams of at most `mtu` bytes, at
    record boundaries (the ring buffer forgets where mbed TLS's datagrams ended; mbed
    TLS sized each record for the MTU, and packing several per datagram is legal)."""
    out: list[bytes] = []
    start = offset = 0
    end = len(data)
    while offset < end:
        if offset + 13 <= end:
            record_end = min(
                end, offset + 13 + int.from_bytes(data[offset + 11 : offset + 13], "big")
            )
        else:
            record_end = end
        if record_end - start > mtu and offset > start:
            out.append(data[start:offset])
            start = offset
        offset = record_end
    if start < end:
        out.append(data[start:end])
    return out


def _looks_like_client_hello(data: bytes) -> bool:
    # DTLS record: type 22 (handshake), version 0xfeXX, epoch 0; message type 1.
    return (
        len(data) >= 25
        and data[0] == 22
        and data[1] == 0xFE
        and data[3:5] == b"\0\0"
        and data[13] == 1
    )


# --------------------------------------------------------------------------- sessions


class _DtlsSession:
    """Shared machinery; see DtlsServerSession and DtlsClientSession."""

    _is_client: bool = False
    # Server side: how often the last flight may be resent after the handshake.
    _MAX_FLIGHT_RESENDS: Final = 16

    def __init__(
        self,
        config: _EndpointConfig,
        buffer: tls.TLSWrappedBuffer,
        now: float,
        record_layer: bool,
    ) -> None:
        self._config = config  # keeps the context and mbed TLS's curve list alive
        # mbed TLS's side of the session: the whole of it with record_layer=False, only
        # the handshake otherwise (released once our RecordLayer takes over).
        self._buf: tls.TLSWrappedBuffer | None = buffer
        self._mtu = mtu = config.mtu
        self._native = NativeHandle(buffer, mtu)  # also sets the buffer's MTU
        self._clock = HandshakeClock(now)
        self._native.install_clock(self._clock)
        self._use_record_layer = record_layer
        self._keys = ExportedKeys()
        if record_layer:
            self._native.install_key_export()
        self._records: RecordLayer | None = None
        # Handshake bookkeeping for the hand-over: the highest epoch-1 sequence number
        # mbed TLS used (ours continue after it), mbed TLS's last output (the server's
        # final flight, resent when the client repeats its Finished) and the datagram
        # being fed (its records after the peer's Finished are ours to open).
        self._hs_out_seq = -1
        self._last_output: list[bytes] = []
        self._final_flight: list[bytes] | None = None
        self._feeding: bytes | None = None
        self.flight_resends = 0
        self._deadline = now + config.timing.handshake_timeout
        self._read_buffer = read_buffer = config.read_buffer
        self._read_view = memoryview(read_buffer)
        # readinto() takes any writable buffer; the stubs say bytes.
        self._readinto = cast("Callable[[bytearray, int], int]", buffer.readinto)
        self._out: list[bytes] = []
        self._events: list[DtlsEvent] = []
        self.state = SessionState.HANDSHAKING
        self.peer_cert_der: bytes | None = None
        self.cipher_suite: str | None = None
        # Counters for metrics; "ignored" = datagrams that yielded nothing (garbage,
        # replays, truncated or stale records). Per-record reasons are in `drops`.
        self.datagrams_in = 0
        self.datagrams_ignored = 0
        self.records_in = 0
        self.records_out = 0

    # ---------------------------------------------------------------- public API

    @property
    def established(self) -> bool:
        return self.state is SessionState.ESTABLISHED

    @property
    def closed(self) -> bool:
        return self.state is SessionState.CLOSED

    @property
    def drops(self) -> dict[DropReason, int]:
        """Records our record layer dropped, by reason (empty before it took over, and
        with record_layer=False)."""
        return dict(self._records.drops) if self._records is not None else {}

    def receive_datagram(self, data: bytes, now: float) -> None:
        """Feed one datagram from the peer. Never raises for bad input."""
        state = self.state
        if state is SessionState.CLOSED:
            return
        self.datagrams_in += 1
        if not 0 < len(data) <= MAX_DATAGRAM:
            self.datagrams_ignored += 1
            return
        if state is SessionState.ESTABLISHED:
            # Data path. Handshake records (content type 22) get a look first.
            if data[0] == 22 and self._intercept_handshake_datagram(data):
                return
            records = self._records
            if records is not None:
                payloads = records.open(data)
                if payloads and not records.handshake and records.peer_alert is None:
                    # The common case: data only.
                    self._final_flight = None  # the peer has our Finished
                    self.records_in += len(payloads)
                    self._events.extend(map(RecordReceived, payloads))
                else:
                    self._after_open(payloads, records)
                return
            # mbed TLS's record path (record_layer=False). Our framing check first:
            # mbed TLS 2.28 fails the session on a record it discards followed by
            # stray bytes (RFC 6347 4.1.2.7: invalid records are silently discarded).
            # One datagram at a time, drained before the next: mbed TLS treats all
            # that sits in its input buffer as one datagram, and drops all of it on a
            # bad record header.
            if not check_framing(data):
                self.datagrams_ignored += 1
                return
            self._tls.receive_from_network(data)
            if not self._read_records():
                self.datagrams_ignored += 1
            return
        if self._screen_handshake_datagram(data):
            self._tls.receive_from_network(data)
            self._clock.now = now
            self._feeding = data
            try:
                self._drive_handshake()
            finally:
                self._feeding = None
        else:
            self.datagrams_ignored += 1

    def datagrams_to_send(self) -> list[bytes]:
        """Datagrams queued for the peer, oldest first (drains the queue)."""
        out, self._out = self._out, []
        return out

    def events(self) -> list[DtlsEvent]:
        """Events since the last call, oldest first (drains the queue)."""
        events, self._events = self._events, []
        return events

    def send_record(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt `data` as one application record in one datagram."""
        if self.state is not SessionState.ESTABLISHED:
            raise NotEstablishedError(f"session is {self.state.value}")
        if len(data) > self._mtu - RECORD_OVERHEAD:
            raise ValueError(f"record of {len(data)} bytes exceeds {self._mtu - RECORD_OVERHEAD}")
        records = self._records
        if records is not None:
            try:
                self._out.append(records.seal(data))
            except SequenceExhausted as exc:
                self._finish(CloseReason.ERROR, str(exc))
                return
            self.records_out += 1
            return
        buf = self._tls
        try:
            queued = buf.write(cast(bytes, data))  # bytes now in the output buffer
        except TLSError as exc:
            self._fail_from_error(exc)
            return
        datagram = buf.peek_outgoing(queued)
        buf.consume_outgoing(queued)
        # Normally exactly our one record; more only if mbed TLS queued something in
        # band since the last call (then cut at record boundaries).
        if queued <= self._mtu:
            self._out.append(datagram)
        else:
            self._out.extend(_split_datagrams(datagram, self._mtu))
        self.records_out += 1

    def close(self) -> None:
        """Queue close_notify (if established) and end the session."""
        if self.state is SessionState.CLOSED:
            return
        if self.state is SessionState.ESTABLISHED:
            self._send_close_notify()
        self._finish(CloseReason.LOCAL)

    def next_timeout(self) -> float | None:
        """When handle_timeout() must be called next (same clock as `now`), or None."""
        if self.state is not SessionState.HANDSHAKING:
            return None
        fin_at = self._clock.fin_at
        return self._deadline if fin_at is None else min(fin_at, self._deadline)

    def handle_timeout(self, now: float) -> None:
        """Retransmit the last flight or give up, as due at `now`."""
        if self.state is not SessionState.HANDSHAKING:
            return
        if now >= self._deadline:
            self._finish(CloseReason.HANDSHAKE_TIMEOUT, "no handshake within the time limit")
            return
        self._clock.now = now
        # mbed TLS checks its timer when it looks for input: an expired timer makes it
        # resend the last flight (or fail with MBEDTLS_ERR_SSL_TIMEOUT after the max).
        self._drive_handshake()

    # ---------------------------------------------------------------- internals

    @property
    def _tls(self) -> tls.TLSWrappedBuffer:
        buf = self._buf
        if buf is None:
            raise RuntimeError("the mbed TLS context was released")
        return buf

    def _drive_handshake(self) -> None:
        """Step the handshake until it needs another datagram or is over. One
        do_handshake() is one state of mbed TLS's state machine, so stopping earlier
        would stall the handshake until the peer retransmits."""
        buf = self._tls
        with self._native.capture_keys(self._keys):
            for _ in range(_MAX_HANDSHAKE_STEPS):
                try:
                    buf.do_handshake()
                except tls.WantReadError:
                    break
                except tls.WantWriteError:
                    pass  # a flight is queued in the output buffer; collected below
                except tls.HelloVerifyRequest:
                    self._on_hello_verify_request()
                    return
                except TLSError as exc:
                    if self._is_noise(exc):
                        self._drop_noise()
                        return
                    self._collect_output()  # mbed TLS may have queued a fatal alert
                    self._fail_from_error(exc)
                    return
                if handshake_state(buf) is _HANDSHAKE_OVER:
                    break
            else:
                self._finish(CloseReason.HANDSHAKE_FAILED, "handshake made no progress")
                return
        self._collect_output()
        if handshake_state(buf) is _HANDSHAKE_OVER:
            self._on_handshake_over()

    # Hooks for the server side.

    def _intercept_handshake_datagram(self, data: bytes) -> bool:
        """Established session, datagram starting with a handshake record: True if
        handled here, False to give it to the record layer."""
        return False

    def _screen_handshake_datagram(self, data: bytes) -> bool:
        """Handshaking session: False to ignore the datagram without mbed TLS."""
        return True

    def _on_hello_verify_request(self) -> None:
        # Only a server raises it; python-mbedtls reset the buffer anyway.
        self._finish(CloseReason.HANDSHAKE_FAILED, "unexpected HelloVerifyRequest")

    def _is_noise(self, exc: TLSError) -> bool:
        """Whether a handshake error only means "that datagram was junk"."""
        return False

    def _drop_noise(self) -> None:
        raise NotImplementedError

    def _check_peer(self, peer_cert_der: bytes | None) -> tuple[CloseReason, str] | None:
        raise NotImplementedError

    def _on_handshake_over(self) -> None:
        buf = self._tls
        peer: bytes | None = buf.getpeercert(binary_form=True)
        refusal = self._check_peer(peer)
        if refusal is not None:
            self._send_close_notify()
            self._finish(*refusal)
            return
        assert peer is not None
        cipher_suite = str(buf.cipher())
        records: RecordLayer | None = None
        if self._use_record_layer:
            try:
                records = self._record_layer_from_keys(cipher_suite)
            except _HandOverError as exc:
                self._send_close_notify()
                self._finish(CloseReason.ERROR, str(exc))
                return
        self.state = SessionState.ESTABLISHED
        # mbed TLS must never time out an established session (see HandshakeClock).
        self._clock.running_forever = True
        self.peer_cert_der = peer
        self.cipher_suite = cipher_suite
        self._events.append(HandshakeComplete(peer, self.cipher_suite))
        if records is None:
            self._keys.wipe()  # exported all the same (the configuration is shared)
            # Application records that came with or before the last handshake message.
            self._read_records()
            return
        self._records = records
        flight = self._last_output
        if not self._is_client and any(_max_seq_of_epoch(d, 1) >= 0 for d in flight):
            # The server's full handshake ends with its ChangeCipherSpec+Finished (no
            # resumption here: sessions never offer one), sent in this very step.
            self._final_flight = flight
        self._last_output = []
        # From here on mbed TLS never sees or sends another record: release it (its
        # copy of the keys goes with it).
        self._release_mbedtls()
        # Records of this datagram after the peer's Finished are application data
        # mbed TLS has not read: ours to open (the Finished itself only fills the
        # replay window). Anything mbed TLS buffered from earlier datagrams (records
        # that overtook the Finished) is lost, like any reordered datagram.
        data = self._feeding
        start = _first_record_of_epoch(data, records.epoch) if data else None
        if data and start is not None:
            payloads = records.open(data[start:])
            records.handshake.clear()
            if payloads or records.peer_alert is not None:
                self._after_open(payloads, records)

    def _record_layer_from_keys(self, cipher_suite: str) -> RecordLayer:
        """Our record layer from the keys mbed TLS exported; mbed TLS's copy of them
        is checked against our own derivation, and ours wiped once AESGCM has them."""
        keys = self._keys
        try:
            if not keys.captured:
                raise _HandOverError("mbed TLS exported no keys")
            if cipher_suite not in (CIPHER_ECDSA, CIPHER_RSA):
                raise _HandOverError(f"no record layer for {cipher_suite}")
            if keys.prf_type != PRF_SHA256 or (keys.maclen, keys.keylen, keys.ivlen) != (
                0,
                KEY_LEN,
                SALT_LEN,
            ):
                raise _HandOverError("unexpected key layout from mbed TLS")
            block = derive_key_block(keys.master_secret, keys.client_random, keys.server_random)
            try:
                if not same_secret(block, keys.key_block):
                    raise _HandOverError("key block differs from mbed TLS's")
                return RecordLayer.from_key_block(
                    block, is_client=self._is_client, write_seq=self._hs_out_seq + 1
                )
            finally:
                zero(block)
        finally:
            keys.wipe()

    def _release_mbedtls(self) -> None:
        self._buf = None
        self._readinto = _released_readinto

    def _after_open(self, payloads: list[bytes], records: RecordLayer) -> None:
        """What RecordLayer.open found besides (or instead of) application data."""
        useful = bool(payloads)
        if payloads:
            self._final_flight = None
            self.records_in += len(payloads)
            self._events.extend(map(RecordReceived, payloads))
        for message in records.handshake:
            # Server: the client repeats its Finished because ours was lost (RFC 6347
            # 4.2.4): resend our last flight, byte for byte (no new nonce is used;
            # a client that got it drops the copy as a replay). Anything else, e.g. a
            # renegotiation attempt, is refused: dropped and counted.
            flight = self._final_flight
            if (
                message[:1] == b"\x14"  # Finished
                and flight is not None
                and self.flight_resends < self._MAX_FLIGHT_RESENDS
            ):
                self._out.extend(flight)
                self.flight_resends += 1
                useful = True
            else:
                records.drops[DropReason.HANDSHAKE] += 1
        alert = records.peer_alert
        if alert is not None:
            level, description = alert
            if description == ALERT_CLOSE_NOTIFY:
                self._finish(CloseReason.CLOSE_NOTIFY)
            else:
                self._finish(
                    CloseReason.FATAL_ALERT, f"alert level {level} description {description}"
                )
            return
        if not useful:
            self.datagrams_ignored += 1

    def _read_records(self) -> bool:
        """mbed TLS's record path: decrypt every record of the datagram just fed;
        True if any was delivered."""
        readinto = self._readinto
        chunk = self._read_buffer
        delivered = False
        while True:
            try:
                n = readinto(chunk, _READ_CHUNK)
            except tls.WantReadError:
                # Records that fail authentication, replays, stale epochs and bad
                # headers all end here: mbed TLS drops them silently in DTLS.
                break
            except tls.RaggedEOF:
                # An empty application record: nothing to deliver.
                if not self._native.has_pending():
                    break
                continue
            except TLSError as exc:
                self._fail_from_error(exc)
                break
            self._events.append(RecordReceived(self._read_view[:n].tobytes()))
            self.records_in += 1
            delivered = True
            # Skip the extra call (and its exception) when the datagram is exhausted.
            if not self._native.has_pending():
                break
        if not delivered:
            # mbed TLS answers some non-data records in band: the server re-sends its
            # last flight when the client repeats its Finished (ours was lost); a
            # ClientHello from a restarted peer gets a HelloVerifyRequest.
            self._collect_output()
        return delivered

    def _collect_output(self) -> None:
        buf = self._tls
        data = buf.peek_outgoing(1 << 20)
        if data:
            buf.consume_outgoing(len(data))
            mtu = self._mtu
            datagrams = [data] if len(data) <= mtu else _split_datagrams(data, mtu)
            self._out.extend(datagrams)
            if self.state is SessionState.HANDSHAKING:
                self._last_output = datagrams
                self._hs_out_seq = max(self._hs_out_seq, _max_seq_of_epoch(data, 1))

    def _send_close_notify(self) -> None:
        records = self._records
        if records is not None:
            if not records.closed:
                self._out.append(records.seal(CLOSE_NOTIFY_ALERT, CONTENT_ALERT))
            return
        if self._buf is None:
            return
        try:
            self._buf.shutdown()
        except TLSError:
            return
        self._collect_output()

    def _fail_from_error(self, exc: TLSError) -> None:
        code = getattr(exc, "err", None) or 0  # missing from python-mbedtls's stubs
        if code == _ERR_PEER_CLOSE_NOTIFY:
            self._finish(CloseReason.CLOSE_NOTIFY)
        elif code == _ERR_FATAL_ALERT:
            self._finish(CloseReason.FATAL_ALERT, exc.msg)
        elif code == _ERR_CLIENT_RECONNECT:
            # mbed TLS's own reconnect detection (normally pre-empted by
            # DtlsServerSession._intercept_handshake_datagram).
            self._finish(CloseReason.PEER_RECONNECT)
        elif self.state is SessionState.HANDSHAKING:
            reason = (
                CloseReason.HANDSHAKE_TIMEOUT
                if code == _ERR_TIMEOUT
                else CloseReason.HANDSHAKE_FAILED
            )
            self._finish(reason, exc.msg)
        else:
            self._finish(CloseReason.ERROR, exc.msg)

    def _finish(self, reason: CloseReason, detail: str = "") -> None:
        self.state = SessionState.CLOSED
        self._clock.fin_at = None
        # Keys go with the session: ours, and mbed TLS's with its context.
        if self._records is not None:
            self._records.wipe()
        self._keys.wipe()
        self._final_flight = None
        self._last_output = []
        self._events.append(ConnectionClosed(reason, detail))


class _HandOverError(Exception):
    """The handshake's keys cannot be taken over (fails the session closed)."""


def _released_readinto(_buffer: bytearray, _size: int) -> int:
    raise RuntimeError("the mbed TLS context was released")


def _max_seq_of_epoch(data: bytes, epoch: int) -> int:
    """Highest sequence number of the records of `epoch` in `data` (-1 if none)."""
    highest = -1
    offset, end = 0, len(data)
    while offset + 13 <= end:
        if int.from_bytes(data[offset + 3 : offset + 5], "big") == epoch:
            highest = max(highest, int.from_bytes(data[offset + 5 : offset + 11], "big"))
        offset += 13 + int.from_bytes(data[offset + 11 : offset + 13], "big")
    return highest


def _first_record_of_epoch(data: bytes, epoch: int) -> int | None:
    """Offset of the first record of `epoch` in `data`, if any."""
    offset, end = 0, len(data)
    while offset + 13 <= end:
        if int.from_bytes(data[offset + 3 : offset + 5], "big") == epoch:
            return offset
        offset += 13 + int.from_bytes(data[offset + 11 : offset + 13], "big")
    return None


class DtlsServerSession(_DtlsSession):
    """Server side of one tunnel, one per peer transport address.

    The first ClientHello without a valid cookie is answered with a
    HelloVerifyRequest; python-mbedtls then resets the buffer, and we set the cookie
    parameter again and keep the same buffer for the retry.

    Until a ServerHello went out (the cookie checked out) the session has no
    handshake state worth keeping, and mbed TLS parses that first record by hand:
    anything but a ClientHello would end the handshake. So in that phase datagrams
    that are not ClientHellos are ignored, and a malformed ClientHello only resets
    the buffer, unanswered (we talk to unverified addresses with HelloVerifyRequests
    only).
    """

    def __init__(
        self, config: DtlsServerConfig, peer: bytes, now: float, *, record_layer: bool = True
    ) -> None:
        if not peer:
            raise ValueError("peer id must not be empty (it keys the cookie)")
        buffer = config.context.wrap_buffers()
        super().__init__(config, buffer, now, record_layer)
        self._server_config = config
        self._peer = peer
        self._hello_done = False  # a ServerHello was sent: the cookie was valid
        self.hello_verify_requests_sent = 0
        buffer.setcookieparam(peer)

    @property
    def client_certificate_received(self) -> bool:
        """The handshake got past the client's Certificate message (or is over)."""
        if self.state is not SessionState.HANDSHAKING:
            return self.state is SessionState.ESTABLISHED
        buf = self._buf
        return buf is not None and handshake_state(buf) in _AFTER_CLIENT_CERTIFICATE

    def _screen_handshake_datagram(self, data: bytes) -> bool:
        # Before the cookie checked out, only ClientHellos may reach mbed TLS.
        return self._hello_done or _looks_like_client_hello(data)

    def _intercept_handshake_datagram(self, data: bytes) -> bool:
        """A ClientHello on an established session: the peer restarted from the same
        address and port, or someone forges one. mbed TLS would check it itself
        (MBEDTLS_SSL_DTLS_CLIENT_PORT_REUSE), but a malformed one makes it fail the
        whole session; the cookie gate does the same check harmlessly. Other
        handshake records (the client repeating its last flight) go to mbed TLS."""
        if not _looks_like_client_hello(data):
            return False
        verdict = self._server_config.cookie_gate.check(data, self._peer)
        if verdict.accepted:
            # A valid cookie proves little here: a ClientHello replayed within the
            # cookie's lifetime carries one too. So this session stays up (RFC 6347
            # 4.2.8: keep the association until a new handshake completes); the caller
            # may run the new handshake in a fresh session and switch once it completes.
            self.datagrams_ignored += 1
            self._events.append(ReconnectRequested(data))
            return True
        self.datagrams_ignored += 1
        if verdict.reply is not None:
            self._out.append(verdict.reply)
        return True

    def _drive_handshake(self) -> None:
        super()._drive_handshake()
        if not self._hello_done and self._buf is not None:
            self._hello_done = handshake_state(self._buf) not in _BEFORE_SERVER_HELLO

    def _on_hello_verify_request(self) -> None:
        self._collect_output()
        self._tls.setcookieparam(self._peer)  # the reset forgot it
        self.hello_verify_requests_sent += 1

    def _is_noise(self, exc: TLSError) -> bool:
        code = getattr(exc, "err", None)
        return not self._hello_done and code == _ERR_BAD_HS_CLIENT_HELLO

    def _drop_noise(self) -> None:
        # python-mbedtls reset the buffer: drop its alert, restore the cookie parameter.
        buf = self._tls
        buf.consume_outgoing(len(buf.peek_outgoing(1 << 16)))
        buf.setcookieparam(self._peer)
        self.datagrams_ignored += 1

    def _check_peer(self, peer_cert_der: bytes | None) -> tuple[CloseReason, str] | None:
        if not peer_cert_der:
            return CloseReason.NO_CLIENT_CERTIFICATE, "the client sent no certificate"
        return None


class DtlsClientSession(_DtlsSession):
    """Client side of one tunnel; the ClientHello is queued on creation."""

    _is_client = True

    def __init__(self, config: DtlsClientConfig, now: float, *, record_layer: bool = True) -> None:
        super().__init__(config, config.context.wrap_buffers(None), now, record_layer)
        self._pinned = config.pinned_server_cert_der
        self._drive_handshake()

    def _check_peer(self, peer_cert_der: bytes | None) -> tuple[CloseReason, str] | None:
        if peer_cert_der != self._pinned:
            return (
                CloseReason.SERVER_CERTIFICATE_MISMATCH,
                "server certificate is not the pinned one",
            )
        return None


# --------------------------------------------------------------------------- cookie gate


@dataclass(frozen=True, slots=True)
class CookieCheck:
    """Verdict of DtlsCookieGate.check: if `accepted`, create a DtlsServerSession for
    the peer and feed it the same datagram; else send `reply` (a HelloVerifyRequest)
    back if there is one, and forget the datagram."""

    accepted: bool
    reply: bytes | None = None


class DtlsCookieGate:
    """Stateless front door for datagrams from unknown addresses.

    One shared mbed TLS buffer runs the server handshake only up to the ServerHello
    decision, which is where mbed TLS checks the cookie (an HMAC of the peer id with
    a per-context secret): a cookie-less or stale ClientHello gets a
    HelloVerifyRequest and the buffer is reset; a valid one is accepted (the cookie
    stays valid, 60 s by default, for the session that re-reads it). Nothing is kept
    per peer, and the ECDHE/signature work only starts in the real session.
    """

    def __init__(self, config: DtlsServerConfig) -> None:
        self._buf = config.context.wrap_buffers()
        self._buf.setmtu(config.mtu)
        self.hello_verify_requests_sent = 0
        self.accepted = 0
        self.dropped = 0

    def check(self, data: bytes, peer: bytes) -> CookieCheck:
        if not peer:
            raise ValueError("peer id must not be empty (it keys the cookie)")
        if len(data) > MAX_DATAGRAM or not _looks_like_client_hello(data):
            self.dropped += 1
            return CookieCheck(False)
        buf = self._buf
        buf.setcookieparam(peer)
        buf.receive_from_network(data)
        verdict = CookieCheck(False)
        for _ in range(4):  # HELLO_REQUEST -> CLIENT_HELLO -> SERVER_HELLO -> decision
            try:
                buf.do_handshake()
            except tls.WantReadError:
                break  # not a whole ClientHello
            except tls.WantWriteError:
                pass
            except tls.HelloVerifyRequest:
                # python-mbedtls reset the buffer; the HelloVerifyRequest is queued.
                verdict = CookieCheck(False, buf.peek_outgoing(1 << 16))
                break
            except TLSError:
                break  # malformed; python-mbedtls reset the buffer
            if handshake_state(buf) is _SERVER_CERTIFICATE:
                verdict = CookieCheck(True)  # the ServerHello is written: cookie valid
                break
        buf.consume_outgoing(len(buf.peek_outgoing(1 << 16)))
        if handshake_state(buf) is not _HELLO_REQUEST:
            reset_session(buf)  # forget this ClientHello
        if verdict.accepted:
            self.accepted += 1
        elif verdict.reply:
            self.hello_verify_requests_sent += 1
        else:
            self.dropped += 1
        return verdict
