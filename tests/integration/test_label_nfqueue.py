"""The labeller with real NFQUEUE in namespaces (tests/integration/conftest.py).

One shared subnet; enclaves of three apps in two categories on two client hosts:

    clienta (host A 10.1.0.2): web .10, api .11, an address nobody leased .12
    clientb (host B 10.1.0.3): web .20, db .21

The queue rules are the ones `install` puts in place (iptables-nft NFQUEUE on this
kernel); the policy is written here by hand as nft rules on the marks, the way the
compiler will emit them: one lookup per new connection in a set keyed on
`ct mark & 0x0000ffff . ct mark & 0xffff0000 . ip daddr . meta l4proto . th dport`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import cast

import pytest

from seng_fw.gateway.conntrack import count_address, flush_address
from seng_fw.lab.topology import Topology
from seng_fw.label.hook import LabelHook, read_queue_stats
from seng_fw.label.install import QueueMode, QueueRules, install
from seng_fw.label.marks import NONE, LabelTable, as_responder, encode
from seng_fw.label.registry import EnclaveRecord, LabelRegistryServer, Registry, Scope
from seng_fw.policy.models import Policy
from seng_fw.system.netns import netns_socket
from tests.support.label_testbed import (
    CLIENT_A,
    CLIENT_B,
    EXT_HOST,
    EXTERNAL,
    FLOOD_SCRIPT,
    GATEWAY,
    GW_LAN,
    HOST_A,
    HOST_B,
    SHARED,
    EchoServers,
    LoopThread,
    connect,
    echo_ok,
    label_topology,
    place_enclave,
)

pytestmark = pytest.mark.root

A = IPv4Address
WEB_A, API_A, FREE_A = A("192.168.28.10"), A("192.168.28.11"), A("192.168.28.12")
WEB_B, DB_B = A("192.168.28.20"), A("192.168.28.21")
RELEASED = A("192.168.28.30")
ENCLAVES = {WEB_A: ("web", HOST_A), API_A: ("api", HOST_A), WEB_B: ("web", HOST_B),
            DB_B: ("db", HOST_B)}  # fmt: skip
HOST_PREFIXES = [IPv4Network(f"{HOST_A}/32"), IPv4Network(f"{HOST_B}/32")]
EXT_PORTS = (7001, 7002, 7003)
ENCLAVE_PORTS = (8080, 8081, 8082, 5432)
QUEUES = QueueRules(SHARED, 0, 2)

POLICY = Policy.model_validate(
    {
        "categories": {"frontend": {}, "backend": {}},
        "apps": [
            {"name": "web", "mrenclave": "01" * 32, "hosts": "10.1.0.0/24",
             "categories": ["frontend"]},
            {"name": "api", "mrenclave": "02" * 32, "hosts": "10.1.0.2/32",
             "categories": ["frontend", "backend"]},
            {"name": "db", "mrenclave": "03" * 32, "hosts": "10.1.0.0/24",
             "categories": ["backend"]},
        ],
    }
)  # fmt: skip
TABLE = LabelTable.from_policy(POLICY, HOST_PREFIXES)


def record(address: IPv4Address, app: str, host: IPv4Address) -> EnclaveRecord:
    categories = tuple(POLICY.app(app).categories)
    return EnclaveRecord(address, app, TABLE.label_id(app, host), host, categories)


def _mark(interval: tuple[int, int]) -> str:
    low, high = interval
    return f"0x{low:08x}" if low == high else f"0x{low:08x}-0x{high:08x}"


def policy_ruleset(table: LabelTable) -> str:
    """The policy of these tests as nft rules on the marks (what the compiler will emit
    for shared-subnet rules): each rule is originator ids . responder ids . destination
    . protocol . port."""
    nobody = [(NONE, NONE)]  # the other end is not an enclave
    rules = [
        (table.select(apps=["web"]), nobody, EXTERNAL, 7001),  # --src-app web
        (table.select(category="backend"), nobody, EXTERNAL, 7002),  # --src-cat backend
        (table.select(host=HOST_PREFIXES[0]), nobody, EXTERNAL, 7003),  # --src-host A
        (nobody, table.select(apps=["web"]), SHARED, 8080),  # --dst-app web
        (nobody, table.select(category="frontend"), SHARED, 8081),  # --dst-cat frontend
        (nobody, table.select(host=HOST_PREFIXES[1]), SHARED, 8082),  # --dst-host B
        (table.select(apps=["api"]), table.select(apps=["db"]), SHARED, 5432),
    ]
    elements = [
        f"{_mark(src)} . {_mark(as_responder(dst))} . {daddr} . tcp . {port}"
        for sources, destinations, daddr, port in rules
        for src in sources
        for dst in destinations
    ]
    return textwrap.dedent(
        f"""\
        table inet labeltest {{
            set allow {{
                type mark . mark . ipv4_addr . inet_proto . inet_service
                flags interval
                elements = {{ {", ".join(elements)} }}
            }}
            chain forward {{
                type filter hook forward priority filter; policy accept;
                ct state established,related accept
                ip saddr {SHARED} jump decide
                ip daddr {SHARED} jump decide
            }}
            chain output {{
                type filter hook output priority filter; policy accept;
                ct state established,related accept
                ip daddr {SHARED} jump decide
            }}
            chain decide {{
                ct mark & 0x0000ffff . ct mark & 0xffff0000 . ip daddr . meta l4proto \
. th dport @allow accept
                counter drop
            }}
        }}
        """
    )


@dataclass
class Bed:
    topo: Topology
    servers: EchoServers
    loop: LoopThread
    registry: Registry
    # What the tests open (hooks, connections): closed by the fixture, also on failure.
    opened: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def gw(self) -> str:
        return self.topo.ns(GATEWAY)

    def client(self, address: IPv4Address) -> str:
        """Namespace of the client host that holds enclave `address`."""
        host = ENCLAVES.get(address, ("", HOST_A))[1]
        return self.topo.ns(CLIENT_A if host == HOST_A else CLIENT_B)

    def load_policy(self) -> None:
        self.topo.run(GATEWAY, ["nft", "-f", "-"], input=policy_ruleset(TABLE))

    def start_hook(self, **kwargs: int) -> LabelHook:
        hook = LabelHook(self.registry, QUEUES.queues, netns=self.gw, **kwargs)
        self.loop.call(hook.start)
        self.opened.callback(self.loop.call, hook.stop)  # unbinds, closes its sockets
        return hook

    def connect(
        self, netns: str, source: IPv4Address | None, target: IPv4Address, port: int, timeout: float
    ) -> socket.socket | None:
        """label_testbed.connect, the connection closed after the test."""
        sock = connect(netns, source, target, port, timeout)
        return None if sock is None else self.opened.enter_context(sock)

    def conntrack_mark(self, *filters: str) -> int:
        out = self.topo.run(GATEWAY, ["conntrack", "-L", "-p", "tcp", *filters]).stdout
        marks = {int(field[5:]) for field in out.split() if field.startswith("mark=")}
        assert len(marks) == 1, out
        return marks.pop()


@pytest.fixture
def bed(ns_prefix: str) -> Iterator[Bed]:
    topo = label_topology(ns_prefix)
    topo.up()
    servers = EchoServers()
    loop = LoopThread()
    try:
        for address, (_, host) in ENCLAVES.items():
            place_enclave(topo, address, host)
        place_enclave(topo, FREE_A, HOST_A)
        for port in EXT_PORTS:
            servers.listen(topo.ns(EXT_HOST), EXTERNAL, port)
        for address in (*ENCLAVES, FREE_A):
            for port in ENCLAVE_PORTS:
                servers.listen(topo.ns(CLIENT_A if address != WEB_B and address != DB_B
                                       else CLIENT_B), address, port)  # fmt: skip
        installed = install(QUEUES, netns=topo.ns(GATEWAY))
        assert installed.mode is QueueMode.XTABLES or installed.mode is QueueMode.NFT
        registry = Registry(Scope(SHARED, frozenset({A("192.168.28.1")})))
        for address, (app, host) in ENCLAVES.items():
            registry.add(record(address, app, host))
        bed = Bed(topo, servers, loop, registry)
        with bed.opened:
            yield bed
    finally:
        loop.close()
        servers.close()
        topo.down()


Case = tuple[str, IPv4Address | None, IPv4Address, int, bool]  # ns, from, to, port, allowed


def check_all(bed: Bed, cases: list[Case]) -> None:
    """Open every connection at once (refused ones cost one timeout in all)."""

    def attempt(case: Case) -> bool:
        ns, source, target, port, _ = case
        sock = connect(ns, source, target, port, timeout=1.0)
        if sock is None:
            return False
        sock.close()
        return True

    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(attempt, cases))
    wrong = [
        f"{source or ns} -> {target}:{port}: {'allowed' if got else 'refused'}"
        for (ns, source, target, port, _), got in zip(cases, results, strict=True)
        if got != _
    ]
    assert not wrong, "unexpected: " + "; ".join(wrong)


def test_rules_by_app_category_and_host_allow_exactly_what_they_name(bed: Bed) -> None:
    bed.load_policy()
    bed.start_hook()
    ext, gw = bed.topo.ns(EXT_HOST), bed.gw
    a, b = bed.topo.ns(CLIENT_A), bed.topo.ns(CLIENT_B)
    check_all(bed, [
        # source app web
        (a, WEB_A, EXTERNAL, 7001, True), (b, WEB_B, EXTERNAL, 7001, True),
        (a, API_A, EXTERNAL, 7001, False), (b, DB_B, EXTERNAL, 7001, False),
        (a, FREE_A, EXTERNAL, 7001, False),  # no enclave holds it: UNKNOWN
        # source category backend (api, db)
        (a, API_A, EXTERNAL, 7002, True), (b, DB_B, EXTERNAL, 7002, True),
        (a, WEB_A, EXTERNAL, 7002, False),
        # source host A
        (a, WEB_A, EXTERNAL, 7003, True), (a, API_A, EXTERNAL, 7003, True),
        (b, WEB_B, EXTERNAL, 7003, False), (b, DB_B, EXTERNAL, 7003, False),
        # destination app web, from the external host and from the gateway itself
        (ext, None, WEB_A, 8080, True), (ext, None, WEB_B, 8080, True),
        (ext, None, API_A, 8080, False), (ext, None, FREE_A, 8080, False),
        (gw, None, WEB_A, 8080, True), (gw, None, DB_B, 8080, False),
        # destination category frontend (web, api)
        (ext, None, WEB_A, 8081, True), (ext, None, API_A, 8081, True),
        (ext, None, DB_B, 8081, False),
        # destination host B
        (ext, None, WEB_B, 8082, True), (ext, None, DB_B, 8082, True),
        (ext, None, WEB_A, 8082, False),
        # enclave to enclave: app api to app db
        (a, API_A, DB_B, 5432, True), (a, WEB_A, DB_B, 5432, False),
        (a, API_A, WEB_B, 5432, False),
    ])  # fmt: skip


def test_marks_name_both_ends(bed: Bed) -> None:
    bed.start_hook()
    web_a = TABLE.label_id("web", HOST_A)
    api_a, db_b = TABLE.label_id("api", HOST_A), TABLE.label_id("db", HOST_B)
    socks = [
        connect(bed.topo.ns(EXT_HOST), None, WEB_A, 8080, 2.0),
        connect(bed.topo.ns(CLIENT_A), WEB_A, EXTERNAL, 7001, 2.0),
        connect(bed.topo.ns(CLIENT_A), API_A, DB_B, 5432, 2.0),
        connect(bed.gw, None, WEB_B, 8081, 2.0),
    ]
    try:
        assert all(socks)
        assert bed.conntrack_mark("-d", str(WEB_A), "--dport", "8080") == encode(NONE, web_a)
        assert bed.conntrack_mark("-s", str(WEB_A), "--dport", "7001") == encode(web_a, NONE)
        assert bed.conntrack_mark("-s", str(API_A), "--dport", "5432") == encode(api_a, db_b)
        web_b = TABLE.label_id("web", HOST_B)
        assert bed.conntrack_mark("-d", str(WEB_B), "--dport", "8081") == encode(NONE, web_b)
    finally:
        for sock in socks:
            if sock is not None:
                sock.close()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_hook_service_stopped_and_restarted(bed: Bed, tmp_path: Path) -> None:
    """The hook as its own service: killed, new connections are dropped (no policy
    loaded: it is the queue without a listener that drops them), established ones go
    on; restarted, new connections work again, the gateway (registry server) untouched.
    Two queue numbers: the kernel spreads connections over both."""
    path = tmp_path / "label.sock"
    server = LabelRegistryServer(bed.registry, path)
    bed.loop.run(server.start())

    def start_service() -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "seng_fw.label", "--socket", str(path),
                "--queues", f"{QUEUES.first}-{QUEUES.last}", "--stats-interval", "0.2"]  # fmt: skip
        with (tmp_path / "service.log").open("a") as log:  # the child keeps its own
            proc = bed.topo.popen(GATEWAY, argv, stdout=log, stderr=log)
        wait_for(lambda: set(read_queue_stats(bed.gw)) >= set(QUEUES.queues))
        return proc

    a = bed.topo.ns(CLIENT_A)
    service = start_service()
    try:
        established = bed.connect(a, WEB_A, EXTERNAL, 7001, 2.0)
        assert established is not None and echo_ok(established)
        # The kernel picks the queue by a hash of the addresses and the protocol: the
        # connections of 16 addresses are spread over both queues (or all 16 land on
        # one, with a chance of 2**-15).
        sources = [A(f"192.168.28.{100 + i}") for i in range(16)]
        for source in sources:
            place_enclave(bed.topo, source, HOST_A)
        fresh = [bed.connect(a, source, EXTERNAL, 7001, 2.0) for source in sources]
        assert all(fresh)
        stats = read_queue_stats(bed.gw)
        assert all(stats[q].id_sequence > 0 for q in QUEUES.queues), stats
        wait_for(lambda: any(
            s.get("counters", {}).get("labelled", 0) >= 17
            for s in bed.loop.call(lambda: server.client_stats).values()
        ))  # fmt: skip

        service.kill()
        service.wait()
        wait_for(lambda: not set(read_queue_stats(bed.gw)) & set(QUEUES.queues))
        assert connect(a, WEB_A, EXTERNAL, 7001, 1.0) is None
        assert connect(bed.topo.ns(EXT_HOST), None, WEB_B, 8080, 1.0) is None
        assert echo_ok(established)

        service = start_service()
        assert bed.connect(a, WEB_A, EXTERNAL, 7001, 2.0) is not None
        assert echo_ok(established)
    finally:
        service.kill()
        service.wait()
        bed.loop.run(server.close())


def test_released_address_loses_its_label_and_connections(bed: Bed) -> None:
    """An address of app web is re-leased to an enclave of app db: web's connection is
    gone, and db is not granted web's rights (but has its own)."""
    bed.load_policy()
    bed.start_hook()
    a, ext = bed.topo.ns(CLIENT_A), bed.topo.ns(EXT_HOST)
    place_enclave(bed.topo, RELEASED, HOST_A)
    bed.servers.listen(a, RELEASED, 8080)
    bed.loop.call(lambda: bed.registry.add(record(RELEASED, "web", HOST_A)))
    old = bed.connect(a, RELEASED, EXTERNAL, 7001, 2.0)
    assert old is not None and echo_ok(old)
    inbound = bed.connect(ext, None, RELEASED, 8080, 2.0)
    assert inbound is not None and echo_ok(inbound)

    # Release as the gateway does it: out of the registry first, then conntrack.
    bed.loop.call(lambda: bed.registry.remove(RELEASED))
    assert flush_address(RELEASED, netns=bed.gw) >= 2
    assert count_address(RELEASED, netns=bed.gw) == 0
    bed.loop.call(lambda: bed.registry.add(record(RELEASED, "db", HOST_A)))

    assert not echo_ok(old)  # its next packet is a new connection of app db: refused
    assert not echo_ok(inbound)
    check_all(bed, [
        (a, RELEASED, EXTERNAL, 7001, False),  # web's right
        (ext, None, RELEASED, 8080, False),  # web's ingress
        (a, RELEASED, EXTERNAL, 7002, True),  # db's own (category backend)
    ])  # fmt: skip


