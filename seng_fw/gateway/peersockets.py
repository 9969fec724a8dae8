"""A receive queue of its own for each admitted enclave's tunnel #1.

All SENG clients send to the same gateway port, so with one socket a single enclave
sending faster than the gateway can decrypt fills the socket's receive buffer, and the
kernel then drops every enclave's datagrams alike: a flood of new connections from one
enclave stalled the established flows of the others (measured: 759,015 of 1.2 million
datagrams dropped at the shared socket, other tunnels' TCP stalled for up to 3 s).

So once an enclave is admitted, the gateway opens a UDP socket bound to the same
address and port (SO_REUSEPORT) and connected to the enclave's tunnel #1 peer. The
kernel delivers a datagram to the connected socket that matches its sender before the
unconnected listener (Linux >= 5.x prefers connected sockets in a reuseport group), and
the event loop gives every ready socket one turn of at most `BATCH` datagrams: a
flooding enclave overflows only its own queue. Replies still leave through the
listener (same address and port). Peers that are not admitted yet (handshakes) share
the listener.

SO_REUSEPORT only lets sockets of the same user share the port; a second gateway
started by mistake is stopped by the control socket, which it cannot take over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from seng_fw.gateway.core import Enclave
from seng_fw.gateway.counters import Fault, GatewayCounters
from seng_fw.tunnel.udp_offload import enable_gro

log = logging.getLogger("seng_fw.gateway")

# Enough for a burst of full-size datagrams of one tunnel (the kernel doubles it).
PEER_RCVBUF = 1 << 20


def reuse_port(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


class PeerSockets:
    """The adapter opens a connected socket when the core reports an enclave admitted
    (`open`) and closes it when the enclave ends (`close_for`), on the event loop.
    Failing to open one (e.g. out of file descriptors) is counted and logged; that
    enclave is then served by the listener."""

    def __init__(
        self,
        listener: socket.socket,
        on_readable: Callable[[socket.socket, Enclave, bool], None],
        counters: GatewayCounters,
        gro: bool = True,
    ) -> None:
        self.listener = listener
        self.on_readable = on_readable  # (socket, enclave, GRO on)
        self.counters = counters
        # UDP GRO (tunnel/udp_offload.py): a burst of an enclave's datagrams in one
        # receive, where the kernel coalesces them (a GSO sender, a NIC with GRO).
        self.gro = gro
        self._sockets: dict[int, socket.socket] = {}  # by id(enclave)

    def open(self, enclave: Enclave) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            reuse_port(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PEER_RCVBUF)
            sock.setblocking(False)
            sock.bind(self.listener.getsockname())
            sock.connect(enclave.uplink_peer)
            gro = self.gro and enable_gro(sock)
            loop = asyncio.get_running_loop()
            loop.add_reader(sock.fileno(), self.on_readable, sock, enclave, gro)
        except (OSError, RuntimeError) as exc:
            sock.close()
            self.counters.faults[Fault.PEER_SOCKET_ERROR] += 1
            log.warning("no socket of its own for %s (%s): it shares the listener",
                        enclave.describe(), exc)  # fmt: skip
            return
        self._sockets[id(enclave)] = sock

    def close_for(self, enclave: Enclave) -> None:
        sock = self._sockets.pop(id(enclave), None)
        if sock is not None:
            _close(sock)

    def close(self) -> None:
        for sock in self._sockets.values():
            _close(sock)
        self._sockets.clear()


def _close(sock: socket.socket) -> None:
    # No running loop (a shutdown after it ended): there is no reader to remove.
    with contextlib.suppress(RuntimeError):
        asyncio.get_running_loop().remove_reader(sock.fileno())
    sock.close()
