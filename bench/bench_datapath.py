"""Data path side by side: plain routing, OpenVPN 2.6 and seng-fw (issue 12). Run as root:

    .venv/bin/python bench/bench_datapath.py [--quick] [--rounds 3] [--out DIR]

One namespace lab (`Lab`: client host A, gateway, external host) carries three contenders
at once, told apart by source address on client host A:

- plain routing: A's LAN address, routed by the gateway's kernel (the ceiling);
- OpenVPN 2.6 (Debian's package; UDP, tun, AES-128-GCM, TLS with certificates made here,
  userspace; the same inner MTU as seng-fw's TUN), server in the gateway, client on A;
- seng-fw: the gateway (`seng-fw serve`) and one emulated enclave (`seng-fw lab enclave`).

Both tunnels pass the gateway's seng-fw nftables table. Each round runs every test for
every contender, in an order that rotates between rounds; the table shows medians of the
rounds, with ratios to OpenVPN and to plain routing. CPU per forwarded packet comes from
each process's own CPU time (/proc/PID/stat) and the packet counters of its TUN device;
where the client-side process (the emulator, or OpenVPN's client) is busier than the
gateway, the figure measures the client side and the table says so.

Writes results.md, results.json and results.png (needs the `bench` extra: matplotlib) to
--out. These machines are shared and noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support, as a script

from seng_fw.lab.lab import DEMO_WEBAPP, EnclaveSpec, Lab
from seng_fw.lab.topology import CLIENT_A, EXTERNAL, GATEWAY
from seng_fw.system.netns import ip
from tests.support.crowd import CROWD_LIMITS, Crowd

IPERF_PORT = 5201
OVPN_PORT = 1194
OVPN_GW, OVPN_CLIENT = "192.168.250.1", "192.168.250.2"
OVPN_DEV = "tunovpn"
OVPN_TABLE = 4300
TUN_MTU = 1432  # seng-fw's TUN default; OpenVPN gets the same inner MTU
SENG_GW_TUN = "tunFA"
SENG_CLIENT_TUN = "se0"
CONTENDERS = ("plain", "openvpn", "seng-fw")


# --- measuring primitives -----------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def link_packets(netns: str, dev: str) -> int:
    stats = json.loads(ip("-j", "-s", "link", "show", dev, netns=netns))[0]["stats64"]
    return int(stats["rx"]["packets"]) + int(stats["tx"]["packets"])


@dataclass
class Contender:
    """A path from client host A to the external host, and the processes that carry it."""

    name: str
    source: str  # source address on client host A
    gateway_pid: int | None = None
    client_pid: int | None = None
    gateway_dev: str | None = None  # TUN in the gateway (one crossing per forwarded packet)
    client_dev: str | None = None
    # Count the gateway's packets at the client's TUN: a TUN device with TSO (seng-fw's
    # gateway) counts a super-packet of up to 45 segments as one packet.
    gateway_counted_at_client: bool = False


@dataclass
class Sample:
    value: float
    gateway_us: float | None = None  # CPU per packet crossing the gateway's TUN
    client_us: float | None = None
    gateway_util: float | None = None  # CPU seconds per wall second
    client_util: float | None = None


class Meter:
    """CPU time and TUN packets of a contender's processes around one test."""

    def __init__(self, lab: Lab, contender: Contender) -> None:
        self.lab, self.c = lab, contender

    def snapshot(self) -> tuple[float, float | None, int | None, float | None, int | None]:
        c, lab = self.c, self.lab
        gw = cpu_seconds(c.gateway_pid) if c.gateway_pid else None
        gwp = link_packets(lab.ns(GATEWAY), c.gateway_dev) if c.gateway_dev else None
        if c.gateway_counted_at_client and c.client_dev:
            gwp = link_packets(lab.ns(CLIENT_A), c.client_dev)
        cl = cpu_seconds(c.client_pid) if c.client_pid else None
        clp = link_packets(lab.ns(CLIENT_A), c.client_dev) if c.client_dev else None
        return time.monotonic(), gw, gwp, cl, clp

    def measure(self, value: Callable[[], float], busy: float) -> Sample:
        """`value()` runs the test; traffic flows for `busy` seconds of it (iperf3's
        start and end take the rest), which is what utilisation is relative to."""
        t0, gw0, gwp0, cl0, clp0 = self.snapshot()
        result = value()
        t1, gw1, gwp1, cl1, clp1 = self.snapshot()
        sample = Sample(result)
        wall = min(t1 - t0, busy)
        if gw0 is not None and gw1 is not None and gwp0 is not None and gwp1 is not None:
            sample.gateway_us = (gw1 - gw0) / max(1, gwp1 - gwp0) * 1e6
            sample.gateway_util = (gw1 - gw0) / wall
        if cl0 is not None and cl1 is not None and clp0 is not None and clp1 is not None:
            sample.client_us = (cl1 - cl0) / max(1, clp1 - clp0) * 1e6
            sample.client_util = (cl1 - cl0) / wall
        return sample


