"""Attacks on a running gateway, shared by the namespace tests
(tests/integration/test_robustness.py) and bench/bench_robustness.py: a handshake flood
that answers the cookie and walks away, and issue 14 item 1's forged datagrams."""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import socket
import time
from ipaddress import IPv4Address
from typing import Any

from seng_fw.lab.lab import DEMO_WEBAPP, EnclaveSpec, Lab
from seng_fw.lab.topology import CLIENT_A
from seng_fw.system.netns import CLONE_NEWNET, NETNS_RUN_DIR, netns_socket
from seng_fw.tunnel.dtls import DtlsClientSession, make_client_config
from tests.support.seng_client import udp_packet


def forged(k: int, epoch: int) -> bytes:
    """A record mbed TLS 2.28 discards (epoch 0 or 1, sequence 0), then k stray bytes."""
    return b"\x17\xfe\xfd" + epoch.to_bytes(2, "big") + bytes(6) + b"\x00\x01\x00" + b"x" * k


FORGED = [forged(k, epoch) for epoch in (0, 1) for k in range(1, 13)]


def client_hello(lab: Lab) -> bytes:
    """A ClientHello as mbed TLS sends it (no cookie yet)."""
    cert, key = lab.enclave_credentials(EnclaveSpec("flood", CLIENT_A, DEMO_WEBAPP))
    config = make_client_config(
        cert.read_bytes(), key.read_bytes(), (lab.state_dir / "server.pem").read_bytes()
    )
    [hello] = DtlsClientSession(config, time.monotonic()).datagrams_to_send()
    return hello


def with_cookie(hello: bytes, cookie: bytes) -> bytes:
    """The second ClientHello (RFC 6347 4.2.1): the first one with the server's cookie."""
    body = hello[25:]
    session_id_end = 35 + body[34]
    body = body[:session_id_end] + bytes([len(cookie)]) + cookie + body[session_id_end + 1 :]
    size = len(body).to_bytes(3, "big")
    handshake = b"\x01" + size + b"\x00\x01" + b"\x00\x00\x00" + size + body
    return hello[:5] + (1).to_bytes(6, "big") + len(handshake).to_bytes(2, "big") + handshake


def enter_netns(name: str) -> None:
    """Move the calling process's thread into namespace `name` (an attacker process:
    every socket it opens then lives there, without a helper thread per socket)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_RUN_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({name})")
    finally:
        os.close(fd)


def flood(ns: str, server: tuple[str, int], hello: bytes, seconds: float, sent: Any) -> None:
    """Answer every HelloVerifyRequest with the cookie, then walk away; each source port
    is used for one handshake (the gateway keys sessions by address and port), and
    `pending` ports are in flight at once."""
    enter_netns(ns)
    pending = 256
    selector = selectors.DefaultSelector()

    def fresh() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("", 0))
        sock.connect(server)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        with contextlib.suppress(OSError):
            sock.send(hello)

    for _ in range(pending):
        fresh()
    end = time.monotonic() + seconds
    count, last_round = 0, time.monotonic()
    while time.monotonic() < end:
        events = selector.select(0.05)
        for key, _ in events:
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(4096)
            except (BlockingIOError, ConnectionRefusedError):
                continue
            if len(data) > 28 and data[0] == 22 and data[13] == 3:  # HelloVerifyRequest
                with contextlib.suppress(OSError):
                    sock.send(with_cookie(hello, data[28 : 28 + data[27]]))
                    count += 1
                selector.unregister(sock)
                sock.close()
                fresh()
        if not events or time.monotonic() - last_round > 1.0:
            # Throttled or dropped ClientHellos get no answer: retry on new ports.
            last_round = time.monotonic()
            for key in list(selector.get_map().values()):
                old = key.fileobj
                assert isinstance(old, socket.socket)
                selector.unregister(old)
                old.close()
                fresh()
    sent.value = count


def forge(ns: str, peers: list[tuple[str, int, str, int]], seconds: float, sent: Any) -> None:
    """Item 1's datagrams (a record mbed TLS discards + stray bytes) from the tunnels' own
    addresses and ports, as fast as a raw socket sends them."""
    raw = netns_socket(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    packets = [
        (udp_packet(IPv4Address(local_ip), IPv4Address(gw_ip), local_port, gw_port, datagram),
         gw_ip)
        for local_ip, local_port, gw_ip, gw_port in peers
        for datagram in FORGED
    ]  # fmt: skip
    end = time.monotonic() + seconds
    count = 0
    while time.monotonic() < end:
        for packet, destination in packets:
            try:
                raw.sendto(packet, (destination, 0))
                count += 1
            except OSError:
                pass
    sent.value = count
