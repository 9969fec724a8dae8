"""The compiled ruleset in a real kernel, with real packets, in network namespaces.

No tunnels yet: an "enclave side" stands in for the gateway's TUN device. Its hosts
hold enclave addresses and reach the gateway over a bridge, which plays the TUN
(`--tun lan`); the external host is behind the gateway's other interface::

    enc1 .10: demo-enclave 192.168.28.10,  --+
              batch-worker 192.168.29.10     +-- lan (bridge, the "TUN") gw .1 ext --- .2 ext
    enc2 .20: sdk-nginx 172.16.28.10 --------+   10.77.1.0/24             10.77.2.0/24  .53 .10

The policy is policies/example.yaml (four apps, two categories); the shared-subnet
rules (by app, category and client host) have their own policy, from
tests/unit/test_compile_shared.py, with enc1 and enc2 as its client hosts A and B and a
stand-in for the labeller's marks.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
import yaml

from seng_fw.compile import live
from seng_fw.compile.compiler import Options, compile_policy, label_table
from seng_fw.compile.nft import Rule, Table, Verdict
from seng_fw.lab import topology
from seng_fw.lab.topology import Host, Route, Segment, Topology
from seng_fw.policy.digest import policy_digest
from seng_fw.policy.loader import load_policy
from seng_fw.policy.models import Policy
from seng_fw.system.netns import ip
from tests.unit import test_compile_shared as shared

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "policies/example.yaml"
DEMO, WORKER, NGINX = "192.168.28.10", "192.168.29.10", "172.16.28.10"
EXT, RESOLVER, BATCH, GW_EXT = "10.77.2.2", "10.77.2.53", "10.77.2.10", "10.77.2.1"
ENC1_LAN = "10.77.1.10"
SHORT = 0.4  # seconds to wait for a packet that should be dropped

pytestmark = pytest.mark.root


def _route(dst: str, via: str) -> Route:
    return Route(IPv4Network(dst), IPv4Address(via))


@pytest.fixture
def topo(make_topology: Callable[..., Topology]) -> Topology:
    lan, ext = IPv4Network("10.77.1.0/24"), IPv4Network("10.77.2.0/24")
    default = (_route("0.0.0.0/0", "10.77.1.1"),)
    topology = make_topology(
        [
            Host("enc1", routes=default),
            Host("enc2", routes=default),
            Host(
                "gw",
                forwarding=True,
                routes=(
                    _route("192.168.28.0/24", ENC1_LAN),
                    _route("192.168.29.0/24", ENC1_LAN),
                    _route("172.16.28.0/26", "10.77.1.20"),
                ),
            ),
            Host(
                "ext",
                routes=(
                    _route("192.168.0.0/16", GW_EXT),
                    _route("172.16.0.0/12", GW_EXT),
                    _route("10.77.1.0/24", GW_EXT),
                ),
            ),
        ],
        [
            Segment(
                "lan",
                lan,
                "gw",
                lan[1],
                (("enc1", IPv4Address(ENC1_LAN)), ("enc2", IPv4Address("10.77.1.20"))),
            ),
            Segment("ext", ext, "gw", IPv4Address(GW_EXT), (("ext", IPv4Address(EXT)),)),
        ],
    )
    for host, address in (("enc1", DEMO), ("enc1", WORKER), ("enc2", NGINX)):
        ip("addr", "add", f"{address}/32", "dev", "lo", netns=topology.ns(host))
    for address in (RESOLVER, BATCH):
        ip("addr", "add", f"{address}/24", "dev", "ext", netns=topology.ns("ext"))
    return topology


# --- packets ---------------------------------------------------------------------


@contextmanager
def listening(topo: Topology, host: str, address: str, port: int) -> Iterator[socket.socket]:
    server = topo.socket(host, socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, port))
    server.listen(16)
    try:
        yield server
    finally:
        server.close()


def connects(
    topo: Topology, host: str, src: str, dst: str, port: int, timeout: float = SHORT
) -> bool:
    client = topo.socket(host, socket.AF_INET, socket.SOCK_STREAM)
    client.bind((src, 0))
    client.settimeout(timeout)
    try:
        client.connect((dst, port))
    except OSError:
        return False
    finally:
        client.close()
    return True


def tcp(topo: Topology, client: str, src: str, server: str, dst: str, port: int) -> bool:
    with listening(topo, server, dst, port):
        return connects(topo, client, src, dst, port)


def udp(topo: Topology, client: str, src: str, server: str, dst: str, port: int) -> bool:
    receiver = topo.socket(server, socket.AF_INET, socket.SOCK_DGRAM)
    sender = topo.socket(client, socket.AF_INET, socket.SOCK_DGRAM)
    with receiver, sender:
        receiver.bind((dst, port))
        receiver.settimeout(SHORT)
        sender.bind((src, 0))
        sender.sendto(b"seng-fw", (dst, port))
        try:
            return receiver.recvfrom(100)[0] == b"seng-fw"
        except TimeoutError:
            return False


def ping(topo: Topology, host: str, src: str, dst: str) -> bool:
    return topology.ping(topo.ns(host), dst, source=src, timeout=SHORT)


# --- the ruleset -----------------------------------------------------------------


def compiled(policy: Policy) -> Table:
    return compile_policy(policy, Options(tun="lan"))


def apply_in(topo: Topology, policy: Policy, table: Table | None = None, **kwargs: Any) -> None:
    table = table or compiled(policy)
    topo.call("gw", lambda: live.apply(table, policy, live.Nft(), **kwargs))


def ruleset(topo: Topology) -> str:
    return topo.run("gw", ["nft", "list", "ruleset"]).stdout


def nft(topo: Topology, *commands: str) -> None:
    topo.run("gw", ["nft", *commands])


def without_demo(tmp_path: Path) -> Path:
    """policies/example.yaml without the demo-enclave app (and the rule naming it)."""
    text = EXAMPLE.read_text()
    text = text[: text.index("  # DemoEnclave")] + text[text.index("  # SDK-NGINX") :]
    text = text.replace("[{app: demo-enclave}, 10.77.2.0/24]", "[10.77.2.0/24]")
    path = tmp_path / "without-demo.yaml"
    path.write_text(text)
    return path


# --- tests ------------------------------------------------------------------------


def test_flows_of_the_example_policy(topo: Topology) -> None:
    policy = load_policy(EXAMPLE)
    # Before any ruleset everything flows (the control for every "dropped" below).
    assert tcp(topo, "enc1", DEMO, "ext", EXT, 22)
    apply_in(topo, policy)
    flows: list[tuple[str, bool, Callable[[], bool]]] = [
        ("demo -> web tcp/443", True, lambda: tcp(topo, "enc1", DEMO, "ext", EXT, 443)),
        ("demo -> web tcp/80", True, lambda: tcp(topo, "enc1", DEMO, "ext", EXT, 80)),
        ("demo -> ext tcp/22", False, lambda: tcp(topo, "enc1", DEMO, "ext", EXT, 22)),
        ("demo -> resolver udp/53", True, lambda: udp(topo, "enc1", DEMO, "ext", RESOLVER, 53)),
        ("demo -> ext udp/53", False, lambda: udp(topo, "enc1", DEMO, "ext", EXT, 53)),
        ("demo -> ext icmp", True, lambda: ping(topo, "enc1", DEMO, EXT)),
        ("nginx -> ext icmp", False, lambda: ping(topo, "enc2", NGINX, EXT)),
        ("nginx -> web tcp/443", False, lambda: tcp(topo, "enc2", NGINX, "ext", EXT, 443)),
        ("nginx -> resolver udp/53", True, lambda: udp(topo, "enc2", NGINX, "ext", RESOLVER, 53)),
        # app to app: both the source's egress and the destination's ingress
        ("demo -> nginx tcp/443", True, lambda: tcp(topo, "enc1", DEMO, "enc2", NGINX, 443)),
        ("demo -> nginx tcp/80", False, lambda: tcp(topo, "enc1", DEMO, "enc2", NGINX, 80)),
        ("nginx -> demo tcp/443", False, lambda: tcp(topo, "enc2", NGINX, "enc1", DEMO, 443)),
        # ingress from the external side
        ("ext -> nginx tcp/443", True, lambda: tcp(topo, "ext", EXT, "enc2", NGINX, 443)),
        ("ext -> nginx tcp/80", False, lambda: tcp(topo, "ext", EXT, "enc2", NGINX, 80)),
        ("ext -> demo tcp/443", False, lambda: tcp(topo, "ext", EXT, "enc1", DEMO, 443)),
        ("ext -> demo icmp", False, lambda: ping(topo, "ext", EXT, DEMO)),
        # the gateway itself is not an enclave's peer unless named
        ("demo -> gateway icmp", False, lambda: ping(topo, "enc1", DEMO, "10.77.1.1")),
        # shared subnet without the labeller: fail closed
        ("worker -> batch tcp/5005", False, lambda: tcp(topo, "enc1", WORKER, "ext", BATCH, 5005)),
        # the TUN (here: lan) carries enclave addresses only
        ("lan -> ext tcp/22", False, lambda: tcp(topo, "enc1", ENC1_LAN, "ext", EXT, 22)),
        # traffic of no enclave is not seng-fw's business
        ("ext -> gw icmp", True, lambda: ping(topo, "ext", EXT, GW_EXT)),
    ]
    wrong = [name for name, allowed, flow in flows if flow() is not allowed]
    assert not wrong, f"flows not as the policy says: {wrong}"

    # Enclave addresses come from the TUN only: spoofed from the external side, dropped.
    ip("addr", "add", "192.168.28.99/32", "dev", "lo", netns=topo.ns("ext"))
    assert not udp(topo, "ext", "192.168.28.99", "enc1", ENC1_LAN, 9999)
    assert udp(topo, "ext", EXT, "enc1", ENC1_LAN, 9999)

    # A stand-in labeller (an administrator's table before seng's chains) marks the
    # worker's connections with its label: the shared-subnet rules now apply.
    worker = label_table(policy).label_id("batch-worker", IPv4Address(ENC1_LAN))
    nft(
        topo,
        "add table ip labeller; add chain ip labeller label "
        "{ type filter hook forward priority mangle; }; "
        f"add rule ip labeller label ct state new ip saddr {WORKER} ct mark set {worker}",
    )
    assert tcp(topo, "enc1", WORKER, "ext", BATCH, 5005)
    assert not tcp(topo, "enc1", WORKER, "ext", BATCH, 5011)
    assert udp(topo, "enc1", WORKER, "ext", RESOLVER, 53)

    # per-app counters saw the traffic
    counts = topo.call("gw", lambda: live.counters(live.Nft(), "seng"))
    assert counts["tx_demo-enclave"][0] > 0 and counts["rx_sdk-nginx"][0] > 0


def _stand_in_labeller(topo: Topology) -> None:
    """Mark new connections as the labeller would for tests/unit/test_compile_shared.py's
    enclaves: a map from (source, destination) to the mark, in a table before seng's."""
    addresses = [*shared.ENCLAVES, shared.FREE_A, EXT]
    marks = [
        f"{src} . {dst} : {shared.mark(src, dst)}"
        for src in addresses
        for dst in addresses
        if src != dst and shared.mark(src, dst)
    ]
    nft(
        topo,
        "add table ip labeller; add chain ip labeller label "
        "{ type filter hook forward priority mangle; }; "
        "add rule ip labeller label ct state new ct mark set ip saddr . ip daddr map "
        f"{{ {', '.join(marks)} }}",
    )


