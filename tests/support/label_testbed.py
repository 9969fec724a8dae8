"""A namespace lab for the labeller, shared by its integration tests and its benchmark.

No tunnels: enclaves are /32 addresses of the shared subnet on client-host namespaces,
routed through the gateway namespace as the TUN device would deliver them::

    clienta 10.1.0.2 --+
                       +-- lan 10.1.0.1  gw  10.2.0.1 --- 10.2.0.2 ext
    clientb 10.1.0.3 --+        (enclaves: 192.168.28.x/32 on the client hosts)

Also: TCP echo listeners, connection checks, and an asyncio loop in a thread on which
the hook runs (as it runs on the gateway's loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import socket
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from ipaddress import IPv4Address, IPv4Network
from typing import Any, TypeVar

from seng_fw.lab.topology import Host, Route, Segment, Topology
from seng_fw.system.netns import ip, netns_socket

T = TypeVar("T")

SHARED = IPv4Network("192.168.28.0/24")
LAN, EXT = IPv4Network("10.1.0.0/24"), IPv4Network("10.2.0.0/24")
GW_LAN, GW_EXT = IPv4Address("10.1.0.1"), IPv4Address("10.2.0.1")
HOST_A, HOST_B = IPv4Address("10.1.0.2"), IPv4Address("10.1.0.3")
EXTERNAL = IPv4Address("10.2.0.2")
CLIENT_A, CLIENT_B, GATEWAY, EXT_HOST = "clienta", "clientb", "gw", "ext"
CLIENT_OF = {HOST_A: CLIENT_A, HOST_B: CLIENT_B}
NO_REDIRECTS = {
    # The gateway forwards lan -> lan between enclaves of two client hosts: an ICMP
    # redirect would teach the clients to bypass it.
    "net.ipv4.conf.all.send_redirects": "0",
    "net.ipv4.conf.default.send_redirects": "0",
}

# A flood of new connections, as a script for `python -c` in a client namespace:
# ARGV seconds, source address, destination. UDP datagrams from 8 sockets to ever new
# ports; prints how many it sent. (Shared by the labeller's tests and benchmark.)
FLOOD_SCRIPT = """
import socket, sys, time
end = time.monotonic() + float(sys.argv[1])
socks = []
for _ in range(8):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[2], 0))
    s.setblocking(False)
    socks.append(s)
sent, port = 0, 1
while time.monotonic() < end:
    for s in socks:
        try:
            s.sendto(b"x", (sys.argv[3], port))
            sent += 1
        except OSError:
            pass
    port = port % 60000 + 1
print(sent)
"""


def label_topology(prefix: str) -> Topology:
    via_gw = (Route(SHARED, GW_LAN), Route(EXT, GW_LAN))
    return Topology(
        prefix,
        hosts=[
            Host(CLIENT_A, routes=via_gw),
            Host(CLIENT_B, routes=via_gw),
            Host(GATEWAY, forwarding=True, sysctls=NO_REDIRECTS),
            Host(EXT_HOST, routes=(Route(SHARED, GW_EXT),)),
        ],
        segments=[
            Segment("lan", LAN, GATEWAY, GW_LAN, ((CLIENT_A, HOST_A), (CLIENT_B, HOST_B))),
            Segment("ext", EXT, GATEWAY, GW_EXT, ((EXT_HOST, EXTERNAL),)),
        ],
    )


def place_enclave(topo: Topology, address: IPv4Address, host: IPv4Address) -> None:
    """Give `address` to client host `host`; the gateway routes it there."""
    ip("addr", "add", f"{address}/32", "dev", "lan", netns=topo.ns(CLIENT_OF[host]))
    ip("route", "replace", f"{address}/32", "via", str(host), netns=topo.ns(GATEWAY))


class EchoServers:
    """TCP listeners in any namespaces, served by one thread: accept, echo, close on EOF."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()  # used by the thread only
        self._pending: list[socket.socket] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="echo-servers", daemon=True)
        self._thread.start()

    def listen(self, netns: str, address: IPv4Address, port: int) -> None:
        sock = netns_socket(netns, socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((str(address), port))
        sock.listen(4096)  # connections are complete (and counted) before accept
        sock.setblocking(False)
        with self._lock:
            self._pending.append(sock)
        self._wake_w.send(b"x")

    def close(self) -> None:
        self._stopped = True
        self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()
        self._wake_w.close()
        with self._lock:
            for sock in self._pending:
                sock.close()

    def _run(self) -> None:
        while not self._stopped:
            for key, _ in self._selector.select(timeout=0.5):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                if key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        sock.recv(4096)
                    with self._lock:
                        pending, self._pending = self._pending, []
                    for listener in pending:
                        self._selector.register(listener, selectors.EVENT_READ, "listen")
                elif key.data == "listen":
                    with contextlib.suppress(BlockingIOError):
                        conn, _ = sock.accept()
                        conn.setblocking(False)
                        self._selector.register(conn, selectors.EVENT_READ, "conn")
                else:
                    self._echo(sock)

    def _echo(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            with contextlib.suppress(OSError):
                conn.sendall(data)
            return
        self._selector.unregister(conn)
        conn.close()


def connect(
    netns: str, source: IPv4Address | None, target: IPv4Address, port: int, timeout: float
) -> socket.socket | None:
    """A TCP connection from `source` (None: the kernel's choice), or None if it fails."""
    sock = netns_socket(netns, socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        if source is not None:
            sock.bind((str(source), 0))
        sock.connect((str(target), port))
    except OSError:
        sock.close()
        return None
    return sock


def echo_ok(sock: socket.socket, timeout: float = 1.0) -> bool:
    """Does a byte sent on `sock` come back?"""
    sock.settimeout(timeout)
    try:
        sock.sendall(b"e")
        return sock.recv(16) == b"e"
    except OSError:
        return False


class LoopThread:
    """An asyncio loop in its own thread: the gateway's loop, in tests and benchmarks."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="loop", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run `fn()` on the loop (where the registry and the hook live)."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper(), timeout)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()
