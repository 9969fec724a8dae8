"""Many scripted SENG enclaves joining a lab gateway at once from client host B (tunnel
#1, IpAssignment, tunnel #2), kept open afterwards as idle tunnels. Shared by the
benchmarks that measure admission (bench_tunnel.py, bench_datapath.py)."""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from dataclasses import dataclass, field

from seng_fw.lab.lab import DEMO_WEBAPP, GATEWAY_PORT, EnclaveSpec, Lab
from seng_fw.lab.topology import CLIENT_B
from seng_fw.system.netns import netns_socket
from seng_fw.tunnel.dtls import (
    DtlsClientConfig,
    DtlsClientSession,
    HandshakeComplete,
    RecordReceived,
    make_client_config,
)
from seng_fw.tunnel.messages import IpAssignAck, IpAssignment


@dataclass
class Joiner:
    """One scripted enclave joining: tunnel #1, assignment, tunnel #2 (then left idle)."""

    config: DtlsClientConfig
    sock: socket.socket
    session: DtlsClientSession
    started: float
    stage: str = "uplink"
    finished: float | None = None
    downlink: DtlsClientSession | None = None
    down_sock: socket.socket | None = None


@dataclass
class Crowd:
    """Scripted enclaves from client host B, kept open so their tunnels stay idle."""

    lab: Lab
    name: str = "crowd"  # the enclaves' names: crowd0, crowd1, ...
    joiners: list[Joiner] = field(default_factory=list)
    certificates: list[DtlsClientConfig] = field(default_factory=list)

    def prepare(self, count: int) -> None:
        server_pem = (self.lab.state_dir / "server.pem").read_bytes()
        for i in range(len(self.certificates), count):
            spec = EnclaveSpec(f"{self.name}{i}", CLIENT_B, DEMO_WEBAPP)
            cert, key = self.lab.enclave_credentials(spec)
            self.certificates.append(
                make_client_config(cert.read_bytes(), key.read_bytes(), server_pem)
            )

    def _socket(self, port: int) -> socket.socket:
        sock = netns_socket(self.lab.ns(CLIENT_B), socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect((str(self.lab.gateway_lan), port))
        return sock

    def join(self, count: int, timeout: float) -> tuple[list[float], float]:
        """`count` more enclaves join at once; their join times (first datagram to tunnel
        #2 up) and the wall time until the last one is up."""
        self.prepare(len(self.joiners) + count)
        configs = self.certificates[len(self.joiners) : len(self.joiners) + count]
        selector = selectors.DefaultSelector()
        fresh: list[Joiner] = []

        def flush(sock: socket.socket, session: DtlsClientSession) -> None:
            for datagram in session.datagrams_to_send():
                with contextlib.suppress(OSError):
                    sock.send(datagram)

        begin = time.monotonic()
        for config in configs:
            sock, now = self._socket(GATEWAY_PORT), time.monotonic()
            joiner = Joiner(config, sock, DtlsClientSession(config, now), now)
            fresh.append(joiner)
            selector.register(sock, selectors.EVENT_READ, (joiner, "up"))
            flush(sock, joiner.session)
        pending, deadline = count, begin + timeout
        while pending and time.monotonic() < deadline:
            for key, _ in selector.select(0.05):
                joiner, which = key.data
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                session = joiner.session if which == "up" else joiner.downlink
                assert session is not None
                try:
                    session.receive_datagram(ready.recv(65535), time.monotonic())
                except OSError:
                    continue
                for event in session.events():
                    if which == "up" and isinstance(event, RecordReceived):
                        if joiner.stage != "uplink":
                            continue
                        assignment = IpAssignment.decode(event.data)
                        session.send_record(IpAssignAck(assignment.ip).encode())
                        joiner.stage = "downlink"
                        joiner.down_sock = self._socket(GATEWAY_PORT + 1)
                        joiner.downlink = DtlsClientSession(joiner.config, time.monotonic())
                        selector.register(joiner.down_sock, selectors.EVENT_READ, (joiner, "down"))
                        flush(joiner.down_sock, joiner.downlink)
                    elif which == "down" and isinstance(event, HandshakeComplete):
                        joiner.finished, joiner.stage = time.monotonic(), "done"
                        pending -= 1
                flush(ready, session)
            now = time.monotonic()
            for joiner in fresh:  # handshake retransmissions
                pairs = ((joiner.session, joiner.sock), (joiner.downlink, joiner.down_sock))
                for retry_session, retry_sock in pairs:
                    if retry_session is None or retry_sock is None:
                        continue
                    wake = retry_session.next_timeout()
                    if wake is not None and now >= wake:
                        retry_session.handle_timeout(now)
                        flush(retry_sock, retry_session)
        wall = time.monotonic() - begin
        selector.close()
        self.joiners.extend(fresh)
        return [j.finished - j.started for j in fresh if j.finished is not None], wall

    def up(self) -> list[Joiner]:
        return [j for j in self.joiners if j.finished is not None]

    def close(self) -> None:
        for joiner in self.joiners:
            for session, sock in ((joiner.session, joiner.sock),
                                  (joiner.downlink, joiner.down_sock)):  # fmt: skip
                if session is None or sock is None:
                    continue
                session.close()
                for datagram in session.datagrams_to_send():
                    with contextlib.suppress(OSError):
                        sock.send(datagram)
                sock.close()
        self.joiners.clear()