def test_shared_subnet_rules_by_label(topo: Topology) -> None:
    """Rules by source and destination app, category and client host on the shared
    subnet (SENG's `-m seng` matches) allow exactly what they name, with real packets.
    Client host A is enc1, B is enc2; the flows are those of test_compile_shared that
    cross the gateway (enclaves of one host talk to each other without it)."""
    ns_of = {EXT: "ext"}
    for address, (_, host) in shared.ENCLAVES.items():
        ns_of[address] = "enc1" if host == shared.HOST_A else "enc2"
    ns_of[shared.FREE_A] = "enc1"
    for address, host in ns_of.items():
        if address not in (EXT, DEMO, WORKER):  # the fixture placed those
            ip("addr", "add", f"{address}/32", "dev", "lo", netns=topo.ns(host))
    for address in (shared.WEB_B, shared.DB_B):
        ip("route", "add", f"{address}/32", "via", "10.77.1.20", netns=topo.ns("gw"))
    flows = [flow for flow in shared.FLOWS if ns_of[flow[0]] != ns_of[flow[1]]]
    assert len(flows) >= 30
    policy = shared.POLICY
    apply_in(topo, policy)
    _stand_in_labeller(topo)

    with ExitStack() as stack:
        for dst, port in {(dst, port) for _, dst, port, _ in flows}:
            stack.enter_context(listening(topo, ns_of[dst], dst, port))

        def attempt(flow: tuple[str, str, int, bool]) -> bool:
            src, dst, port, _ = flow
            return connects(topo, ns_of[src], src, dst, port, timeout=1.0)

        with ThreadPoolExecutor(len(flows)) as pool:
            results = list(pool.map(attempt, flows))
    wrong = [f for f, got in zip(flows, results, strict=True) if got is not f[3]]
    assert not wrong, f"flows not as the policy says (src, dst, port, expected): {wrong}"
    # per-app counters of shared-subnet apps count by label, both ways
    counts = topo.call("gw", lambda: live.counters(live.Nft(), "seng"))
    assert all(counts[f"{way}_{app}"][0] > 0 for way in ("tx", "rx") for app in ("web", "db"))
    assert counts["tx_own"][0] > 0


