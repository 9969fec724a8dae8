"""Attacks on a running gateway in namespaces (issue 14, "what holds today", kept as tests).

Already tested elsewhere, not repeated here: garbage, truncated and replayed datagrams
from the enclave's own and a foreign address (test_gateway.py), forged datagrams from the
peer's address and port (test_tunnel_forgery.py), tunnel #2 never opened
(test_gateway.py), spoofed sources (test_gateway.py), an oversized control line in
process (tests/unit/test_control.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from seng_fw.lab.lab import DEMO_WEBAPP, GATEWAY_PORT, EnclaveSpec, Lab
from seng_fw.lab.services import probe_tcp
from seng_fw.lab.topology import CLIENT_A, CLIENT_B, EXTERNAL
from seng_fw.ops.control import ControlClient, ControlUnavailable
from seng_fw.system.netns import netns_socket
from seng_fw.tunnel.dtls import DtlsClientSession, make_client_config
from seng_fw.tunnel.messages import IpAssignment
from seng_fw.tunnel.packets import inet_checksum
from tests.integration.test_gateway import DEMO_TINY, TEST_POLICY, TINY_NET
from tests.support.seng_client import Conn, ScriptedEnclave, parse_udp, udp_packet

pytestmark = pytest.mark.root

FAST_TIMEOUTS = {"pairing": 3.0, "assignment_resend": 0.5, "assignment_attempts": 6}


@pytest.fixture
def lab(ns_prefix: str, tmp_path: Path) -> Iterator[Lab]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(TEST_POLICY)
    settings = {"timeouts": FAST_TIMEOUTS}
    with Lab(ns_prefix, tmp_path / "state", policy, gateway_settings=settings) as running:
        yield running


def _config(lab: Lab, spec: EnclaveSpec) -> object:
    cert, key = lab.enclave_credentials(spec)  # a fresh certificate and key each time
    return make_client_config(
        cert.read_bytes(), key.read_bytes(), (lab.state_dir / "server.pem").read_bytes()
    )


def _scripted(lab: Lab, spec: EnclaveSpec, host: str | None = None) -> ScriptedEnclave:
    gateway = (str(lab.gateway_lan), GATEWAY_PORT)
    return ScriptedEnclave(lab.ns(host or spec.host), gateway, _config(lab, spec))  # type: ignore[arg-type]


class _Echo:
    """A UDP listener on the external host and round trips through a scripted enclave
    (a context manager: leaving it closes the listener)."""

    def __init__(self, lab: Lab, enclave: ScriptedEnclave, port: int) -> None:
        assert enclave.assignment is not None
        self.lab, self.enclave, self.port = lab, enclave, port
        self.sock = netns_socket(lab.ns(EXTERNAL), socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind((str(lab.external), port))
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(2.0)

    def round_trip(self, payload: bytes) -> None:
        enclave = self.enclave
        assert enclave.uplink is not None and enclave.downlink is not None
        assert enclave.assignment is not None
        packet = udp_packet(enclave.assignment.ip, self.lab.external, 6000, self.port, payload)
        enclave.uplink.send(packet)
        data, address = self.sock.recvfrom(2000)
        assert data == payload
        self.sock.sendto(payload, address)
        reply = enclave.downlink.next_record()
        assert reply is not None and parse_udp(reply)[-1] == payload

    def nothing_arrives(self) -> bool:
        self.sock.settimeout(1.0)
        try:
            self.sock.recvfrom(2000)
            return False
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(2.0)

    def __enter__(self) -> _Echo:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()


def _counters_at_stop(lab: Lab) -> dict[str, int]:
    assert lab.stop_gateway() == 0
    match = re.search(r"gateway stopped: (.*)", lab.gateway_log.read_text())
    assert match, lab.gateway_log.read_text()[-2000:]
    # key=value pairs (the counters' dotted names), not a Python dict
    pairs = (item.split("=", 1) for item in match.group(1).split())
    return {key: int(value) for key, value in pairs}


def _rss_mb(lab: Lab) -> float:
    assert lab.gateway is not None
    for line in Path(f"/proc/{lab.gateway.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _newcomer_works(lab: Lab) -> None:
    enclave = lab.start_enclave(EnclaveSpec("newcomer", CLIENT_B, DEMO_WEBAPP))
    state = enclave.wait_settled()
    assert state["status"] == "up", (state, lab.gateway_log.read_text()[-2000:])
    assert probe_tcp(lab.ns(CLIENT_B), enclave.address, str(lab.external), 7)


# --- datagrams --------------------------------------------------------------------------


def test_a_client_hello_flood_without_cookies_leaves_tunnels_and_memory_unharmed(
    lab: Lab, closer: contextlib.ExitStack
) -> None:
    victim = closer.enter_context(_scripted(lab, EnclaveSpec("victim", CLIENT_A, DEMO_WEBAPP)))
    victim.connect()
    echo = closer.enter_context(_Echo(lab, victim, 9990))
    echo.round_trip(b"before")
    # A genuine ClientHello (no cookie), as the first flight of any client.
    hello = DtlsClientSession(_config(lab, EnclaveSpec("x", CLIENT_B, DEMO_WEBAPP)), 0.0)  # type: ignore[arg-type]
    datagram = hello.datagrams_to_send()[0]
    assert datagram[0] == 22 and datagram[13] == 1
    rss_before = _rss_mb(lab)
    gateway = str(lab.gateway_lan)
    for burst in range(10):
        # From 100 fresh ports and one busy one, to both tunnel ports.
        with contextlib.ExitStack() as opened:
            sockets = [
                opened.enter_context(
                    netns_socket(lab.ns(CLIENT_B), socket.AF_INET, socket.SOCK_DGRAM)
                )
                for _ in range(101)
            ]
            for i in range(1000):
                sock = sockets[0] if i % 2 else sockets[1 + i % 100]
                sock.sendto(datagram, (gateway, GATEWAY_PORT + i % 2))
        echo.round_trip(f"during {burst}".encode())
    echo.round_trip(b"after")
    growth = _rss_mb(lab) - rss_before
    assert growth < 30, f"gateway RSS grew {growth:.0f} MB under a cookie-less hello flood"
    _newcomer_works(lab)


def _record(content: int, epoch: int, seq: int, body: bytes, length: int | None = None) -> bytes:
    header = bytes([content]) + b"\xfe\xfd" + epoch.to_bytes(2, "big") + seq.to_bytes(6, "big")
    return header + (len(body) if length is None else length).to_bytes(2, "big") + body


CRAFTED = [
    _record(23, 1, 1, bytes(40)),  # application data under a key nobody has
    _record(23, 0, 0, b""),
    _record(23, 0xFFFF, (1 << 48) - 1, bytes(24)),
    _record(21, 1, 5, b"\x02\x28"),  # an unauthenticated fatal alert
    _record(21, 0, 5, b"\x01\x00"),  # a plaintext close_notify
    _record(20, 0, 3, b"\x01"),  # ChangeCipherSpec out of nowhere
    _record(22, 0, 0, b"\x01" + bytes(11)),  # a ClientHello header without a body
    _record(22, 0, 0, b"\x01\x00\xff\xff" + bytes(8), 0xFFFF),  # length beyond the datagram
    _record(22, 0, 1, b"\x0b" + bytes(30)),  # a Certificate with no hello before it
    _record(22, 1, 9, bytes(60)),  # an encrypted Finished nobody expects
    _record(23, 1, 1, bytes(40)) + b"\x17\xfe",  # stray bytes after a record
    bytes.fromhex("17fefd0000000000000000010000") + b"\0\0",  # issue 14 item 1's shape
    b"\x16\xfe\xff" + bytes(10) + b"\x00\x00",  # DTLS 1.0 version
    b"\x16\x03\x03\x00\x05hello",  # TLS, not DTLS
]


def test_crafted_record_headers_from_fresh_ports_disturb_no_tunnel(
    lab: Lab, closer: contextlib.ExitStack
) -> None:
    victim = closer.enter_context(_scripted(lab, EnclaveSpec("victim", CLIENT_A, DEMO_WEBAPP)))
    victim.connect()
    echo = closer.enter_context(_Echo(lab, victim, 9991))
    echo.round_trip(b"before")
    gateway = str(lab.gateway_lan)
    for host in (CLIENT_A, CLIENT_B):  # the victim's own host too
        for datagram in CRAFTED:
            for port in (GATEWAY_PORT, GATEWAY_PORT + 1):
                with netns_socket(lab.ns(host), socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.sendto(datagram, (gateway, port))
        echo.round_trip(f"after {host}".encode())
    _newcomer_works(lab)


def _ipv4(
    src: IPv4Address, dst: IPv4Address, *, version: int = 4, ihl: int = 5, total: int | None = None
) -> bytes:
    payload = bytes(8)
    header = bytearray(
        bytes([version << 4 | ihl, 0]) + (total or 28).to_bytes(2, "big") + bytes(4)
        + bytes([64, 17]) + bytes(2) + src.packed + dst.packed
    )  # fmt: skip
    header[10:12] = inet_checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + payload


def test_malformed_ipv4_from_an_enclave_is_dropped_counted_and_harmless(
    lab: Lab, closer: contextlib.ExitStack
) -> None:
    enclave = closer.enter_context(_scripted(lab, EnclaveSpec("sloppy", CLIENT_A, DEMO_WEBAPP)))
    assignment = enclave.connect()
    echo = closer.enter_context(_Echo(lab, enclave, 9992))
    echo.round_trip(b"before")
    me, ext = assignment.ip, lab.external
    malformed = [
        b"\x45",  # one byte
        _ipv4(me, ext)[:19],  # a truncated header
        _ipv4(me, ext, version=6),
        _ipv4(me, ext, ihl=4),  # header shorter than 20 bytes
        _ipv4(me, ext, ihl=15),  # header longer than the packet
        _ipv4(me, ext, total=27),  # total length short of the record
        _ipv4(me, ext, total=29),  # ... and beyond it
        _ipv4(me, ext, total=0xFFFF),
        _ipv4(me, ext) + b"\0",  # one byte of junk behind the packet
    ]
    assert enclave.uplink is not None
    for packet in malformed:
        enclave.uplink.send(packet)
    assert echo.nothing_arrives()
    echo.round_trip(b"after")
    counters = _counters_at_stop(lab)
    assert counters["dropped.not_ipv4"] == len(malformed), counters


# --- setup and pairing -------------------------------------------------------------------


def test_tunnel_2_from_another_host_or_with_another_certificate_is_refused(
    lab: Lab, closer: contextlib.ExitStack
) -> None:
    spec = EnclaveSpec("paired", CLIENT_A, DEMO_WEBAPP)
    genuine = closer.enter_context(_scripted(lab, spec))
    assert genuine.open_uplink().handshake()
    genuine.take_assignment()
    gateway = (str(lab.gateway_lan), GATEWAY_PORT + 1)
    # The same certificate and key, from the other client host.
    elsewhere = closer.enter_context(Conn(lab.ns(CLIENT_B), gateway, genuine.config))
    assert elsewhere.handshake() and elsewhere.wait_closed(5.0) == "close_notify"
    # Another certificate for the same MRENCLAVE, from the genuine enclave's own host.
    impostor = closer.enter_context(Conn(lab.ns(CLIENT_A), gateway, _config(lab, spec)))  # type: ignore[arg-type]
    assert impostor.handshake() and impostor.wait_closed(5.0) == "close_notify"
    # The genuine tunnel #2 still pairs: the refused ones took nothing from it.
    assert genuine.open_downlink().handshake()
    echo = closer.enter_context(_Echo(lab, genuine, 9993))
    echo.round_trip(b"paired")
    counters = _counters_at_stop(lab)
    assert counters["rejected.unpaired_downlink"] == 2, counters


def test_clients_that_never_acknowledge_give_their_address_back(
    lab: Lab, closer: contextlib.ExitStack
) -> None:
    """The tiny app's /30 has one leasable address: each silent client must return it."""
    spec = EnclaveSpec("silent", CLIENT_A, DEMO_TINY)
    leased: list[IPv4Address] = []
    for attempt in range(3):
        silent = closer.enter_context(_scripted(lab, spec))
        assert silent.open_uplink().handshake()
        assert silent.uplink is not None
        record = silent.uplink.next_record(10.0)
        assert record is not None, lab.gateway_log.read_text()[-3000:]
        assignment = IpAssignment.decode(record)  # never acknowledged, and no tunnel #2
        assert assignment.ip in TINY_NET
        leased.append(assignment.ip)
        assert silent.uplink is not None
        assert silent.uplink.wait_closed(10.0) == "close_notify"
        released = rf"entries of {re.escape(str(assignment.ip))}; address free"
        deadline = time.monotonic() + 10.0
        while len(re.findall(released, lab.gateway_log.read_text())) <= attempt:
            assert time.monotonic() < deadline, lab.gateway_log.read_text()[-2000:]
            time.sleep(0.05)
        silent.close()
    assert len(set(leased)) == 1
    honest = closer.enter_context(_scripted(lab, spec))
    assert honest.connect().ip == leased[0]