def iperf(lab: Lab, source: str, seconds: float, *extra: str) -> dict[str, Any]:
    argv = ["iperf3", "-c", str(lab.external), "-B", source, "-p", str(IPERF_PORT),
            "-t", str(seconds), "-J", *extra]  # fmt: skip
    for attempt in range(3):  # "server is busy" right after the previous test
        result = lab.topology.run(CLIENT_A, argv, check=False, timeout=seconds + 30)
        report: dict[str, Any] = json.loads(result.stdout or "{}")
        if "error" not in report and result.returncode == 0:
            return report
        time.sleep(0.5 + attempt)
    raise RuntimeError(f"iperf3 {' '.join(extra)} from {source}: {report.get('error')}")


def tcp_mbits(lab: Lab, source: str, seconds: float, *extra: str) -> float:
    report = iperf(lab, source, seconds, *extra)
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e6


def udp_pps(lab: Lab, source: str, seconds: float) -> float:
    """64-byte UDP payloads sent as fast as the sender can: packets received per second."""
    report = iperf(lab, source, seconds, "-u", "-l", "64", "-b", "0")
    total = report["end"]["sum"]
    return (int(total["packets"]) - int(total["lost_packets"])) / float(total["seconds"])


def ping_rtts(lab: Lab, source: str, count: int) -> list[float]:
    out = lab.topology.run(
        CLIENT_A, ["ping", "-n", "-I", source, "-c", str(count), "-i", "0.01", "-W", "1",
                   str(lab.external)],
        check=False, timeout=count * 0.05 + 30,
    ).stdout  # fmt: skip
    return [float(m) for m in re.findall(r"time=([0-9.]+) ms", out)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- OpenVPN ---------------------------------------------------------------------------


def _cert(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    usage: x509.ObjectIdentifier | None,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=usage is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, True, False, False, False, False),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def write_openvpn_pki(directory: Path) -> None:
    """A CA, a server and a client certificate (P-256) for this run only."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("bench openvpn CA", ca_key, None, None)
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    for name, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH),
                        ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):  # fmt: skip
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"bench openvpn {name}", key, (ca.subject, ca_key), usage)
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(pem))
        fd = os.open(directory / f"{name}.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(
                key.private_bytes(
                    pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )


def start_openvpn(lab: Lab, directory: Path) -> tuple[subprocess.Popen[bytes], ...]:
    """Point-to-point TLS mode: one tunnel, AES-128-GCM data channel, no DCO."""
    write_openvpn_pki(directory)
    common = ["openvpn", "--dev", OVPN_DEV, "--dev-type", "tun", "--proto", "udp",
              "--tun-mtu", str(TUN_MTU), "--data-ciphers", "AES-128-GCM",
              "--cipher", "AES-128-GCM", "--disable-dco", "--ca", str(directory / "ca.pem"),
              "--verb", "3", "--ping", "10", "--ping-restart", "60"]  # fmt: skip
    server = lab.topology.popen(
        GATEWAY,
        [*common, "--tls-server", "--dh", "none", "--local", str(lab.gateway_lan),
         "--lport", str(OVPN_PORT), "--ifconfig", OVPN_GW, OVPN_CLIENT,
         "--cert", str(directory / "server.pem"), "--key", str(directory / "server.key")],
        stdout=(directory / "server.log").open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    client = lab.topology.popen(
        CLIENT_A,
        [*common, "--tls-client", "--nobind", "--remote", str(lab.gateway_lan), str(OVPN_PORT),
         "--ifconfig", OVPN_CLIENT, OVPN_GW, "--remote-cert-tls", "server",
         "--cert", str(directory / "client.pem"), "--key", str(directory / "client.key")],
        stdout=(directory / "client.log").open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while "Initialization Sequence Completed" not in (directory / "client.log").read_text():
        if time.monotonic() > deadline or client.poll() is not None or server.poll() is not None:
            raise RuntimeError(
                "openvpn did not come up:\n" + (directory / "client.log").read_text()
            )
        time.sleep(0.1)
    # Only traffic from the tunnel address goes through the tunnel.
    ns = lab.ns(CLIENT_A)
    ip("route", "add", "default", "dev", OVPN_DEV, "table", str(OVPN_TABLE), netns=ns)
    ip("rule", "add", "from", OVPN_CLIENT, "lookup", str(OVPN_TABLE), netns=ns)
    return server, client


# --- the suite ---------------------------------------------------------------------------


def write_policy(path: Path) -> None:
    """webapp (the measured enclave and the crowd; a /20 leaves room for 4,000) may reach
    the external host's iperf3 port over TCP and UDP, and ping it."""
    path.write_text(
        "\n".join([
            "gateway_networks: [10.77.1.0/24, 10.77.2.0/24]",
            "apps:",
            "  - name: webapp",
            f"    mrenclave: {DEMO_WEBAPP.hex()}",
            "    hosts: [10.77.1.0/24]",
            "    subnet: {subnet: 192.168.32.0/20}",
            "    egress:",
            f"      - {{to: 10.77.2.2, protocol: tcp, ports: {IPERF_PORT}}}",
            f"      - {{to: 10.77.2.2, protocol: udp, ports: {IPERF_PORT}}}",
            "      - {to: 10.77.2.2, protocol: icmp}",
        ]) + "\n"
    )  # fmt: skip


THROUGHPUT_TESTS: dict[str, tuple[str, Callable[[Lab, str, float], float]]] = {
    "tcp_up": ("TCP 1 stream client → external (Mbit/s)", lambda lab, s, t: tcp_mbits(lab, s, t)),
    "tcp_down": (
        "TCP 1 stream external → client (Mbit/s)",
        lambda lab, s, t: tcp_mbits(lab, s, t, "-R"),
    ),
    "tcp4": (
        "TCP 4 streams client → external (Mbit/s)",
        lambda lab, s, t: tcp_mbits(lab, s, t, "-P", "4"),
    ),
    "udp64": ("UDP 64-byte packets received (pps)", lambda lab, s, t: udp_pps(lab, s, t)),
}


def run_rounds(
    lab: Lab, contenders: list[Contender], rounds: int, seconds: float, pings: int
) -> dict[str, dict[str, list[Sample]]]:
    """Every test for every contender, `rounds` times; the order rotates each round."""
    samples: dict[str, dict[str, list[Sample]]] = {
        test: {c.name: [] for c in contenders}
        for test in (*THROUGHPUT_TESTS, "ping_median", "ping_p99")
    }
    for r in range(rounds):
        order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
        for test, (_, fn) in THROUGHPUT_TESTS.items():
            for c in order:
                sample = Meter(lab, c).measure(
                    functools.partial(fn, lab, c.source, seconds), seconds
                )
                samples[test][c.name].append(sample)
                print(f"  round {r + 1} {test:8} {c.name:8} {sample.value:10.1f}", flush=True)
                time.sleep(0.3)
        for c in order:
            rtts = ping_rtts(lab, c.source, pings)
            if len(rtts) < pings // 2:
                raise RuntimeError(f"ping through {c.name}: {len(rtts)} of {pings} answered")
            samples["ping_median"][c.name].append(Sample(statistics.median(rtts)))
            samples["ping_p99"][c.name].append(Sample(percentile(rtts, 0.99)))
            print(f"  round {r + 1} ping     {c.name:8} median "
                  f"{statistics.median(rtts):.3f} ms p99 {percentile(rtts, 0.99):.3f} ms",
                  flush=True)  # fmt: skip
    return samples


def median_of(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(samples: dict[str, dict[str, list[Sample]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for test, per in samples.items():
        out[test] = {}
        for name, ss in per.items():
            out[test][name] = {
                "value": median_of([s.value for s in ss]),
                "gateway_us": median_of([s.gateway_us for s in ss]),
                "client_us": median_of([s.client_us for s in ss]),
                "gateway_util": median_of([s.gateway_util for s in ss]),
                "client_util": median_of([s.client_util for s in ss]),
                "rounds": [s.value for s in ss],
            }
    return out


IDLE_WAVE = 50  # enclaves joining together while the idle crowd grows


def measure_scale(
    lab: Lab,
    seng: Contender,
    ovpn_server_pid: int,
    idle: list[int],
    joiners: list[int],
    timeout: float,
) -> dict[str, Any]:
    """Gateway RSS with 1, ... idle tunnels (the measured enclave plus a crowd that joins
    in waves of `IDLE_WAVE`), then, for each count in `joiners`, the admission rate and
    latency of that many enclaves joining at once (a fresh crowd each time)."""
    assert seng.gateway_pid is not None
    result: dict[str, Any] = {
        "rss_kib": {"1": rss_kib(seng.gateway_pid)},
        "openvpn_rss_kib_1": rss_kib(ovpn_server_pid),
        "admission": [],
    }
    crowd = Crowd(lab)
    try:
        for n in sorted(idle):
            while len(crowd.joiners) + 1 < n:
                wave = min(IDLE_WAVE, n - 1 - len(crowd.joiners))
                times, _ = crowd.join(wave, timeout)
                if len(times) < wave:
                    result["rss_note"] = (
                        f"a wave of {wave} enclaves: only {len(times)} joined within "
                        f"{timeout:.0f} s; stopped at {len(crowd.up()) + 1} tunnels"
                    )
                    break
            up = len(crowd.up()) + 1
            if up < n:
                break
            time.sleep(1.0)  # let the gateway settle (handshake buffers freed)
            result["rss_kib"][str(up)] = rss_kib(seng.gateway_pid)
            print(f"  idle tunnels: {up} up, gateway RSS {result['rss_kib'][str(up)]} KiB",
                  flush=True)  # fmt: skip
    finally:
        crowd.close()
    for count in joiners:
        time.sleep(3.0)  # the previous crowd's closes and handshakes are over
        crowd = Crowd(lab, name=f"join{count}-")
        try:
            crowd.prepare(count)  # certificates first: not part of the admission time
            gateway_cpu = cpu_seconds(seng.gateway_pid)
            times, wall = crowd.join(count, timeout)
            gateway_cpu = cpu_seconds(seng.gateway_pid) - gateway_cpu
        finally:
            crowd.close()
        handshakes = 2 * max(1, len(times))  # two tunnels per enclave
        result["admission"].append({
            "enclaves": count,
            "joined": len(times),
            "wall_s": wall,
            "rate_per_s": len(times) / wall if wall else 0.0,
            "p50_ms": percentile(times, 0.5) * 1000 if times else None,
            "p99_ms": percentile(times, 0.99) * 1000 if times else None,
            "gateway_ms_per_handshake": gateway_cpu / handshakes * 1000,
            "client_ms_per_handshake": crowd.cpu_seconds / handshakes * 1000,
            "client_processes": crowd.processes,
        })  # fmt: skip
        print(f"  admission: {len(times)}/{count} at once, in {wall:.1f} s", flush=True)
    return result


# --- output ------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def client_bound(entry: dict[str, Any]) -> bool:
    """The client-side process spent more CPU per packet than the gateway, or ran near
    a full core while busier than the gateway. On a shared machine neither side gets a
    full core, so per-packet cost says which side the throughput is waiting for."""
    g, c = entry.get("gateway_util"), entry.get("client_util")
    g_us, c_us = entry.get("gateway_us"), entry.get("client_us")
    if c_us is not None and g_us is not None and c_us > g_us:
        return True
    return c is not None and c >= 0.8 and (g is None or c > g)


def markdown(
    summary: dict[str, dict[str, Any]], scale: dict[str, Any], meta: dict[str, Any]
) -> str:
    lines = [
        f"seng-fw data path benchmark, {meta['date']} ({meta['rounds']} rounds of "
        f"{meta['seconds']} s, medians; {os.cpu_count()} cores shared)",
        "",
        "| figure | plain routing | OpenVPN | seng-fw | seng-fw / OpenVPN | seng-fw / plain |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    notes: list[str] = []
    for test, (label, _) in THROUGHPUT_TESTS.items():
        row = summary[test]
        p, o, s = (row[n]["value"] for n in CONTENDERS)
        mark = ""
        for name in ("openvpn", "seng-fw"):
            if client_bound(row[name]):
                mark += " ¹" if name == "seng-fw" else " ²"
        lines.append(f"| {label}{mark} | {_fmt(p)} | {_fmt(o)} | {_fmt(s)} | {_ratio(s, o)} "
                     f"| {_ratio(s, p)} |")  # fmt: skip
    pm, pp = summary["ping_median"], summary["ping_p99"]
    vals = {n: (pm[n]["value"], pp[n]["value"]) for n in CONTENDERS}
    lines.append(
        "| ping RTT median / p99 (ms) | "
        + " | ".join(f"{_fmt(vals[n][0], 3)} / {_fmt(vals[n][1], 3)}" for n in CONTENDERS)
        + f" | {_ratio(vals['seng-fw'][0], vals['openvpn'][0])} / "
        f"{_ratio(vals['seng-fw'][1], vals['openvpn'][1])} | – |"
    )

    def added(name: str, i: int) -> float | None:
        a, b = vals[name][i], vals["plain"][i]
        return None if a is None or b is None else a - b

    lines.append(
        "| added RTT vs plain, median / p99 (ms) | – | "
        f"{_fmt(added('openvpn', 0), 3)} / {_fmt(added('openvpn', 1), 3)} | "
        f"{_fmt(added('seng-fw', 0), 3)} / {_fmt(added('seng-fw', 1), 3)} | "
        f"{_ratio(added('seng-fw', 0), added('openvpn', 0))} / "
        f"{_ratio(added('seng-fw', 1), added('openvpn', 1))} | – |"
    )
    for test, what in (("tcp_up", "client → external"), ("tcp_down", "external → client"),
                       ("udp64", "UDP 64 B")):  # fmt: skip
        row = summary[test]
        for side in ("gateway", "client"):
            o, s = row["openvpn"][f"{side}_us"], row["seng-fw"][f"{side}_us"]
            lines.append(f"| {side} CPU per packet, {what} (µs) | – | {_fmt(o, 1)} | "
                         f"{_fmt(s, 1)} | {_ratio(s, o)} | – |")  # fmt: skip
    rss = scale.get("rss_kib", {})
    for n, kib in rss.items():
        lines.append(f"| gateway RSS, {n} idle tunnel(s) (MiB) | – | "
                     f"{_fmt(scale['openvpn_rss_kib_1'] / 1024, 1) if n == '1' else '–'} | "
                     f"{_fmt(kib / 1024, 1)} | – | – |")  # fmt: skip
    counts = sorted(int(n) for n in rss)
    if len(counts) > 1:
        per = (rss[str(counts[-1])] - rss[str(counts[0])]) / (counts[-1] - counts[0])
        lines.append(f"| gateway RSS per idle tunnel (KiB) | – | – | {per:.1f} | – | – |")
    for adm in scale.get("admission", []):
        lines.append(
            f"| admission, {adm['enclaves']} enclaves at once: joined, wall (s), rate (/s) "
            f"| – | – | {adm['joined']}, {adm['wall_s']:.1f}, {adm['rate_per_s']:.1f} | – | – |"
        )
        lines.append(f"| admission latency, {adm['enclaves']} at once, p50 / p99 (ms) | – | – | "
                     f"{_fmt(adm['p50_ms'])} / {_fmt(adm['p99_ms'])} | – | – |")  # fmt: skip
        lines.append(f"| admission, {adm['enclaves']} at once: CPU per handshake, gateway / "
                     f"client (ms) | – | – | {_fmt(adm['gateway_ms_per_handshake'], 1)} / "
                     f"{_fmt(adm['client_ms_per_handshake'], 1)} | – | – |")  # fmt: skip
        if adm["joined"] < adm["enclaves"]:
            notes.append(
                f"Admission of {adm['enclaves']} at once: only {adm['joined']} joined within "
                f"the {meta['join_timeout']:.0f} s limit on this machine (latencies are theirs)."
            )
    if scale.get("admission"):
        notes.append(
            "Admission: the crowd (tests/support/crowd.py, "
            f"{scale['admission'][0]['client_processes']} processes on client host B) runs "
            "its clients' handshakes on the same 2 cores as the gateway, at about the same "
            "CPU per handshake: the figure measures both sides. The crowd comes from one "
            "host, so this gateway's per-host handshake limits and total handshake rate are "
            "raised (crowd.CROWD_LIMITS); bench/bench_admission.py compares the queued "
            "admission with the unbounded one."
        )
    notes.append(
        "¹ seng-fw's client side (the emulator) spent more CPU per packet than the gateway "
        "(or ran a full core): the figure measures the emulator at least as much as the "
        "gateway."
    )
    notes.append("² likewise OpenVPN's client process.")
    notes.append(
        "Per-packet CPU: the process's user+system time over the packets crossing its TUN "
        "device (both directions, TCP ACKs included; seng-fw's gateway: those crossing the "
        "client's TUN, as its own TUN counts a TSO super-packet once); plain routing has no "
        "process."
    )
    notes.append(
        "Utilisation (CPU s per s), gateway / client: "
        + "; ".join(
            f"{test} " + ", ".join(
                f"{n} {_fmt(summary[test][n]['gateway_util'], 2)}/"
                f"{_fmt(summary[test][n]['client_util'], 2)}"
                for n in ("openvpn", "seng-fw")
            )
            for test in THROUGHPUT_TESTS
        )
    )  # fmt: skip
    if "rss_note" in scale:
        notes.append(f"RSS: {scale['rss_note']}.")
    if rss:
        notes.append("OpenVPN's RSS is its server process with its one (point-to-point) tunnel.")
    return "\n".join([*lines, "", *notes, ""])


def chart(summary: dict[str, dict[str, Any]], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no chart: matplotlib missing (pip install -e '.[bench]')"
    tests = [*THROUGHPUT_TESTS, "ping_median"]
    labels = ["TCP ↑", "TCP ↓", "TCP ×4", "UDP pps", "ping"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    width = 0.27
    for i, name in enumerate(CONTENDERS):
        ratios = []
        for test in tests:
            v, p = summary[test][name]["value"], summary[test]["plain"]["value"]
            ratios.append(v / p if v and p else 0)
        axes[0].bar([x + (i - 1) * width for x in range(len(tests))], ratios, width, label=name)
    axes[0].set_xticks(range(len(tests)), labels)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("relative to plain routing (log)")
    axes[0].legend()
    axes[0].set_title("throughput and RTT / plain routing")
    cpu_tests = ["tcp_up", "tcp_down", "udp64"]
    figures = [(t, "value") for t in THROUGHPUT_TESTS] + [(t, "gateway_us") for t in cpu_tests]
    names = [*labels[:4], "gw CPU ↑", "gw CPU ↓", "gw CPU UDP"]
    ratios = []
    for test, key in figures:
        s, o = summary[test]["seng-fw"][key], summary[test]["openvpn"][key]
        ratios.append(s / o if s and o else 0)
    axes[1].bar(range(len(ratios)), ratios, color="tab:green")
    axes[1].axhline(1.0, color="black", linewidth=0.8)
    axes[1].axhline(1.5, color="tab:green", linestyle="--", linewidth=0.8, label="target ≥ 1.5")
    axes[1].axhline(0.8, color="tab:red", linestyle="--", linewidth=0.8, label="CPU target ≤ 0.8")
    axes[1].set_xticks(range(len(ratios)), names, rotation=30)
    axes[1].set_ylabel("seng-fw / OpenVPN")
    axes[1].legend()
    axes[1].set_title("seng-fw relative to OpenVPN")
    for i, name in enumerate(("openvpn", "seng-fw")):
        for j, side in enumerate(("gateway", "client")):
            vals = [summary[t][name][f"{side}_us"] or 0 for t in cpu_tests]
            offset = (i * 2 + j - 1.5) * 0.2
            axes[2].bar([x + offset for x in range(3)], vals, 0.2, label=f"{name} {side}")
    axes[2].set_xticks(range(3), ["TCP ↑", "TCP ↓", "UDP 64 B"])
    axes[2].set_ylabel("CPU µs per packet")
    axes[2].legend()
    axes[2].set_title("CPU per forwarded packet")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(
        description="plain routing vs OpenVPN vs seng-fw", epilog="run as root"
    )
    parser.add_argument("--quick", action="store_true", help="short tests, small crowds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=None, help="per iperf3 test")
    parser.add_argument("--idle", default=None, help="idle tunnel counts, e.g. 1,100,1000")
    parser.add_argument("--joiners", default=None, help="enclaves joining at once, e.g. 100,1000")
    parser.add_argument("--join-timeout", type=float, default=120.0, metavar="S")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument(
        "--skip-scale", action="store_true", help="no idle-tunnel RSS or admission figures"
    )
    parser.add_argument("--prefix", default="sfwdp-", help="namespace prefix")
    parser.add_argument(
        "--tun-offload", choices=("on", "off", "no-coalesce"), default="on",
        help="seng-fw's TUN offloads (gateway.yaml tun.offload, tun.coalesce), to compare",
    )  # fmt: skip
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_datapath: must run as root (namespaces)", file=sys.stderr)
        return 2
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    idle = [int(n) for n in (args.idle or ("1,20,100" if args.quick else "1,100,1000")).split(",")]
    joiners = [int(n) for n in (args.joiners or ("50" if args.quick else "100,1000")).split(",")]
    pings = 100 if args.quick else 300
    rounds = max(1, args.rounds)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(tempfile.gettempdir()) / f"seng-fw-datapath-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    # Two sockets per enclave, in this process and in the gateway (which inherits it).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))

    meta: dict[str, Any] = {"date": stamp, "rounds": rounds, "seconds": seconds,
                            "idle": idle, "joiners": joiners, "quick": args.quick,
                            "join_timeout": args.join_timeout,
                            "tun_offload": args.tun_offload}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        write_policy(policy)
        offload = {"offload": args.tun_offload != "off", "coalesce": args.tun_offload == "on"}
        # The admission crowd comes from one host: its per-host limits are raised.
        settings = {"tun": offload, "limits": CROWD_LIMITS}
        lab = Lab(args.prefix, Path(tmp) / "state", policy, gateway_settings=settings)
        with lab:
            a_lan = str(lab.topology.address(CLIENT_A, "lan"))
            ip("route", "add", "10.77.2.0/24", "via", str(lab.gateway_lan), netns=lab.ns(CLIENT_A))
            ip("route", "add", "10.77.1.0/24", "via", "10.77.2.1", netns=lab.ns(EXTERNAL))
            iperf_server = lab.topology.popen(
                EXTERNAL, ["iperf3", "-s", "-p", str(IPERF_PORT), "-B", str(lab.external)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            ovpn_server, ovpn_client = start_openvpn(lab, Path(tmp) / "openvpn")
            enclave = lab.start_enclave(EnclaveSpec("bench", CLIENT_A, DEMO_WEBAPP))
            state = enclave.wait_settled()
            if state.get("status") != "up":
                raise RuntimeError(f"enclave did not come up: {state}")
            assert lab.gateway is not None
            contenders = [
                Contender("plain", a_lan),
                Contender(
                    "openvpn", OVPN_CLIENT, ovpn_server.pid, ovpn_client.pid, OVPN_DEV, OVPN_DEV
                ),
                Contender(
                    "seng-fw",
                    state["address"],
                    lab.gateway.pid,
                    enclave.process.pid,
                    SENG_GW_TUN,
                    SENG_CLIENT_TUN,
                    gateway_counted_at_client=True,
                ),
            ]
            time.sleep(0.5)
            print(f"bench_datapath: {rounds} rounds, {seconds} s per test; results in {out}")
            samples = run_rounds(lab, contenders, rounds, seconds, pings)
            summary = summarize(samples)
            scale: dict[str, Any] = {}
            if not args.skip_scale:
                print("bench_datapath: idle tunnels and admission", flush=True)
                scale = measure_scale(
                    lab, contenders[2], ovpn_server.pid, idle, joiners, args.join_timeout
                )
            iperf_server.terminate()
            for process in (ovpn_client, ovpn_server):
                process.terminate()
                process.wait(5)
    table = markdown(summary, scale, meta)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "scale": scale}, indent=2) + "\n"
    )
    problem = chart(summary, out / "results.png")
    print()
    print(table)
    print(problem or f"chart: {out / 'results.png'}")
    print(f"raw: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
