"""Many scripted SENG enclaves joining a lab gateway at once from client host B (tunnel
#1, IpAssignment, tunnel #2), kept open afterwards as idle tunnels. Shared by the
benchmarks that measure admission (bench_tunnel.py, bench_datapath.py).

The client side of a handshake costs about as much CPU as the gateway's (ECDHE, the
server's signature, a P-384 CertificateVerify in mbed TLS), so one process running
all the clients measures itself as much as the gateway. The crowd therefore runs in
`processes` worker processes (forked; each keeps its own enclaves' sessions and
sockets until `close()`), and everything that is not the join itself happens before
the clock starts: certificates and keys (`prepare`), DTLS configurations and sockets
(each worker's "ready"). Each join reports the workers' CPU time (`cpu_seconds`), so a
benchmark can say whether the client side was the bottleneck.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import selectors
import socket
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from seng_fw.gateway.limits import LimitsConfig
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

READY_TIMEOUT = 600.0  # a worker building its configurations and sockets

# gateway.yaml `limits:` for a crowd from one client host: that host's limits become
# the totals (the defaults, 20 handshakes/s with bursts of 5 and 16 half-open or
# waiting per source, would admit 10 enclaves a second), and the total handshake rate
# (100/s) is lifted too. Benchmarks that use this say so in their output.
CROWD_LIMITS: dict[str, Any] = {
    "handshake_rate_per_host": 100_000.0,
    "handshake_burst_per_host": 10_000,
    "handshake_rate": 100_000.0,
    "handshake_burst": 10_000,
    "max_half_open_per_source": LimitsConfig().max_queued_handshakes,  # caps its queue too
}


@dataclass
class Joined:
    """One enclave of the crowd: when its first datagram left, when tunnel #2 was up."""

    name: str
    started: float | None = None
    finished: float | None = None


@dataclass
class _Joiner:
    config: DtlsClientConfig
    sock: socket.socket
    down_sock: socket.socket
    session: DtlsClientSession | None = None
    downlink: DtlsClientSession | None = None
    started: float | None = None
    finished: float | None = None
    stage: str = "uplink"