def test_exposed_service(topo: Topology) -> None:
    policy = load_policy(EXAMPLE)
    apply_in(topo, policy)
    with listening(topo, "enc2", NGINX, 443):
        # no enclave serves it yet: nothing is translated, the gateway refuses
        assert not connects(topo, "ext", EXT, GW_EXT, 8443)

        # the gateway names the serving enclave (first another one, then the right one)
        def serve(enclave: str | None) -> None:
            target = None if enclave is None else IPv4Address(enclave)
            topo.call(
                "gw", lambda: live.set_exposure_target(live.Nft(), policy, "sdk-nginx", target)
            )

        serve("172.16.28.11")
        serve(NGINX)
        assert connects(topo, "ext", EXT, GW_EXT, 8443)
        # an apply keeps the gateway's entry while the exposure exists
        apply_in(topo, policy, force=True)
        assert connects(topo, "ext", EXT, GW_EXT, 8443)
        # only from the exposure's `from` (10.77.2.0/24)
        ip("addr", "add", "10.77.3.2/32", "dev", "lo", netns=topo.ns("ext"))
        assert not connects(topo, "ext", "10.77.3.2", GW_EXT, 8443)
        # withdrawn when the enclave goes
        serve(None)
        assert not connects(topo, "ext", EXT, GW_EXT, 8443)