class TunnelEcho(asyncio.DatagramProtocol):
    """Stands for the gateway's tunnels: served by the loop the hook runs on."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        self.transport.sendto(data, addr)


def test_a_flood_of_new_connections_does_not_starve_the_tunnels(bed: Bed) -> None:
    hook = bed.start_hook()
    tunnel_sock = bed.opened.enter_context(netns_socket(bed.gw, socket.AF_INET, socket.SOCK_DGRAM))
    tunnel_sock.bind((str(GW_LAN), 4433))
    transport, _ = bed.loop.run(
        bed.loop.loop.create_datagram_endpoint(TunnelEcho, sock=tunnel_sock)
    )
    bed.opened.callback(bed.loop.call, transport.close)  # closes tunnel_sock too
    probe = bed.opened.enter_context(
        netns_socket(bed.topo.ns(CLIENT_B), socket.AF_INET, socket.SOCK_DGRAM)
    )
    probe.settimeout(0.2)
    established = bed.connect(bed.topo.ns(CLIENT_B), WEB_B, EXTERNAL, 7001, 2.0)
    assert established is not None
    seconds = 2.0
    flood = bed.topo.popen(
        CLIENT_A,
        [sys.executable, "-c", FLOOD_SCRIPT, str(seconds), str(WEB_A), str(EXTERNAL)],
        stdout=subprocess.PIPE,
    )
    bed.opened.enter_context(flood)  # reaped, its pipe closed
    try:
        time.sleep(0.3)  # the flood is under way
        rtts: list[float] = []
        echoes, sent = 0, 0
        end = time.monotonic() + seconds - 0.6
        while time.monotonic() < end:
            sent += 1
            start = time.monotonic()
            probe.sendto(sent.to_bytes(4, "big"), (str(GW_LAN), 4433))
            try:
                while probe.recv(16) != sent.to_bytes(4, "big"):
                    pass
                rtts.append(time.monotonic() - start)
            except TimeoutError:
                pass
            if sent % 10 == 0:
                echoes += echo_ok(established, timeout=0.5)
            time.sleep(0.01)
        flooded = int(flood.communicate(timeout=10)[0])
    finally:
        flood.kill()
    counters = bed.loop.call(hook.counters)
    assert counters["labelled"] > 1000, counters  # the hook was busy...
    assert flooded > counters["labelled"] / 2
    # ...and the loop still served the tunnel, and established flows went on.
    assert len(rtts) >= 0.95 * sent, (len(rtts), sent, counters)
    assert statistics.median(rtts) < 0.02, (statistics.median(rtts), counters)
    assert echoes == sent // 10
