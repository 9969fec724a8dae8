"""Tunnel gateway benchmark (issue: the attested tunnel gateway). Run as root:

    .venv/bin/python bench/bench_tunnel.py [--seconds 5] [--joiners 200]

Prints, measured in one run on the namespace lab:
- iperf3 TCP throughput enclave -> external host through the tunnels, and the same
  path with plain routing (client host -> gateway -> external host), and their ratio;
- the gateway's CPU time per forwarded packet during the tunnelled run;
- the same throughput with --many-apps apps loaded (`seng-fw apply`, which makes the
  gateway reload its policy), and the longest the tunnel stalled meanwhile (pings);
- time from an enclave's first datagram to a usable address (tunnel #2 up), for one
  enclave alone and for N enclaves joining at once (median, p95, max, and wall time).
These machines are shared and noisy: compare ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support, as a script

from seng_fw.lab.lab import DEMO_WEBAPP, EnclaveSpec, Lab
from seng_fw.lab.topology import CLIENT_A, EXTERNAL, GATEWAY, ping
from seng_fw.system.netns import ip
from tests.support.crowd import Crowd

IPERF_PORT = 5201


def iperf(lab: Lab, host: str, bind: str, seconds: float) -> float:
    """TCP throughput in Mbit/s from `host` (source address `bind`) to the external host."""
    result = subprocess.run(
        ["ip", "netns", "exec", lab.ns(host), "iperf3", "-c", str(lab.external),
         "-B", bind, "-t", str(seconds), "-J", "-p", str(IPERF_PORT)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    report = json.loads(result.stdout)
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e6


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tun_packets(lab: Lab) -> int:
    out = ip("-j", "-s", "link", "show", "tunFA", netns=lab.ns(GATEWAY))
    stats = json.loads(out)[0]["stats64"]
    return int(stats["rx"]["packets"]) + int(stats["tx"]["packets"])


def join_many(lab: Lab, count: int) -> tuple[list[float], float]:
    """`count` enclaves (distinct RA-TLS certificates) join at once from client host B.
    Returns each one's join time (first datagram -> tunnel #2 up) and the wall time."""
    crowd = Crowd(lab, name="join")
    try:
        times, wall = crowd.join(count, timeout=120.0)
    finally:
        crowd.close()
    if len(times) < count:
        print(f"  warning: only {len(times)} of {count} enclaves joined within 120 s")
    return times, wall


def ping_gaps(lab: Lab, address: str, stop: threading.Event, gaps: list[float]) -> None:
    """Ping the external host from the enclave's address until `stop`; each entry of
    `gaps` is the time from sending one ping to having an answer (retrying every 50 ms)."""
    ns, external = lab.ns(CLIENT_A), str(lab.external)
    while not stop.is_set():
        sent = time.monotonic()
        while not ping(ns, external, source=address, timeout=0.05) and not stop.is_set():
            pass
        gaps.append(time.monotonic() - sent)
        time.sleep(0.02)


