"""Lab traffic: echo services for the external host, and probes that test a flow.

Probes run in-process inside a namespace (`seng_fw.system.netns.netns_socket`), bound to an
enclave's address, so a result means "this enclave's packets went through the gateway
and the answer came back through tunnel #2".
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from ipaddress import IPv4Address
from typing import Any

from seng_fw.lab.topology import ping
from seng_fw.system.netns import netns_socket

PROBE_PAYLOAD = b"seng-fw probe\n"


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector transport is not a DatagramTransport subclass, but has sendto().
        self.transport: Any = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


async def _tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve_echo(bind: str, tcp_port: int, udp_port: int) -> None:
    """TCP and UDP echo on `bind` until cancelled."""
    loop = asyncio.get_running_loop()
    server = await asyncio.start_server(_tcp_echo, bind, tcp_port, reuse_address=True)
    transport, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=(bind, udp_port))
    try:
        await server.serve_forever()
    finally:
        transport.close()


def probe_tcp(
    netns: str | None, source: IPv4Address | None, host: str, port: int, timeout: float = 2.0
) -> bool:
    """Connect, send a line, read it back."""
    sock = netns_socket(netns, socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        try:
            if source is not None:
                sock.bind((str(source), 0))
            sock.connect((host, port))
        except OSError:
            return False
        return echo_round_trip(sock)


def echo_round_trip(sock: socket.socket, payload: bytes = PROBE_PAYLOAD) -> bool:
    """Send `payload` on a connected TCP socket and read it back from an echo service
    (within the socket's timeout)."""
    try:
        sock.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = sock.recv(len(payload) - len(received))
            if not chunk:
                return False
            received += chunk
    except OSError:
        return False
    return received == payload


def probe_udp(
    netns: str | None, source: IPv4Address | None, host: str, port: int, timeout: float = 2.0
) -> bool:
    """Send a datagram (three tries), expect the echo."""
    sock = netns_socket(netns, socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(timeout / 3)
        try:
            if source is not None:
                sock.bind((str(source), 0))
            for _ in range(3):
                sock.sendto(PROBE_PAYLOAD, (host, port))
                try:
                    data, _ = sock.recvfrom(65535)
                except TimeoutError:
                    continue
                return data == PROBE_PAYLOAD
        except OSError:
            return False
        return False


def probe_icmp(
    netns: str | None, source: IPv4Address | None, host: str, timeout: float = 2.0
) -> bool:
    try:
        return ping(netns, host, source=source, timeout=timeout / 2, count=2)
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description="seng-fw lab echo services")
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--tcp", type=int, default=7)
    parser.add_argument("--udp", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(serve_echo(args.bind, args.tcp, args.udp))


if __name__ == "__main__":
    main()