# --- the control socket ------------------------------------------------------------------


def _control_path(lab: Lab) -> Path:
    return lab.state_dir / "control.sock"


def test_control_socket_refuses_a_non_root_user(lab: Lab) -> None:
    path = _control_path(lab)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660  # root:root: only root may connect
    # Let nobody traverse to the socket, so that the socket's own mode is what refuses.
    opened: list[tuple[Path, int]] = []
    directory = path.parent
    try:
        while directory != directory.parent:
            mode = stat.S_IMODE(directory.stat().st_mode)
            if not mode & stat.S_IXOTH:
                opened.append((directory, mode))
                os.chmod(directory, mode | stat.S_IXOTH)
            directory = directory.parent
        pid = os.fork()
        if pid == 0:  # the child: become nobody, try to connect
            code = 1
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.connect(str(path))
                code = 0
            except PermissionError:
                code = 13
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        for directory, mode in opened:
            os.chmod(directory, mode)
    assert os.waitstatus_to_exitcode(status) == 13  # EACCES: refused by the socket's mode
    assert "pid" in ControlClient(path).request("status")  # root still may


def test_control_socket_refuses_a_100_mb_line_and_keeps_answering(lab: Lab) -> None:
    path = _control_path(lab)
    rss_before = _rss_mb(lab)
    chunk = b"x" * (1 << 20)
    sent = 0
    answer = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.settimeout(10.0)
        try:
            for _ in range(100):  # 100 MB, no newline
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway hung up, as it should, long before the end
        try:
            while not answer.endswith(b"\n"):
                data = sock.recv(4096)
                if not data:
                    break
                answer += data
        except ConnectionResetError:
            pass
    assert b"request too long" in answer, (sent, answer)
    assert sent < 100 * len(chunk)  # refused early, not read to the end
    assert _rss_mb(lab) - rss_before < 30
    assert "pid" in ControlClient(path).request("status")


def test_control_socket_survives_1000_connections(lab: Lab) -> None:
    path = _control_path(lab)
    clients = []
    try:
        for _ in range(1000):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(sock)  # closed below, also if connect fails
            sock.connect(str(path))
        # The 1,001st: once the gateway has accepted the backlog (a full listen queue
        # makes a non-blocking connect fail with EAGAIN, so the client retries).
        deadline = time.monotonic() + 20.0
        while True:
            try:
                assert "pid" in ControlClient(path).request("status")
                break
            except ControlUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        for sock in clients[::100]:  # idle connections still get answers
            sock.sendall(b'{"command": "status"}\n')
            sock.settimeout(10.0)
            assert b'"ok": true' in sock.recv(1 << 16)
    finally:
        for sock in clients:
            sock.close()
    assert "pid" in ControlClient(path).request("status")
    _newcomer_works(lab)
