"""TunDevice in a private namespace: configuration, packets both ways, removal."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Interface
from typing import Any

import pytest

from seng_fw.lab.topology import ping
from seng_fw.system.netns import ip, netns_socket
from seng_fw.tunnel import tun as tun_module
from seng_fw.tunnel.offload import GSO_TCPV4, VNET_HDR, coalesce_tcp4, packets_of
from seng_fw.tunnel.tun import OFFLOADS, TunDevice, TunError
from tests.unit.test_offload import tcp_packet

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_tun")]

NAME = "tsfw0"


def link_info(netns: str, name: str = NAME) -> dict[str, Any] | None:
    try:
        out = ip("-j", "addr", "show", "dev", name, netns=netns)
    except Exception:
        return None
    info: list[dict[str, Any]] = json.loads(out)
    return info[0] if info else None


def inet(info: dict[str, Any]) -> set[str]:
    return {f"{a['local']}/{a['prefixlen']}" for a in info["addr_info"] if a["family"] == "inet"}


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_reply(request: bytes) -> bytes:
    """Turn an IPv4 ICMP echo request into its reply."""
    ihl = (request[0] & 0x0F) * 4
    header = bytearray(request[:ihl])
    header[12:16], header[16:20] = request[16:20], request[12:16]
    header[10:12] = b"\0\0"
    header[10:12] = struct.pack("!H", checksum(bytes(header)))
    icmp = bytearray(request[ihl:])
    icmp[0] = 0  # echo reply
    icmp[2:4] = b"\0\0"
    icmp[2:4] = struct.pack("!H", checksum(bytes(icmp)))
    return bytes(header + icmp)


def wait_readable(tun: TunDevice, timeout: float = 2.0) -> None:
    assert select.select([tun.fileno()], [], [], timeout)[0], "nothing arrived on the TUN"


def test_create_configures_device(host_ns: str) -> None:
    with TunDevice.create(
        NAME,
        mtu=1400,
        addresses=["192.168.28.1/24", "10.200.0.1/16"],
        txqueuelen=2000,
        netns=host_ns,
    ) as tun:
        info = link_info(host_ns)
        assert info is not None
        assert info["ifindex"] == tun.index
        assert info["mtu"] == 1400
        assert info["txqlen"] == 2000
        assert "UP" in info["flags"]
        assert inet(info) == {"192.168.28.1/24", "10.200.0.1/16"}
        assert not [a for a in info["addr_info"] if a["family"] == "inet6"]  # IPv6 kept off
        tun.change_addresses(
            add=[IPv4Interface("192.168.29.1/24")], remove=[IPv4Interface("10.200.0.1/16")]
        )
        info = link_info(host_ns)
        assert info is not None and inet(info) == {"192.168.28.1/24", "192.168.29.1/24"}
    assert link_info(host_ns) is None


def test_addresses_changed_in_one_batch(host_ns: str) -> None:
    with TunDevice.create(NAME, addresses=["192.168.28.1/24"], netns=host_ns) as tun:
        subnets = [IPv4Interface(f"100.64.{i}.1/24") for i in range(50)]
        tun.change_addresses(add=subnets)
        info = link_info(host_ns)
        assert info is not None and len(inet(info)) == 51
        # Already there (add) and already gone (remove) are not errors.
        tun.change_addresses(add=subnets[:2], remove=[*subnets[2:], IPv4Interface("10.9.9.1/24")])
        info = link_info(host_ns)
        assert info is not None and inet(info) == {"192.168.28.1/24", *map(str, subnets[:2])}


def test_defaults_match_original_seng(host_ns: str) -> None:
    with TunDevice.create(netns=host_ns) as tun:
        info = link_info(host_ns, "tunFA")
        assert info is not None and info["mtu"] == 1432 == tun.mtu


def test_ping_answered_through_tun(host_ns: str) -> None:
    with (
        TunDevice.create(NAME, addresses=["192.168.28.1/24"], netns=host_ns) as tun,
        ThreadPoolExecutor(1) as pool,
    ):
        answered = pool.submit(ping, host_ns, "192.168.28.2", timeout=3.0)
        wait_readable(tun)
        [request] = tun.read_batch()
        assert request[9] == socket.IPPROTO_ICMP
        assert socket.inet_ntoa(request[12:16]) == "192.168.28.1"
        assert socket.inet_ntoa(request[16:20]) == "192.168.28.2"
        assert tun.write(echo_reply(request))
        assert answered.result(timeout=5)


def test_read_batch_drains_up_to_max(host_ns: str) -> None:
    with TunDevice.create(NAME, addresses=["192.168.28.1/24"], netns=host_ns) as tun:
        assert tun.read_batch() == []
        sock = netns_socket(host_ns, socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            for i in range(10):
                sock.sendto(b"packet%d" % i, ("192.168.28.9", 5000))
        wait_readable(tun)
        time.sleep(0.05)  # let the rest of the burst reach the queue
        first = tun.read_batch(4)
        rest = tun.read_batch(100)
        assert len(first) == 4 and len(rest) == 6
        assert [p[28:] for p in first + rest] == [b"packet%d" % i for i in range(10)]
        assert tun.read_batch() == []


def test_write_reports_drops(host_ns: str) -> None:
    with TunDevice.create(NAME, addresses=["192.168.28.1/24"], netns=host_ns) as tun:
        assert tun.write(b"\x00not an IP packet") is False  # kernel: EINVAL
        assert tun.write_batch([b"\x00bad", b"\x00worse"]) == 0


def test_emulator_style_host_address_and_default_route(host_ns: str) -> None:
    with TunDevice.create(NAME, addresses=["192.168.28.7/32"], netns=host_ns) as tun:
        tun.add_route("0.0.0.0/0")
        tun.add_route("10.77.2.0/24", src="192.168.28.7")
        routes = ip("route", netns=host_ns)
        assert f"default dev {NAME}" in routes
        sock = netns_socket(host_ns, socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.sendto(b"out", ("198.51.100.1", 53))
        wait_readable(tun)
        [packet] = tun.read_batch()
        assert socket.inet_ntoa(packet[12:16]) == "192.168.28.7"
        tun.remove_route("0.0.0.0/0")
        assert "default" not in ip("route", netns=host_ns)


def test_close_is_idempotent_and_removes_device(host_ns: str) -> None:
    tun = TunDevice.create(NAME, netns=host_ns)
    assert link_info(host_ns) is not None
    tun.close()
    tun.close()
    assert tun.closed
    assert link_info(host_ns) is None
    with pytest.raises(ValueError):
        tun.fileno()


def test_close_removes_persistent_device(host_ns: str) -> None:
    tun = TunDevice.create(NAME, netns=host_ns)
    tun.set_persistent(True)
    tun.close()
    assert link_info(host_ns) is None


def test_takes_over_a_leftover_persistent_device(host_ns: str) -> None:
    ip("tuntap", "add", "dev", NAME, "mode", "tun", netns=host_ns)
    ip("addr", "add", "192.168.28.1/24", "dev", NAME, netns=host_ns)
    with TunDevice.create(NAME, addresses=["192.168.28.1/24"], netns=host_ns) as tun:
        info = link_info(host_ns)
        assert info is not None and info["ifindex"] == tun.index
    assert link_info(host_ns) is None


def test_failed_create_leaves_nothing(host_ns: str) -> None:
    with pytest.raises(TunError):
        TunDevice.create(NAME, routes=["10.0.0.0/8", "10.0.0.0/8"], netns=host_ns)
    assert link_info(host_ns) is None


def test_name_of_another_kind_of_device_is_refused(host_ns: str) -> None:
    with pytest.raises(TunError):
        TunDevice.create("lo", netns=host_ns)
    assert link_info(host_ns, "lo") is not None


def test_close_after_namespace_is_gone(ns_prefix: str) -> None:
    ns = ns_prefix + "gone"
    ip("netns", "add", ns)
    tun = TunDevice.create(NAME, netns=ns)
    ip("netns", "delete", ns)
    tun.close()
    assert tun.closed


# ----- offloads: TSO reads cut into packets, coalesced writes ------------------------

PEER = "192.168.28.2"
MSS_OPTION = struct.pack("!BBH", 2, 4, 1392)


def syn_ack_for(syn: bytes, seq: int) -> bytes:
    """The peer's SYN-ACK (with an MSS option) to the kernel's SYN read from the TUN."""
    sport, dport = struct.unpack("!HH", syn[20:24])
    their_seq = struct.unpack("!I", syn[24:28])[0]
    return tcp_packet(
        b"", seq=seq, ack=their_seq + 1, flags=0x12, options=MSS_OPTION, window=65535,
        src=syn[16:20], dst=syn[12:16], sport=dport, dport=sport,
    )  # fmt: skip


def wait_tcp(tun: TunDevice, raw: bool = False) -> list[bytes]:
    """TCP packets from the device (raw: the reads themselves, virtio-net header on)."""
    wait_readable(tun)
    time.sleep(0.05)
    if raw:
        reads = []
        with contextlib.suppress(BlockingIOError):
            while True:
                reads.append(os.read(tun.fileno(), 65545))
        return reads
    return [p for p in tun.read_batch(1000) if p[9] == socket.IPPROTO_TCP]


def test_offload_device_reads_tso_super_packets_cut_into_complete_packets(host_ns: str) -> None:
    with TunDevice.create(NAME, addresses=["192.168.28.1/24"], netns=host_ns,
                          offload=True) as tun:  # fmt: skip
        assert tun.vnet_hdr and tun.offloads == OFFLOADS
        sock = netns_socket(host_ns, socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect((PEER, 8000))
            [syn] = wait_tcp(tun)
            assert tun.write(syn_ack_for(syn, 5000))
            assert wait_tcp(tun)[0][33] == 0x10  # the kernel's ACK of the SYN-ACK
            data = os.urandom(12 * 1392 + 77)
            sock.send(data)  # the initial window: ten segments, in one TSO write
            reads = wait_tcp(tun, raw=True)
        kinds = [VNET_HDR.unpack_from(r)[1] for r in reads]
        assert GSO_TCPV4 in kinds, kinds  # the kernel did hand out a super-packet
        segments = [p for r in reads for p in packets_of(r)]
        first_seq = struct.unpack("!I", syn[24:28])[0] + 1
        assert len(segments) >= 2
        payload = b""
        for segment in segments:
            assert len(segment) <= 1432
            assert struct.unpack("!H", segment[2:4])[0] == len(segment)
            assert checksum(segment[:20]) == 0
            pseudo = segment[12:20] + struct.pack("!BBH", 0, 6, len(segment) - 20)
            assert checksum(pseudo + segment[20:]) == 0
            assert struct.unpack("!I", segment[24:28])[0] == first_seq + len(payload)
            assert len(segment) - 40 <= 1392  # no options: the SYN-ACK offered none
            payload += segment[40:]
        assert payload == data[: len(payload)]


def test_coalesced_writes_reach_a_local_socket_intact(host_ns: str) -> None:
    with TunDevice.create(NAME, addresses=["192.168.28.1/24"], netns=host_ns,
                          offload=True) as tun:  # fmt: skip
        listener = netns_socket(host_ns, socket.AF_INET, socket.SOCK_STREAM)
        with listener:
            listener.bind(("192.168.28.1", 8001))
            listener.listen()
            src, dst = socket.inet_aton(PEER), socket.inet_aton("192.168.28.1")
            syn = tcp_packet(b"", seq=100, ack=0, flags=0x02, options=MSS_OPTION,
                             src=src, dst=dst, sport=40000, dport=8001)  # fmt: skip
            assert tun.write(syn)
            [syn_ack] = wait_tcp(tun)
            assert syn_ack[33] == 0x12
            ack = struct.unpack("!I", syn_ack[24:28])[0] + 1
            common = {"ack": ack, "src": src, "dst": dst, "sport": 40000, "dport": 8001}
            assert tun.write(tcp_packet(b"", seq=101, flags=0x10, **common))  # type: ignore[arg-type]
            data = os.urandom(20 * 1000 + 333)
            segments = [
                tcp_packet(data[i : i + 1000], seq=101 + i, flags=0x10, **common)  # type: ignore[arg-type]
                for i in range(0, len(data), 1000)
            ]
            writes = coalesce_tcp4(segments)
            assert [w[2] for w in writes] == [21]
            for header, parts, _ in writes:
                assert tun.write_gso(header, parts)
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(3)
                received = b""
                while len(received) < len(data):
                    received += conn.recv(65536)
            assert received == data


@pytest.mark.parametrize("refused", ["TUNSETOFFLOAD", "IFF_VNET_HDR"])
def test_refused_offloads_fall_back_and_say_so_once(
    host_ns: str, refused: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_ioctl = tun_module.fcntl.ioctl

    def ioctl(fd: int, request: int, arg: Any = 0) -> Any:
        if refused == "TUNSETOFFLOAD" and request == tun_module.TUNSETOFFLOAD:
            raise OSError(errno.EINVAL, "Invalid argument")
        if refused == "IFF_VNET_HDR" and request == tun_module.TUNSETIFF:
            flags = struct.unpack_from("H", arg, tun_module.IFNAMSIZ)[0]
            if flags & tun_module.IFF_VNET_HDR:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_ioctl(fd, request, arg)

    monkeypatch.setattr(tun_module.fcntl, "ioctl", ioctl)
    caplog.set_level(logging.WARNING, "seng_fw.tunnel")
    with (
        TunDevice.create(NAME, addresses=["192.168.28.1/24"], netns=host_ns, offload=True) as tun,
        ThreadPoolExecutor(1) as pool,
    ):
        assert tun.offloads == 0
        assert tun.vnet_hdr == (refused == "TUNSETOFFLOAD")  # the header alone still works
        answered = pool.submit(ping, host_ns, "192.168.28.2", timeout=3.0)
        wait_readable(tun)
        [request] = tun.read_batch()
        assert tun.write(echo_reply(request))
        assert answered.result(timeout=5)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "offload" in warnings[0].getMessage().lower()