def test_exposures_keep_their_own_sources(topo: Topology) -> None:
    """Issue 13, defect 1: X exposes gateway port 8001 -> X:8080 to one admin host, Y
    exposes 8002 -> Y:8080 to a /24. A host of that /24 reaches Y, and not X."""
    policy = Policy.model_validate(
        yaml.safe_load(
            f"""
apps:
  - name: x
    mrenclave: "{"11" * 32}"
    hosts: 10.77.1.0/24
    subnet: {{subnet: 192.168.28.0/24}}
    expose: [{{address: {GW_EXT}, port: 8001, to_port: 8080, from: {EXT}/32}}]
  - name: y
    mrenclave: "{"22" * 32}"
    hosts: 10.77.1.0/24
    subnet: {{subnet: 172.16.28.0/26}}
    expose: [{{address: {GW_EXT}, port: 8002, to_port: 8080, from: 10.77.3.0/24}}]
"""
        )
    )
    apply_in(topo, policy)
    for app, enclave in (("x", DEMO), ("y", NGINX)):
        topo.call(
            "gw",
            lambda a=app, e=enclave: live.set_exposure_target(  # type: ignore[misc]
                live.Nft(), policy, a, IPv4Address(e)
            ),
        )
    lan_host = "10.77.3.2"  # a host of Y's /24
    ip("addr", "add", f"{lan_host}/32", "dev", "lo", netns=topo.ns("ext"))
    ip("route", "add", "10.77.3.0/24", "via", EXT, netns=topo.ns("gw"))
    with listening(topo, "enc1", DEMO, 8080), listening(topo, "enc2", NGINX, 8080):
        assert connects(topo, "ext", EXT, GW_EXT, 8001)  # X's admin host
        assert connects(topo, "ext", lan_host, GW_EXT, 8002)  # the /24, to Y
        assert not connects(topo, "ext", lan_host, GW_EXT, 8001)  # the /24, to X
        assert not connects(topo, "ext", EXT, GW_EXT, 8002)  # X's admin, to Y


def test_the_gateway_is_reached_only_by_rules_that_name_it(topo: Topology, tmp_path: Path) -> None:
    """Issue 13, defect 2: demo-enclave's `to: 0.0.0.0/0 tcp 80,443` (web-clients) opens
    the web, not the gateway's own addresses (LAN, external side, its address on the
    enclave's subnet); `{gateway: true}` does."""
    ip("addr", "add", "192.168.28.1/32", "dev", "lo", netns=topo.ns("gw"))
    gateway = (GW_EXT, "10.77.1.1", "192.168.28.1")

    def reaches_gateway(port: int) -> list[bool]:
        with ExitStack() as stack:
            for address in gateway:
                stack.enter_context(listening(topo, "gw", address, port))
            return [connects(topo, "enc1", DEMO, address, port) for address in gateway]

    apply_in(topo, load_policy(EXAMPLE))
    assert tcp(topo, "enc1", DEMO, "ext", EXT, 443)  # the internet, as the rule says
    assert reaches_gateway(443) == [False, False, False]
    assert reaches_gateway(80) == [False, False, False]
    named = tmp_path / "named.yaml"
    named.write_text(
        EXAMPLE.read_text().replace(
            "      - to: 10.77.2.0/24\n        protocol: icmp\n",
            "      - to: 10.77.2.0/24\n        protocol: icmp\n"
            "      - {to: {gateway: true}, protocol: tcp, ports: 443}\n",
        )
    )
    apply_in(topo, load_policy(named))
    assert reaches_gateway(443) == [True, True, True]
    assert reaches_gateway(80) == [False, False, False]


