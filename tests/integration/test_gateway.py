"""The tunnel gateway end to end: namespaces, real DTLS tunnels, real packets.

Topology (seng_fw.lab): clienta 10.77.1.10 and clientb 10.77.1.20 on a LAN with the
gateway 10.77.1.1; the external host 10.77.2.2 behind it, running TCP/UDP echo.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from seng_fw.gateway import conntrack
from seng_fw.lab.lab import (
    DEMO_NGINX,
    DEMO_UNKNOWN,
    DEMO_WEBAPP,
    ECHO_PORT,
    GATEWAY_PORT,
    EnclaveSpec,
    Lab,
    LabError,
    RunningEnclave,
)
from seng_fw.lab.services import probe_icmp, probe_tcp, probe_udp
from seng_fw.lab.topology import CLIENT_A, CLIENT_B, EXTERNAL, GATEWAY
from seng_fw.system.netns import ip, list_namespaces, netns_socket
from seng_fw.tunnel.dtls import make_client_config
from tests.support.seng_client import ScriptedEnclave, parse_udp, udp_packet

pytestmark = pytest.mark.root

WEBAPP_NET = IPv4Network("192.168.29.0/24")
NGINX_NET = IPv4Network("192.168.30.0/24")
TINY_NET = IPv4Network("192.168.31.0/30")  # exactly one leasable address (.2)
DEMO_TINY = bytes.fromhex("7" * 64)
# The tunnel tests need a policy that lets everything through (the firewall's own
# end-to-end tests are in test_policy_tunnels.py): the demo apps plus "tiny".
OPEN_RULES = """\
    egress: [{to: 0.0.0.0/0, protocol: any}]
    ingress: [{from: 0.0.0.0/0, protocol: any}]