def write_policy(path: Path, apps: int) -> None:
    """webapp (the measured enclave, allowed iperf3 and ping to the external host) and
    `apps - 1` more apps with their own subnets and 20 destinations each."""
    lines = [
        "gateway_networks: [10.77.1.0/24, 10.77.2.0/24]",
        "apps:",
        "  - name: webapp",
        f"    mrenclave: {DEMO_WEBAPP.hex()}",
        "    hosts: [10.77.1.0/24]",
        "    subnet: {subnet: 192.168.29.0/24}",
        "    egress:",
        f"      - {{to: 10.77.2.2, protocol: tcp, ports: {IPERF_PORT}}}",
        "      - {to: 10.77.2.2, protocol: icmp}",
    ]
    for i in range(1, apps):
        net = 0x64400000 + i * 16  # 100.64.0.0/10, one /28 per app
        subnet = f"{net >> 24}.{net >> 16 & 255}.{net >> 8 & 255}.{net & 255}/28"
        lines += [
            f"  - name: filler{i}",
            f"    mrenclave: {i:064x}",
            "    hosts: [10.77.1.0/24]",
            f"    subnet: {{subnet: {subnet}}}",
            "    egress:",
            *(
                f"      - {{to: 198.18.{i % 250}.{j}, protocol: tcp, ports: {1000 + j}}}"
                for j in range(20)
            ),
        ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="iperf3 duration")
    parser.add_argument("--joiners", type=int, default=200)
    parser.add_argument(
        "--many-apps", type=int, default=10000, help="apps loaded for the second throughput run"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        write_policy(policy, 10)
        lab = Lab("sfwbench-", Path(tmp) / "state", policy)
        with lab:
            # Plain routing between the client LAN and the external side, for the baseline.
            ip("route", "add", "10.77.2.0/24", "via", str(lab.gateway_lan), netns=lab.ns(CLIENT_A))
            ip("route", "add", "10.77.1.0/24", "via", "10.77.2.1", netns=lab.ns(EXTERNAL))
            server = lab.topology.popen(
                EXTERNAL, ["iperf3", "-s", "-p", str(IPERF_PORT), "-B", str(lab.external)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(0.5)
            enclave = lab.start_enclave(EnclaveSpec("bench", CLIENT_A, DEMO_WEBAPP))
            state = enclave.wait_settled()
            assert state["status"] == "up", state
            one_join = float(state["setup_seconds"])

            plain = iperf(lab, CLIENT_A, str(lab.topology.address(CLIENT_A, "lan")), args.seconds)
            assert lab.gateway is not None
            cpu0, packets0 = cpu_seconds(lab.gateway.pid), tun_packets(lab)
            tunnelled = iperf(lab, CLIENT_A, state["address"], args.seconds)
            cpu1, packets1 = cpu_seconds(lab.gateway.pid), tun_packets(lab)
            per_packet_us = (cpu1 - cpu0) / max(1, packets1 - packets0) * 1e6

            times, wall = join_many(lab, args.joiners)

            # The same tunnel with many more apps in the ruleset and the gateway's policy;
            # meanwhile, pings through the tunnel tell how long it stalls at worst.
            write_policy(policy, args.many_apps)
            stop, gaps = threading.Event(), []
            pinger = threading.Thread(
                target=ping_gaps, args=(lab, state["address"], stop, gaps), daemon=True
            )
            pinger.start()
            started = time.monotonic()
            lab.apply_policy(policy)
            apply_seconds = time.monotonic() - started
            assert lab.wait_for_log(r"policy reloaded", timeout=600)
            reload_seconds = time.monotonic() - started
            stop.set()
            pinger.join()
            many = iperf(lab, CLIENT_A, state["address"], args.seconds)
            server.terminate()

    print("seng-fw tunnel benchmark (namespace lab, one machine, 2 cores shared)")
    print(f"  iperf3 TCP, plain routing       : {plain:9.1f} Mbit/s")
    print(f"  iperf3 TCP, through the tunnels : {tunnelled:9.1f} Mbit/s")
    print(f"  ratio tunnel / plain            : {tunnelled / plain:9.3f}")
    print(f"  gateway CPU per forwarded packet: {per_packet_us:9.1f} us "
          f"({packets1 - packets0} packets on the TUN device)")  # fmt: skip
    ratio = many / tunnelled
    print(f"  iperf3 TCP, tunnel, {args.many_apps} apps: {many:9.1f} Mbit/s "
          f"(ratio to 10 apps {ratio:.3f}; apply took {apply_seconds:.1f} s)")  # fmt: skip
    print(f"  longest tunnel stall meanwhile  : {max(gaps) * 1000:9.1f} ms "
          f"({len(gaps)} pings; apply and reload took {reload_seconds:.1f} s)")  # fmt: skip
    print(f"  join time, one enclave          : {one_join * 1000:9.1f} ms")
    if times:
        times.sort()
        p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
        median, slowest = statistics.median(times) * 1000, times[-1] * 1000
        print(f"  join time, {args.joiners} at once: median {median:.0f} ms, "
              f"p95 {p95 * 1000:.0f} ms, max {slowest:.0f} ms, wall {wall:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