def test_admin_tables_survive_apply(topo: Topology, tmp_path: Path) -> None:
    nft(
        topo,
        "add table inet admin; add chain inet admin input "
        "{ type filter hook input priority 10; policy accept; }; "
        "add rule inet admin input tcp dport 2222 counter drop; "
        "add table ip nat_admin; add set ip nat_admin blocked { type ipv4_addr; }; "
        "add element ip nat_admin blocked { 10.9.9.9 }",
    )
    before = ruleset(topo)
    policy = load_policy(EXAMPLE)
    apply_in(topo, policy)
    apply_in(topo, load_policy(without_demo(tmp_path)))
    after = ruleset(topo)
    for table in ("table inet admin", "table ip nat_admin"):
        block = before[before.index(table) :]
        block = block[: block.index("\n}\n") + 3]
        assert block in after
    # and removing seng's table gives back exactly the administrator's ruleset
    nft(topo, "delete table inet seng")
    assert ruleset(topo) == before


def _failing(table: Table) -> Table:
    """The table with one rule the kernel refuses (a jump to a chain that does not exist),
    last in the batch: everything before it was accepted."""
    table.chains[-1].rules.append(Rule((Verdict("jump", "no_such_chain"),)))
    return table


def test_failed_apply_changes_nothing(topo: Topology, tmp_path: Path) -> None:
    policy = load_policy(EXAMPLE)
    nft(topo, "add table inet admin; add chain inet admin c; add rule inet admin c accept")
    # without a previous seng table
    before = ruleset(topo)
    with pytest.raises(live.NftError, match="Could not process rule"):
        apply_in(topo, policy, _failing(compiled(policy)))
    assert ruleset(topo) == before
    # with one
    apply_in(topo, policy)
    before = ruleset(topo)
    smaller = load_policy(without_demo(tmp_path))
    with pytest.raises(live.NftError):
        apply_in(topo, smaller, _failing(compiled(smaller)))
    assert ruleset(topo) == before
    # a dry run changes nothing either, and reports what the kernel refuses
    apply_in(topo, smaller, dry_run=True)
    assert ruleset(topo) == before
    with pytest.raises(live.NftError):
        apply_in(topo, smaller, _failing(compiled(smaller)), dry_run=True)
    assert ruleset(topo) == before


