"""A scripted, blocking SENG client for protocol tests.

The enclave emulator (seng_fw.lab.enclave) is the real client; tests that need to lose a
message, never open tunnel #2, spoof a source address or replay datagrams drive the same
sans-I/O DTLS sessions by hand through this small wrapper instead.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time
from collections import deque
from ipaddress import IPv4Address

from seng_fw.system.netns import netns_socket
from seng_fw.tunnel.dtls import (
    ConnectionClosed,
    DtlsClientConfig,
    DtlsClientSession,
    HandshakeComplete,
    RecordReceived,
)
from seng_fw.tunnel.messages import IpAssignAck, IpAssignment
from seng_fw.tunnel.packets import inet_checksum


class Conn:
    """One tunnel: a DTLS client session on a connected UDP socket in a namespace."""

    def __init__(
        self,
        netns: str,
        server: tuple[str, int],
        config: DtlsClientConfig,
        bind: tuple[str, int] = ("", 0),
    ) -> None:
        self.sock = netns_socket(netns, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(bind)
            self.sock.connect(server)
        except BaseException:
            self.sock.close()
            raise
        self.session = DtlsClientSession(config, time.monotonic())
        self.records: deque[bytes] = deque()
        self.closed: str | None = None
        self.established = False
        self.sent: list[bytes] = []  # every datagram sent, for replay tests
        self._flush()

    def _flush(self) -> None:
        for datagram in self.session.datagrams_to_send():
            self.sent.append(datagram)
            self.sock.send(datagram)

    def pump(self, timeout: float) -> None:
        """Receive for up to `timeout` seconds (returns early on any event)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            wake = self.session.next_timeout()
            wait = left if wake is None else max(0.0, min(left, wake - time.monotonic()))
            if select.select([self.sock], [], [], wait)[0]:
                with contextlib.suppress(ConnectionRefusedError):
                    self.session.receive_datagram(self.sock.recv(65535), time.monotonic())
            else:
                self.session.handle_timeout(time.monotonic())
            got_event = False
            for event in self.session.events():
                got_event = True
                if isinstance(event, HandshakeComplete):
                    self.established = True
                elif isinstance(event, RecordReceived):
                    self.records.append(event.data)
                elif isinstance(event, ConnectionClosed):
                    self.closed = event.reason
            self._flush()
            if got_event:
                return

    def handshake(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.established and not self.closed and time.monotonic() < deadline:
            self.pump(deadline - time.monotonic())
        return self.established

    def next_record(self, timeout: float = 5.0) -> bytes | None:
        deadline = time.monotonic() + timeout
        while not self.records and not self.closed and time.monotonic() < deadline:
            self.pump(deadline - time.monotonic())
        return self.records.popleft() if self.records else None

    def wait_closed(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self.pump(deadline - time.monotonic())
        return self.closed

    def send(self, record: bytes) -> None:
        self.session.send_record(record)
        self._flush()

    def close(self) -> None:
        """close_notify (unless a test closed the socket to play a dead enclave), then
        the socket. Safe to call again, and after the gateway is gone."""
        if self.sock.fileno() != -1:
            self.session.close()
            with contextlib.suppress(OSError):  # e.g. ECONNREFUSED: no gateway any more
                self._flush()
        self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ScriptedEnclave:
    """Tunnel #1 and #2 of one enclave, driven by hand. `close()` (or leaving a `with`
    block) closes every tunnel it opened, also those replaced by a later open_*()."""

    def __init__(self, netns: str, gateway: tuple[str, int], config: DtlsClientConfig) -> None:
        self.netns = netns
        self.gateway = gateway
        self.config = config
        self.uplink: Conn | None = None
        self.downlink: Conn | None = None
        self.assignment: IpAssignment | None = None
        self._opened: list[Conn] = []

    def _open(self, server: tuple[str, int], bind: tuple[str, int]) -> Conn:
        conn = Conn(self.netns, server, self.config, bind)
        self._opened.append(conn)
        return conn

    def open_uplink(self, local_port: int = 0) -> Conn:
        self.uplink = self._open(self.gateway, ("", local_port))
        return self.uplink

    def take_assignment(self, acknowledge: bool = True, timeout: float = 10.0) -> IpAssignment:
        assert self.uplink is not None
        record = self.uplink.next_record(timeout)
        assert record is not None, f"no IpAssignment (tunnel closed: {self.uplink.closed})"
        self.assignment = IpAssignment.decode(record)
        if acknowledge:
            self.uplink.send(IpAssignAck(self.assignment.ip).encode())
        return self.assignment

    def open_downlink(self) -> Conn:
        assert self.uplink is not None
        local = self.uplink.sock.getsockname()[0]
        gateway = (self.gateway[0], self.gateway[1] + 1)
        self.downlink = self._open(gateway, (local, 0))
        return self.downlink

    def connect(self, timeout: float = 10.0) -> IpAssignment:
        """The whole setup: tunnel #1, assignment + ACK, tunnel #2."""
        assert self.open_uplink().handshake(timeout), "tunnel #1 handshake failed"
        assignment = self.take_assignment(timeout=timeout)
        assert self.open_downlink().handshake(timeout), "tunnel #2 handshake failed"
        return assignment

    def close(self) -> None:
        for conn in self._opened:
            conn.close()

    def __enter__(self) -> ScriptedEnclave:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def udp_packet(src: IPv4Address, dst: IPv4Address, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4/UDP packet (UDP checksum 0: allowed over IPv4)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0x1234, 0, 64, 17, 0, src.packed, dst.packed
    )
    header = header[:10] + struct.pack("!H", inet_checksum(header)) + header[12:]
    return header + udp


def parse_udp(packet: bytes) -> tuple[IPv4Address, IPv4Address, int, int, bytes]:
    """(src, dst, sport, dport, payload) of an IPv4/UDP packet."""
    header_length = (packet[0] & 0x0F) * 4
    sport, dport, _length, _ = struct.unpack("!HHHH", packet[header_length : header_length + 8])
    return (
        IPv4Address(packet[12:16]),
        IPv4Address(packet[16:20]),
        sport,
        dport,
        packet[header_length + 8 :],
    )