@dataclass
class _Client:
    """A worker's side: its enclaves, joined on command (runs in the worker process)."""

    netns: str
    gateway: str
    server_pem: bytes
    joiners: list[_Joiner] = field(default_factory=list)

    def _socket(self, port: int) -> socket.socket:
        sock = netns_socket(self.netns, socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect((self.gateway, port))
        return sock

    def prepare(self, credentials: list[tuple[bytes, bytes]]) -> list[_Joiner]:
        return [
            _Joiner(
                make_client_config(cert, key, self.server_pem),
                self._socket(GATEWAY_PORT),
                self._socket(GATEWAY_PORT + 1),
            )
            for cert, key in credentials
        ]

    def join(self, fresh: list[_Joiner], timeout: float) -> None:
        selector = selectors.DefaultSelector()

        def flush(sock: socket.socket, session: DtlsClientSession) -> None:
            for datagram in session.datagrams_to_send():
                with contextlib.suppress(OSError):
                    sock.send(datagram)

        for joiner in fresh:
            joiner.started = now = time.monotonic()
            joiner.session = DtlsClientSession(joiner.config, now)
            selector.register(joiner.sock, selectors.EVENT_READ, (joiner, "up"))
            flush(joiner.sock, joiner.session)
        pending, deadline = len(fresh), time.monotonic() + timeout
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
                    if retry_session is None:
                        continue
                    wake = retry_session.next_timeout()
                    if wake is not None and now >= wake:
                        retry_session.handle_timeout(now)
                        flush(retry_sock, retry_session)
        selector.close()

    def close(self) -> None:
        for joiner in self.joiners:
            for session, sock in ((joiner.session, joiner.sock),
                                  (joiner.downlink, joiner.down_sock)):  # fmt: skip
                if session is not None:
                    session.close()
                    for datagram in session.datagrams_to_send():
                        with contextlib.suppress(OSError):
                            sock.send(datagram)
                sock.close()
        self.joiners.clear()


def _worker(pipe: Connection, client: _Client) -> None:
    """Commands: ("prepare", credentials) -> "ready"; ("go", timeout) -> (times, cpu);
    ("close",) -> closes the tunnels and ends."""
    fresh: list[_Joiner] = []
    while True:
        command = pipe.recv()
        if command[0] == "prepare":
            fresh = client.prepare(command[1])
            pipe.send("ready")
        elif command[0] == "go":
            cpu = time.process_time()
            client.join(fresh, command[1])
            cpu = time.process_time() - cpu
            client.joiners.extend(fresh)
            pipe.send(([(j.started, j.finished) for j in fresh], cpu))
            fresh = []
        else:
            client.close()
            pipe.send("closed")
            return


@dataclass
class Crowd:
    """Scripted enclaves from client host B, kept open so their tunnels stay idle."""

    lab: Lab
    name: str = "crowd"  # the enclaves' names: crowd0, crowd1, ...
    processes: int = 2  # worker processes running the clients' handshakes
    joiners: list[Joined] = field(default_factory=list)
    credentials: list[tuple[bytes, bytes]] = field(default_factory=list)
    cpu_seconds: float = 0.0  # the workers' CPU time during the last join
    _workers: list[tuple[BaseProcess, Connection]] = field(default_factory=list)

    def prepare(self, count: int) -> None:
        """Certificates and keys of the first `count` enclaves (not part of a join)."""
        for i in range(len(self.credentials), count):
            spec = EnclaveSpec(f"{self.name}{i}", CLIENT_B, DEMO_WEBAPP)
            cert, key = self.lab.enclave_credentials(spec)
            self.credentials.append((cert.read_bytes(), key.read_bytes()))

    def _start_workers(self) -> None:
        context = multiprocessing.get_context("fork")
        client = _Client(
            self.lab.ns(CLIENT_B),
            str(self.lab.gateway_lan),
            (self.lab.state_dir / "server.pem").read_bytes(),
        )
        for _ in range(self.processes):
            ours, theirs = context.Pipe()
            process = context.Process(target=_worker, args=(theirs, client), daemon=True)
            process.start()
            theirs.close()
            self._workers.append((process, ours))

    def _ask(self, pipe: Connection, timeout: float) -> Any:
        if not pipe.poll(timeout):
            raise RuntimeError("a crowd worker did not answer")
        return pipe.recv()

    def join(self, count: int, timeout: float) -> tuple[list[float], float]:
        """`count` more enclaves join at once; their join times (first datagram to tunnel
        #2 up) and the wall time from the start until the last one was up (`timeout`
        if some were not). Configurations and sockets are made before the start."""
        first = len(self.joiners)
        self.prepare(first + count)
        if not self._workers:
            self._start_workers()
        new = self.credentials[first : first + count]
        shares = [new[i :: len(self._workers)] for i in range(len(self._workers))]
        for (_, pipe), share in zip(self._workers, shares, strict=True):
            pipe.send(("prepare", share))
        for _, pipe in self._workers:
            self._ask(pipe, READY_TIMEOUT)
        begin = time.monotonic()
        for _, pipe in self._workers:
            pipe.send(("go", timeout))
        results = [self._ask(pipe, timeout + READY_TIMEOUT) for _, pipe in self._workers]
        self.cpu_seconds = sum(cpu for _, cpu in results)
        fresh: list[Joined] = []
        for i, (times, _) in enumerate(results):
            for j, (started, finished) in enumerate(times):
                name = f"{self.name}{first + i + j * len(results)}"
                fresh.append(Joined(name, started, finished))
        self.joiners.extend(fresh)
        done = [(j.started, j.finished) for j in fresh if j.started and j.finished]
        joined = [finished - started for started, finished in done]
        wall = max(f for _, f in done) - begin if len(done) == count and done else timeout
        return joined, wall

    def up(self) -> list[Joined]:
        return [j for j in self.joiners if j.finished is not None]

    def close(self) -> None:
        for process, pipe in self._workers:
            with contextlib.suppress(OSError, EOFError, RuntimeError):
                pipe.send(("close",))
                self._ask(pipe, 30.0)
            process.join(10.0)
            if process.is_alive():
                process.kill()
                process.join()
            pipe.close()
        self._workers.clear()
        self.joiners.clear()