def test_established_connections_survive_apply(topo: Topology) -> None:
    policy = load_policy(EXAMPLE)
    apply_in(topo, policy)
    # a UDP echo flow demo -> resolver: every datagram must come back while we apply
    echo = topo.socket("ext", socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind((RESOLVER, 53))
    client = topo.socket("enc1", socket.AF_INET, socket.SOCK_DGRAM)
    client.bind((DEMO, 0))
    client.settimeout(2)
    stop = threading.Event()

    def serve() -> None:
        echo.settimeout(0.1)
        while not stop.is_set():
            try:
                data, peer = echo.recvfrom(100)
            except TimeoutError:
                continue
            echo.sendto(data, peer)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    tcp_server = topo.socket("ext", socket.AF_INET, socket.SOCK_STREAM)
    tcp_server.bind((EXT, 443))
    tcp_server.listen(1)
    tcp_client = topo.socket("enc1", socket.AF_INET, socket.SOCK_STREAM)
    tcp_client.bind((DEMO, 0))
    tcp_client.settimeout(2)
    tcp_client.connect((EXT, 443))
    accepted, _ = tcp_server.accept()
    try:
        replies = 0
        for i in range(300):
            if i in (50, 150, 250):  # applies while the flow runs
                apply_in(topo, policy, force=True)
            client.sendto(str(i).encode(), (RESOLVER, 53))
            if client.recv(100) == str(i).encode():
                replies += 1
            time.sleep(0.001)
        assert replies == 300
        # the TCP connection made before the applies still works both ways
        tcp_client.sendall(b"ping")
        accepted.settimeout(2)
        assert accepted.recv(4) == b"ping"
        accepted.sendall(b"pong")
        assert tcp_client.recv(4) == b"pong"
    finally:
        stop.set()
        server.join()
        for sock in (echo, client, tcp_server, tcp_client, accepted):
            sock.close()


def _cli(topo: Topology, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "seng_fw", *args]
    return topo.run("gw", argv, check=False)


class StandInGateway:
    """Answers `reload` requests on a control socket as a gateway would, and records
    them (a Unix socket: reachable from every network namespace)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: list[dict[str, Any]] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen()
        self.listener.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn, conn.makefile("rwb") as stream:
                request = json.loads(stream.readline())
                self.requests.append(request)
                result = {"policy": request["args"].get("policy"), "enclaves": 0, "closed": 0}
                stream.write(json.dumps({"ok": True, "result": result}).encode() + b"\n")
                stream.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.listener.close()


def test_commands_diff_apply_and_gateway_reload(topo: Topology, tmp_path: Path) -> None:
    gateway = StandInGateway(tmp_path / "control.sock")
    control = ("--control-socket", str(gateway.path))
    nowhere = ("--control-socket", str(tmp_path / "no-gateway.sock"))
    try:
        _apply_and_reload(topo, tmp_path, gateway, control, nowhere)
    finally:
        gateway.close()


def _apply_and_reload(
    topo: Topology,
    tmp_path: Path,
    gateway: StandInGateway,
    control: tuple[str, str],
    nowhere: tuple[str, str],
) -> None:
    shown = _cli(topo, "diff", str(EXAMPLE), "--tun", "lan")
    assert shown.returncode == 1, shown.stderr  # like `git diff --exit-code`
    assert "\033[" not in shown.stdout  # no colour: not a terminal
    assert "+++ policy" in shown.stdout and "+\t\t\t192.168.28.0/24 : goto out_demo-enclave" in (
        shown.stdout
    )
    before = ruleset(topo)
    dry = _cli(topo, "apply", str(EXAMPLE), "--tun", "lan", "--dry-run", *control)
    assert dry.returncode == 0 and "nothing was changed" in dry.stdout
    assert ruleset(topo) == before and gateway.requests == []

    # apply hands the gateway the very policy it applied, with the digest it stamped
    # on the ruleset.
    done = _cli(topo, "apply", str(EXAMPLE), "--tun", "lan", *control)
    assert done.returncode == 0, done.stderr
    assert "gateway reloaded" in done.stdout
    digest = policy_digest(load_policy(EXAMPLE))
    assert gateway.requests == [
        {"command": "reload", "args": {"policy": str(EXAMPLE), "digest": digest}}
    ]
    assert topo.call("gw", lambda: live.live_digest(live.Nft())) == digest
    same = _cli(topo, "diff", str(EXAMPLE), "--tun", "lan")
    assert same.returncode == 0 and same.stdout.strip() == "no changes"

    # an apply that removes an app: its enclaves' new connections are refused; with no
    # gateway answering the ruleset is applied all the same, and apply says so (exit 3).
    assert tcp(topo, "enc1", DEMO, "ext", EXT, 443)
    smaller = without_demo(tmp_path)
    check = _cli(topo, "check", str(smaller))
    assert check.returncode == 0, check.stderr
    shown = _cli(topo, "diff", str(smaller), "--tun", "lan")
    assert shown.returncode == 1
    assert "-\t\t\t192.168.28.0/24 : goto out_demo-enclave" in shown.stdout
    stat = _cli(topo, "diff", str(smaller), "--tun", "lan", "--stat").stdout.splitlines()
    demo = next(line for line in stat if line.split()[0] == "demo-enclave").split()
    assert demo[3] == "+0" and demo[4] != "-0"  # its rules go, none come
    assert re.fullmatch(r" \d+ app\(s\) changed; rules \+\d+ -[1-9]\d*, .*", stat[-1])
    alone = _cli(topo, "apply", str(smaller), "--tun", "lan", *nowhere)
    assert alone.returncode == 3 and "no gateway answering" in alone.stderr
    assert "applied: table inet seng replaced" in alone.stdout
    assert not tcp(topo, "enc1", DEMO, "ext", EXT, 443)
    assert tcp(topo, "ext", EXT, "enc2", NGINX, 443)
    assert topo.call("gw", lambda: live.live_digest(live.Nft())) == policy_digest(
        load_policy(smaller)
    )

    # an invalid policy: exit 1, the ruleset untouched, the gateway not asked
    before = ruleset(topo)
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace("{app: sdk-nginx}", "{app: nobody}"))
    failed = _cli(topo, "apply", str(bad), "--tun", "lan", *control)
    assert failed.returncode == 1 and "unknown app 'nobody'" in failed.stderr
    assert ruleset(topo) == before
    assert len(gateway.requests) == 1


def test_apply_of_an_unchanged_policy_does_nothing(topo: Topology, tmp_path: Path) -> None:
    first = _cli(topo, "apply", str(EXAMPLE), "--tun", "lan", "--control-socket",
                 str(tmp_path / "no-gateway.sock"))  # fmt: skip
    assert first.returncode == 3, first.stderr  # applied; no gateway to hand it to
    summary = first.stdout.splitlines()[0]
    assert re.fullmatch(
        r"applied: table inet seng created: 4 apps, \d+ sets and maps with \d+ elements, "
        r"\d+ chains with \d+ rules, 8 counters \(digest [0-9a-f]{12}\)",
        summary,
    ), summary
    # no progress output (not a terminal), only that no gateway answered
    assert first.stderr.startswith("seng-fw apply: no gateway answering")
    assert len(first.stderr.splitlines()) == 1
    handles = topo.run("gw", ["nft", "-a", "list", "table", "inet", "seng"]).stdout
    # The ruleset is not touched again, but the policy is still handed to the gateway:
    # the first apply found none, so the gateway may admit by another policy.
    gateway = StandInGateway(tmp_path / "control.sock")
    try:
        again = _cli(topo, "apply", str(EXAMPLE), "--tun", "lan",
                     "--control-socket", str(gateway.path))  # fmt: skip
    finally:
        gateway.close()
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("no changes: the live table holds this ruleset")
    assert [r["args"]["policy"] for r in gateway.requests] == [str(EXAMPLE.resolve())]
    # not even reloaded: the same objects, with the same handles
    assert topo.run("gw", ["nft", "-a", "list", "table", "inet", "seng"]).stdout == handles
    dry = _cli(topo, "apply", str(EXAMPLE), "--tun", "lan", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.startswith("no changes")
    # --force loads it anyway; a changed policy is applied (replacing the table)
    forced = _cli(topo, "apply", str(EXAMPLE), "--tun", "lan", "--force")
    assert forced.stdout.startswith("applied: table inet seng replaced: 4 apps")
    assert topo.run("gw", ["nft", "-a", "list", "table", "inet", "seng"]).stdout != handles
    # an admission change alone changes no rule, but the gateway must reload it
    admission = tmp_path / "admission.yaml"
    admission.write_text(EXAMPLE.read_text().replace("min_isv_svn: 3", "min_isv_svn: 4"))
    changed = _cli(topo, "apply", str(admission), "--tun", "lan")
    assert changed.stdout.startswith("applied: table inet seng replaced: 4 apps")
    smaller = _cli(topo, "apply", str(without_demo(tmp_path)), "--tun", "lan")
    assert smaller.stdout.startswith("applied: table inet seng replaced: 3 apps")
    # the digest is not part of the diff
    same = _cli(topo, "diff", str(without_demo(tmp_path)), "--tun", "lan")
    assert same.returncode == 0 and same.stdout.strip() == "no changes"


def _objects(topo: Topology) -> list[str]:
    """The table as the kernel lists it, order and handles aside."""
    listing = topo.run("gw", ["nft", "-j", "-s", "list", "table", "inet", "seng"]).stdout
    out = []
    for obj in json.loads(listing)["nftables"]:
        body = next(iter(obj.values()))
        if isinstance(body, dict):
            body.pop("handle", None)
            if "elem" in body:
                body["elem"] = sorted(body["elem"], key=json.dumps)
        out.append(json.dumps(obj, sort_keys=True))
    return sorted(out)


def test_text_and_json_forms_load_the_same(topo: Topology) -> None:
    table = compiled(load_policy(EXAMPLE))
    topo.run("gw", ["nft", "-f", "-"], input=table.text())
    from_text = _objects(topo)
    topo.run("gw", ["nft", "-j", "-f", "-"], input=json.dumps(table.transaction()))
    from_json = _objects(topo)
    assert from_text == from_json
    assert len(from_text) > 30
    # and the annotated skeleton loads as it is
    topo.run("gw", ["nft", "-c", "-f", str(ROOT / "nft/seng.nft")])


def test_counters_are_read_straight_from_the_kernel(topo: Topology) -> None:
    """`live.read_state` reads the counters over nfnetlink: the same as nft lists."""
    from seng_fw.compile import nfnetlink

    assert topo.call("gw", lambda: nfnetlink.table_counters("inet", "seng")) is None
    assert topo.call("gw", lambda: live.read_state(live.Nft(), "seng")) == live.LiveState()
    policy = load_policy(EXAMPLE)
    apply_in(topo, policy)
    nft(topo, "add table ip seng; add counter ip seng other { packets 9 bytes 99 }")
    assert tcp(topo, "enc1", DEMO, "ext", EXT, 443)  # counted in tx_demo-enclave
    listed = json.loads(topo.run("gw", ["nft", "-j", "list", "counters", "table", "inet",
                                        "seng"]).stdout)["nftables"]  # fmt: skip
    expected = {
        obj["counter"]["name"]: (obj["counter"]["packets"], obj["counter"]["bytes"])
        for obj in listed
        if "counter" in obj
    }
    read = topo.call("gw", lambda: nfnetlink.table_counters("inet", "seng"))
    assert read == expected and read["tx_demo-enclave"][0] > 0
    assert topo.call("gw", lambda: nfnetlink.table_counters("ip", "seng")) == {"other": (9, 99)}
    state = topo.call("gw", lambda: live.read_state(live.Nft(), "seng"))
    assert state.exists and state.policy_digest == policy_digest(policy)
    assert state.digest is not None and "tx_demo-enclave" in state.counters
    assert not any(name.startswith("seng_fw_digest") for name in state.counters)


def _bench_policy(apps: int, *, shared: bool, change: bool = False) -> Policy:
    from bench.bench_compile import policy_data

    data = policy_data(apps, shared=shared)
    if change:
        data["apps"][apps // 2]["egress"][1]["ports"] = [4242]
        data["apps"][-1]["ingress"] = []
    return Policy.model_validate(data)


def test_diff_without_loading_is_the_diff_by_loading(topo: Topology, tmp_path: Path) -> None:
    """`live.diff` writes the policy's listing itself and has the kernel list only the
    objects that differ; its output is that of loading the whole table and listing it
    (`diff_by_loading`), for the example and for policies of many apps, by address and
    by label (nft 1.0.6 lists some elements of the latter byte-swapped)."""

    def both(policy: Policy) -> tuple[list[str], list[str]]:
        def run() -> tuple[list[str], list[str]]:
            fast = live.diff(compiled(policy), policy)
            slow = live.diff_by_loading(compiled(policy), policy)
            assert fast.changed == slow.changed
            if not fast.changed:
                return [], []
            return list(fast.lines()) + stat_lines(fast), list(slow.lines()) + stat_lines(slow)

        return topo.call("gw", run)

    from seng_fw.compile.cli import stat_lines

    example, smaller = load_policy(EXAMPLE), load_policy(without_demo(tmp_path))
    fast, slow = both(example)  # against no table at all
    assert fast == slow and "--- live (no seng table)" in fast
    apply_in(topo, example)
    for policy in (example, smaller):
        fast, slow = both(policy)
        assert fast == slow
    assert both(example)[0] == []
    for by_label in (False, True):
        base = _bench_policy(150, shared=by_label)
        apply_in(topo, base)
        assert both(base) == ([], [])
        fast, slow = both(_bench_policy(150, shared=by_label, change=True))
        assert fast == slow and any("4242" in line for line in fast)


def test_apply_loads_nft_syntax_as_the_json_would(topo: Topology) -> None:
    """`apply` hands libnftables the batch in nft syntax (faster, less memory than
    JSON): the kernel then holds and lists the very table the JSON batch gives, in the
    same order (diff shows objects in that order), live state and stamps included."""
    from seng_fw.compile.nft import Batch, Counter

    policy = load_policy(EXAMPLE)
    table = compiled(policy)
    exposure = policy.app("sdk-nginx").expose[0]
    state = live.LiveState(
        exists=True,
        counters={"tx_sdk-nginx": (5, 700)},
        exposed={(int(exposure.address), 6, exposure.port): IPv4Address("172.16.28.3")},
    )
    live.carry_over(table, policy, state)
    stamps = [Counter("seng_fw_digest_" + "0" * 64)]
    listings = []
    for form in ("json", "nft"):
        document = Batch(table, form).document(added=stamps)  # type: ignore[arg-type]
        topo.run("gw", ["nft", *(["-j"] if form == "json" else []), "-f", "-"], input=document)
        listings.append(topo.run("gw", ["nft", "list", "table", "inet", "seng"]).stdout)
        nft(topo, "delete table inet seng")
    assert listings[0] == listings[1]
    assert "packets 5 bytes 700" in listings[1] and "172.16.28.3" in listings[1]
    # an error names the kernel's complaint, not the (long) commands nft quotes with it
    broken = Batch(_failing(compiled(policy))).document()
    with pytest.raises(live.NftError) as refused:
        topo.call("gw", lambda: live.Nft().run_document(broken))
    assert str(refused.value) == "Error: Could not process rule: No such file or directory"