"""
TEST_POLICY = f"""\
gateway_networks: [10.77.1.0/24, 10.77.2.0/24]
apps:
  - name: webapp
    mrenclave: {DEMO_WEBAPP.hex()}
    hosts: [10.77.1.0/24]
    subnet: {{subnet: {WEBAPP_NET}}}
{OPEN_RULES}  - name: nginx
    mrenclave: {DEMO_NGINX.hex()}
    hosts: [10.77.1.20/32]
    subnet: {{subnet: {NGINX_NET}}}
{OPEN_RULES}  - name: tiny
    mrenclave: {DEMO_TINY.hex()}
    hosts: [10.77.1.0/24]
    subnet: {{subnet: {TINY_NET}}}
{OPEN_RULES}"""
FAST_TIMEOUTS = {"pairing": 3.0, "assignment_resend": 0.5, "assignment_attempts": 6}


def _make_lab(prefix: str, tmp_path: Path, **timeouts: float) -> Lab:
    policy = tmp_path / "policy.yaml"
    policy.write_text(TEST_POLICY)
    settings = {"timeouts": {**FAST_TIMEOUTS, **timeouts}}
    return Lab(prefix, tmp_path / "state", policy, gateway_settings=settings)


@pytest.fixture
def lab(ns_prefix: str, tmp_path: Path) -> Iterator[Lab]:
    with _make_lab(ns_prefix, tmp_path) as running:
        yield running


def _up(lab: Lab, spec: EnclaveSpec) -> RunningEnclave:
    enclave = lab.start_enclave(spec)
    state = enclave.wait_settled()
    assert state["status"] == "up", (state, lab.gateway_log.read_text()[-3000:])
    return enclave


def _scripted(lab: Lab, spec: EnclaveSpec) -> ScriptedEnclave:
    cert, key = lab.enclave_credentials(spec)
    config = make_client_config(
        cert.read_bytes(), key.read_bytes(), (lab.state_dir / "server.pem").read_bytes()
    )
    return ScriptedEnclave(lab.ns(spec.host), (str(lab.gateway_lan), GATEWAY_PORT), config)


def _counters_at_stop(lab: Lab) -> dict[str, int]:
    assert lab.stop_gateway() == 0
    match = re.search(r"gateway stopped: (.*)", lab.gateway_log.read_text())
    assert match, lab.gateway_log.read_text()[-2000:]
    # key=value pairs (the counters' dotted names), not a Python dict
    pairs = (item.split("=", 1) for item in match.group(1).split())
    return {key: int(value) for key, value in pairs}


def _udp_listener(lab: Lab, port: int) -> socket.socket:
    sock = netns_socket(lab.ns(EXTERNAL), socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((str(lab.external), port))
    except BaseException:
        sock.close()
        raise
    sock.settimeout(1.5)
    return sock


def test_admitted_enclaves_reach_tcp_udp_icmp_services_in_their_app_subnets(lab: Lab) -> None:
    web_a = _up(lab, EnclaveSpec("web-a", CLIENT_A, DEMO_WEBAPP))
    web_b = _up(lab, EnclaveSpec("web-b", CLIENT_B, DEMO_WEBAPP, key_type="rsa"))
    nginx = _up(lab, EnclaveSpec("nginx-b", CLIENT_B, DEMO_NGINX))
    assert web_a.address in WEBAPP_NET and web_b.address in WEBAPP_NET
    assert web_a.address != web_b.address
    assert nginx.address in NGINX_NET
    ext = str(lab.external)
    for enclave in (web_a, web_b, nginx):
        ns = lab.ns(enclave.spec.host)
        assert probe_tcp(ns, enclave.address, ext, ECHO_PORT), enclave.spec.name
        assert probe_udp(ns, enclave.address, ext, ECHO_PORT), enclave.spec.name
        assert probe_icmp(ns, enclave.address, ext), enclave.spec.name
    # The external host reaches an enclave too (the reply goes back through tunnel #1).
    assert probe_icmp(lab.ns(EXTERNAL), None, str(web_a.address))

    # An enclave that reconnects gets a fresh lease, and the old address stops answering.
    old = web_a.address
    lab.stop_enclave(web_a)
    assert lab.wait_for_log(rf"released {re.escape(str(old))}\b")
    again = _up(lab, EnclaveSpec("web-a", CLIENT_A, DEMO_WEBAPP))
    assert again.address != old and again.address in WEBAPP_NET
    assert probe_tcp(lab.ns(CLIENT_A), again.address, ext, ECHO_PORT)
    assert not probe_icmp(lab.ns(EXTERNAL), None, str(old))


@pytest.mark.parametrize(
    ("spec", "check"),
    [
        (EnclaveSpec("unknown", CLIENT_A, DEMO_UNKNOWN), "unknown_mrenclave"),
        (EnclaveSpec("nginx-on-a", CLIENT_A, DEMO_NGINX), "host_not_allowed"),
        (EnclaveSpec("debug", CLIENT_A, DEMO_WEBAPP, debug=True), "debug_enclave"),
        (EnclaveSpec("fake-ca", CLIENT_B, DEMO_WEBAPP, untrusted_ca=True), "untrusted_root"),
    ],
)
def test_refused_enclaves_get_no_address_and_others_keep_working(
    lab: Lab, spec: EnclaveSpec, check: str
) -> None:
    admitted = _up(lab, EnclaveSpec("web-a", CLIENT_A, DEMO_WEBAPP))
    refused = lab.start_enclave(spec)
    state = refused.wait_settled()
    assert state["status"] == "refused"
    assert "address" not in state
    reason = lab.wait_for_log(rf"rejected host=\S+ port={state['local'][1]}: (\w+)")
    assert reason is not None and reason.group(1) == check
    assert refused.process.wait(5) == 1
    # The gateway keeps serving: the admitted enclave works, and a new one is admitted.
    assert probe_tcp(lab.ns(CLIENT_A), admitted.address, str(lab.external), ECHO_PORT)
    later = _up(lab, EnclaveSpec("web-b", CLIENT_B, DEMO_WEBAPP))
    assert probe_udp(lab.ns(CLIENT_B), later.address, str(lab.external), ECHO_PORT)


def test_spoofed_sources_and_unleased_destinations_are_dropped(
    lab: Lab, closer: contextlib.ExitStack
) -> None:
    enclave = closer.enter_context(_scripted(lab, EnclaveSpec("scripted", CLIENT_A, DEMO_WEBAPP)))
    assignment = enclave.connect()
    assert enclave.uplink is not None and enclave.downlink is not None
    listener = closer.enter_context(_udp_listener(lab, 9999))
    ext = lab.external

    enclave.uplink.send(udp_packet(assignment.ip, ext, 4000, 9999, b"genuine"))
    data, (source, sport) = listener.recvfrom(100)
    assert (data, IPv4Address(source), sport) == (b"genuine", assignment.ip, 4000)

    # The answer travels back through tunnel #2 as one IPv4 packet per record.
    listener.sendto(b"answer", (str(assignment.ip), 4000))
    reply = enclave.downlink.next_record()
    assert reply is not None
    assert parse_udp(reply) == (ext, assignment.ip, 9999, 4000, b"answer")

    spoofed = assignment.ip + 1
    enclave.uplink.send(udp_packet(spoofed, ext, 4000, 9999, b"spoofed"))
    with pytest.raises(TimeoutError):
        listener.recvfrom(100)

    # From the outside, to an enclave address nobody holds: dropped by the gateway.
    listener.sendto(b"nobody", (str(assignment.ip + 50), 4000))
    listener.sendto(b"nobody", (str(spoofed), 4000))
    assert enclave.downlink.next_record(timeout=1.0) is None

    counters = _counters_at_stop(lab)
    assert counters["dropped.spoofed"] == 1
    assert counters["dropped.no_enclave"] == 2


def test_tunnel_2_never_opened_releases_the_lease_after_the_pairing_timeout(
    lab: Lab, closer: contextlib.ExitStack
) -> None:
    enclave = closer.enter_context(_scripted(lab, EnclaveSpec("half", CLIENT_A, DEMO_WEBAPP)))
    assert enclave.open_uplink().handshake()
    assignment = enclave.take_assignment()
    assert enclave.uplink is not None
    started = time.monotonic()
    assert enclave.uplink.wait_closed(timeout=10.0) == "close_notify"
    assert 2.5 <= time.monotonic() - started <= 6.0  # FAST_TIMEOUTS: 3 s
    assert lab.wait_for_log(rf"address={assignment.ip} .* reason=pairing_timeout")
    assert lab.wait_for_log(rf"released {re.escape(str(assignment.ip))}\b")


def test_a_lost_ip_assignment_is_resent_and_setup_completes(
    lab: Lab, closer: contextlib.ExitStack
) -> None:
    enclave = closer.enter_context(_scripted(lab, EnclaveSpec("lossy", CLIENT_A, DEMO_WEBAPP)))
    assert enclave.open_uplink().handshake()
    first = enclave.take_assignment(acknowledge=False)  # "lost": never acknowledged
    second = enclave.take_assignment(acknowledge=True, timeout=3.0)  # the resend
    assert second == first
    assert enclave.open_downlink().handshake()
    assert enclave.uplink is not None and enclave.downlink is not None
    listener = closer.enter_context(_udp_listener(lab, 9998))
    enclave.uplink.send(udp_packet(first.ip, lab.external, 5000, 9998, b"hello"))
    assert listener.recvfrom(100)[0] == b"hello"


def test_garbage_truncated_and_replayed_datagrams_do_not_disturb_tunnels(
    lab: Lab, closer: contextlib.ExitStack
) -> None:
    enclave = closer.enter_context(_scripted(lab, EnclaveSpec("victim", CLIENT_A, DEMO_WEBAPP)))
    assignment = enclave.connect()
    assert enclave.uplink is not None and enclave.downlink is not None
    listener = closer.enter_context(_udp_listener(lab, 9997))

    def round_trip(payload: bytes) -> None:
        assert enclave.uplink is not None and enclave.downlink is not None
        enclave.uplink.send(udp_packet(assignment.ip, lab.external, 6000, 9997, payload))
        data, address = listener.recvfrom(100)
        assert data == payload
        listener.sendto(payload, address)
        reply = enclave.downlink.next_record()
        assert reply is not None and parse_udp(reply)[-1] == payload

    round_trip(b"before")
    gateway = str(lab.gateway_lan)
    attacker = closer.enter_context(
        netns_socket(lab.ns(CLIENT_B), socket.AF_INET, socket.SOCK_DGRAM)
    )
    for port in (GATEWAY_PORT, GATEWAY_PORT + 1):
        for junk in (b"", b"\x00", b"\x16\xfe\xfd" + bytes(50), bytes(range(256)) * 5):
            attacker.sendto(junk, (gateway, port))
    for conn in (enclave.uplink, enclave.downlink):
        for datagram in conn.sent:
            conn.sock.send(datagram)  # replayed from the enclave's own address
            conn.sock.send(datagram[: len(datagram) // 2])  # truncated
            attacker.sendto(datagram, (gateway, conn.sock.getpeername()[1]))  # foreign
    round_trip(b"after")
    # ...and the gateway still admits newcomers.
    newcomer = _up(lab, EnclaveSpec("newcomer", CLIENT_B, DEMO_WEBAPP))
    assert probe_tcp(lab.ns(CLIENT_B), newcomer.address, str(lab.external), ECHO_PORT)


def test_an_enclave_restarting_on_the_same_port_reconnects(
    lab: Lab, closer: contextlib.ExitStack
) -> None:
    spec = EnclaveSpec("restarts", CLIENT_A, DEMO_WEBAPP)
    first = closer.enter_context(_scripted(lab, spec))
    old = first.connect()
    assert first.uplink is not None and first.downlink is not None
    port = first.uplink.sock.getsockname()[1]
    first.uplink.sock.close()  # the enclave dies: no close_notify
    first.downlink.sock.close()
    second = closer.enter_context(_scripted(lab, spec))
    assert second.open_uplink(local_port=port).handshake()
    new = second.take_assignment()
    assert second.open_downlink().handshake()
    assert new.ip != old.ip
    assert lab.wait_for_log(rf"address={old.ip} .* reason=reconnected")
    listener = closer.enter_context(_udp_listener(lab, 9995))
    assert second.uplink is not None
    second.uplink.send(udp_packet(new.ip, lab.external, 5000, 9995, b"back"))
    assert listener.recvfrom(100)[0] == b"back"


def test_freed_address_is_leased_again_only_after_its_conntrack_entries_are_gone(
    lab: Lab, closer: contextlib.ExitStack
) -> None:
    # Conntrack starts tracking in a namespace once a ruleset uses it.
    gw = lab.ns(GATEWAY)
    ip("link", "set", "lo", "up", netns=gw)
    ruleset = "table ip labtest {\n chain forward {\n type filter hook forward priority 0;\n"
    ruleset += " ct state new counter\n }\n}\n"
    subprocess.run(
        ["ip", "netns", "exec", gw, "nft", "-f", "-"], input=ruleset.encode(), check=True
    )

    first = closer.enter_context(_scripted(lab, EnclaveSpec("tiny-1", CLIENT_A, DEMO_TINY)))
    assignment = first.connect()
    assert assignment.ip == TINY_NET[2]
    assert first.uplink is not None
    closer.enter_context(_udp_listener(lab, 9996))  # a receiver for the datagram
    first.uplink.send(udp_packet(assignment.ip, lab.external, 7000, 9996, b"tracked"))
    deadline = time.monotonic() + 5
    while conntrack.count_address(assignment.ip, netns=gw) == 0:
        assert time.monotonic() < deadline, "no conntrack entry appeared"
        time.sleep(0.05)

    first.close()  # close_notify: lease released, flush pending
    # Until the flush is confirmed the address is quarantined (a newcomer meanwhile would
    # be refused with pool_exhausted rather than inherit the old connections).
    assert lab.wait_for_log(rf"conntrack: deleted \d+ entries of {assignment.ip}\b")
    second = closer.enter_context(_scripted(lab, EnclaveSpec("tiny-2", CLIENT_B, DEMO_TINY)))
    assert second.connect().ip == assignment.ip  # the only address: reused
    assert conntrack.count_address(assignment.ip, netns=gw) == 0
    log = lab.gateway_log.read_text()
    flushed = re.search(rf"conntrack: deleted ([1-9]\d*) entries of {assignment.ip}\b", log)
    assert flushed, log[-2000:]
    second_lease = [m.start() for m in re.finditer(rf"\bleased {assignment.ip} to ", log)][1]
    assert flushed.start() < second_lease


def test_sigterm_closes_every_tunnel_and_removes_the_tun_device(
    lab: Lab, closer: contextlib.ExitStack
) -> None:
    enclave = _up(lab, EnclaveSpec("web-a", CLIENT_A, DEMO_WEBAPP))
    scripted = closer.enter_context(_scripted(lab, EnclaveSpec("scripted", CLIENT_B, DEMO_WEBAPP)))
    scripted.connect()
    started = time.monotonic()
    assert lab.stop_gateway(signal.SIGTERM, timeout=5.0) == 0
    assert time.monotonic() - started < 5.0
    assert "tunFA" not in ip("link", "show", netns=lab.ns(GATEWAY))
    assert scripted.uplink is not None and scripted.downlink is not None
    assert scripted.uplink.wait_closed(3.0) == "close_notify"
    assert scripted.downlink.wait_closed(3.0) == "close_notify"
    # The emulator sees close_notify too and exits, reporting the tunnel down.
    assert enclave.process.wait(5) == 1
    assert enclave.read_state()["status"] == "down"


def test_sighup_reload_closes_tunnels_of_apps_no_longer_admitted(lab: Lab) -> None:
    web = _up(lab, EnclaveSpec("web-b", CLIENT_B, DEMO_WEBAPP))
    nginx = _up(lab, EnclaveSpec("nginx-b", CLIENT_B, DEMO_NGINX))
    text = lab.policy.read_text()
    start = text.index("  - name: nginx")
    end = text.index("  - name: tiny")
    lab.policy.write_text(text[:start] + text[end:])
    lab.reload_gateway()
    assert nginx.process.wait(10) == 1
    assert lab.wait_for_log(r"app=nginx .* reason=revoked\.unknown_mrenclave")
    assert probe_tcp(lab.ns(CLIENT_B), web.address, str(lab.external), ECHO_PORT)
    again = lab.start_enclave(EnclaveSpec("nginx-again", CLIENT_B, DEMO_NGINX))
    assert again.wait_settled()["status"] == "refused"


def test_a_bad_policy_on_reload_keeps_the_running_one(lab: Lab) -> None:
    web = _up(lab, EnclaveSpec("web-a", CLIENT_A, DEMO_WEBAPP))
    lab.policy.write_text(lab.policy.read_text().replace("hosts:", "hostz:", 1))
    lab.reload_gateway()
    assert lab.wait_for_log(r"policy reload failed, keeping the running policy: .*hostz")
    assert probe_tcp(lab.ns(CLIENT_A), web.address, str(lab.external), ECHO_PORT)


def test_idle_tunnels_are_closed(ns_prefix: str, tmp_path: Path) -> None:
    with (
        _make_lab(ns_prefix, tmp_path, idle=2.0) as lab,
        _scripted(lab, EnclaveSpec("idle", CLIENT_A, DEMO_WEBAPP)) as enclave,
    ):
        enclave.connect()
        assert enclave.uplink is not None
        assert enclave.uplink.wait_closed(8.0) == "close_notify"
        assert lab.wait_for_log(r"reason=idle_timeout")


def test_emulator_with_its_own_namespace_routes_everything_through_the_tunnel(lab: Lab) -> None:
    # The enclave's namespace holds only the TUN device: ordinary, unbound sockets there
    # reach the external host through the gateway, while the tunnels leave from clienta.
    enclave_ns = f"{lab.prefix}encl"
    subprocess.run(["ip", "netns", "add", enclave_ns], check=True)
    ip("link", "set", "lo", "up", netns=enclave_ns)
    cert, key = lab.enclave_credentials(EnclaveSpec("own-ns", CLIENT_A, DEMO_WEBAPP))
    state_file = cert.parent / "state.json"
    process = lab.topology.popen(
        CLIENT_A,
        [sys.executable, "-m", "seng_fw", "lab", "enclave",
         "--server", f"{lab.gateway_lan}:{GATEWAY_PORT}",
         "--server-cert", str(lab.state_dir / "server.pem"), "--cert", str(cert),
         "--key", str(key), "--netns", enclave_ns, "--state-file", str(state_file)],
    )  # fmt: skip
    try:
        spec = EnclaveSpec("own-ns", CLIENT_A, DEMO_WEBAPP)
        enclave = RunningEnclave(spec, process, state_file, cert.parent / "log")
        state = enclave.wait_settled()
        assert state["status"] == "up", state
        assert "seng0" in ip("link", "show", netns=enclave_ns)
        assert probe_tcp(enclave_ns, None, str(lab.external), ECHO_PORT)
        assert probe_icmp(enclave_ns, None, str(lab.external))
    finally:
        process.terminate()
        process.wait(5)
    assert "seng0" not in ip("link", "show", netns=enclave_ns)


def test_a_failed_lab_up_leaves_nothing_behind(ns_prefix: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("apps:\n  - name: x\n    mrenclave: nothex\n")
    lab = Lab(ns_prefix, tmp_path / "state", broken)
    with pytest.raises(LabError, match="mrenclave"):
        lab.up()
    assert list_namespaces(ns_prefix) == []
    assert not (tmp_path / "state").exists()
