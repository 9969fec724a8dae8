"""Robustness under attack (issue 14), measured on the namespace lab. Run as root:

    .venv/bin/python -m bench.bench_robustness [--seconds 20] [--tunnels 4] [--unlimited]

While established tunnels (scripted SENG enclaves on clientb) send UDP round trips to
an echo on the external host, clienta floods the gateway with handshakes that answer
the cookie and walk away, as fast as this machine lets two processes send; then the
tunnels' own addresses and ports carry forged datagrams (issue 14 item 1) at full rate.
Prints, per phase: round trips answered, their p50/p99/max, the gateway's resident size
(before, peak, after), its CPU, and what `seng-fw status` counted. `--unlimited` runs
the flood a second time with the limits out of the way, for comparison.
These machines are shared and noisy: the figures vary from run to run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from seng_fw.lab.lab import DEMO_WEBAPP, GATEWAY_PORT, EnclaveSpec, Lab
from seng_fw.lab.topology import CLIENT_A, CLIENT_B, EXTERNAL, GATEWAY
from seng_fw.system.netns import netns_socket
from seng_fw.tunnel.dtls import make_client_config
from tests.support.attacks import client_hello, flood, forge
from tests.support.seng_client import ScriptedEnclave, parse_udp, udp_packet

ECHO = 9990
NICE = 19  # the attackers' niceness (--attacker-nice)
POLICY = f"""\
gateway_networks: [10.77.1.0/24, 10.77.2.0/24]
apps:
  - name: webapp
    mrenclave: {DEMO_WEBAPP.hex()}
    hosts: [10.77.1.0/24]
    subnet: {{subnet: 192.168.29.0/24}}
    egress: [{{to: 10.77.2.2, protocol: udp, ports: {ECHO}}}]
"""
UNLIMITED = {
    "max_half_open": 1_000_000, "max_half_open_per_source": 1_000_000,
    "certificate_timeout": 60, "handshake_rate_per_host": 1e9,
    "handshake_burst_per_host": 1_000_000, "handshake_rate": 1e9,
    "handshake_burst": 1_000_000,
}  # fmt: skip


# ----- the gateway process -------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status(lab: Lab) -> dict[str, Any]:
    result = lab.seng_fw(
        GATEWAY, "status", "--json", "--socket", str(lab.state_dir / "control.sock")
    )
    document = json.loads(result.stdout)  # {schema, command, ok, error, result}
    found: dict[str, Any] = document["result"] if document.get("ok") else {}
    return found


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0.0
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.1)


# ----- established tunnels: UDP round trips through the gateway ------------------------


def echo_server(lab: Lab, stop: threading.Event) -> None:
    sock = netns_socket(lab.ns(EXTERNAL), socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((str(lab.external), ECHO))
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            data, address = sock.recvfrom(2048)
        except TimeoutError:
            continue
        sock.sendto(data, address)
    sock.close()


@dataclass
class Prober:
    """One established enclave sending a round trip every 20 ms."""

    enclave: ScriptedEnclave
    address: IPv4Address
    external: IPv4Address
    rtts: list[float] = field(default_factory=list)
    lost: int = 0

    def run(self, stop: threading.Event) -> None:
        uplink, downlink = self.enclave.uplink, self.enclave.downlink
        assert uplink is not None and downlink is not None
        n = 0
        while not stop.is_set():
            n += 1
            payload = n.to_bytes(8, "big")
            sent = time.monotonic()
            uplink.send(udp_packet(self.address, self.external, 7000, ECHO, payload))
            deadline = sent + 1.0
            while True:
                reply = downlink.next_record(max(0.0, deadline - time.monotonic()))
                if reply is None:
                    self.lost += 1
                    break
                if parse_udp(reply)[-1] == payload:
                    self.rtts.append(time.monotonic() - sent)
                    break
            time.sleep(0.02)

    def take(self) -> tuple[list[float], int]:
        rtts, lost = self.rtts, self.lost
        self.rtts, self.lost = [], 0
        return rtts, lost


# ----- the attackers (separate processes: the probers' timing must not share a GIL) ----


# ----- one phase -------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    rtts: list[float]
    lost: int
    rss_before: float
    rss_peak: float
    rss_after: float
    cpu: float
    seconds: float
    attack_sent: int
    status: dict[str, Any]

    def report(self) -> list[str]:
        rtts = sorted(self.rtts)
        answered = len(rtts) / max(1, len(rtts) + self.lost)
        p99 = rtts[min(len(rtts) - 1, int(0.99 * len(rtts)))] if rtts else float("nan")
        median = statistics.median(rtts) if rtts else float("nan")
        worst = rtts[-1] if rtts else float("nan")
        limits = ", ".join(f"{k} {v}" for k, v in self.status.get("limits", {}).items())
        return [
            f"{self.name}:",
            f"  round trips answered   : {answered * 100:6.2f} % ({len(rtts)} of "
            f"{len(rtts) + self.lost})",
            f"  round trip p50/p99/max : {median * 1000:.1f} / {p99 * 1000:.1f} / "
            f"{worst * 1000:.1f} ms",
            f"  gateway RSS            : {self.rss_before:.1f} MB before, peak "
            f"{self.rss_peak:.1f} (+{self.rss_peak - self.rss_before:.1f}), after "
            f"{self.rss_after:.1f} (+{self.rss_after - self.rss_before:.1f})",
            f"  gateway CPU            : {self.cpu / self.seconds * 100:.0f} % of a core",
            f"  attack datagrams sent  : {self.attack_sent} "
            f"({self.attack_sent / self.seconds:.0f}/s)",
            f"  gateway counted        : handshakes {self.status.get('handshakes')}; "
            f"limits {limits or '-'}; enclaves {self.status.get('enclaves')}; "
            f"ended {self.status.get('ended')}",
        ]


def attacker(target: Any, nice: int, *args: Any) -> None:
    """In the lab the attacker shares the gateway's two cores, which a real one on its
    own machine would not: niced, it still sends as fast as it can on idle CPU time."""
    os.nice(nice)
    target(*args)


def run_phase(
    lab: Lab, probers: list[Prober], name: str, seconds: float, settle: float,
    attack: Any, args: tuple[Any, ...], nice: int = NICE, profile: Path | None = None,
    py_spy: str | None = None,
) -> Phase:  # fmt: skip
    assert lab.gateway is not None
    pid = lab.gateway.pid
    for prober in probers:
        prober.take()
    sampler = RssSampler(pid)
    sampler.start()
    before, cpu0 = rss_mb(pid), cpu_seconds(pid)
    sent = multiprocessing.Value("q", 0)
    process = multiprocessing.Process(
        target=attacker, args=(attack, nice, *args, seconds, sent)
    )
    process.start()
    spy = None
    if py_spy is not None and profile is not None:
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--format", "raw", "--output", str(profile),
             "--duration", str(max(1, int(seconds) - 1)), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    process.join()
    if spy is not None:
        spy.wait()
    cpu = cpu_seconds(pid) - cpu0
    rtts: list[float] = []
    lost = 0
    for prober in probers:
        got, missed = prober.take()
        rtts += got
        lost += missed
    time.sleep(settle)  # certificate timeouts, then a malloc_trim
    sampler.running = False
    sampler.join()
    return Phase(name, rtts, lost, before, sampler.peak, rss_mb(pid), cpu, seconds,
                 int(sent.value), status(lab))  # fmt: skip


def run(args: argparse.Namespace, limits: dict[str, Any] | None) -> list[Phase]:
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(POLICY)
        settings: dict[str, Any] = {"timeouts": {"idle": 3600}}
        if limits is not None:
            settings["limits"] = limits
        with Lab("sfwrob-", Path(tmp) / "state", policy, gateway_settings=settings) as lab:
            gateway = (str(lab.gateway_lan), GATEWAY_PORT)
            stop = threading.Event()
            threading.Thread(target=echo_server, args=(lab, stop), daemon=True).start()
            probers = []
            for n in range(args.tunnels):
                spec = EnclaveSpec(f"probe{n}", CLIENT_B, DEMO_WEBAPP)
                cert, key = lab.enclave_credentials(spec)
                config = make_client_config(
                    cert.read_bytes(), key.read_bytes(),
                    (lab.state_dir / "server.pem").read_bytes(),
                )  # fmt: skip
                enclave = ScriptedEnclave(lab.ns(CLIENT_B), gateway, config)
                probers.append(Prober(enclave, enclave.connect().ip, lab.external))
            threads = [threading.Thread(target=p.run, args=(stop,), daemon=True) for p in probers]
            for thread in threads:
                thread.start()
            time.sleep(2.0)
            phases = [run_phase(lab, probers, "quiet (no attack)", 5.0, 0.0, idle, ())]
            hello = client_hello(lab)
            phases.append(run_phase(
                lab, probers, "cookie-answering handshake flood", args.seconds, args.settle,
                flood, (lab.ns(CLIENT_A), gateway, hello), args.attacker_nice,
                args.profile, args.py_spy,
            ))  # fmt: skip
            peers = []
            for prober in probers:
                for conn in (prober.enclave.uplink, prober.enclave.downlink):
                    assert conn is not None
                    peers.append((*conn.sock.getsockname(), *conn.sock.getpeername()))
            phases.append(run_phase(
                lab, probers, "forged datagrams (item 1) from the tunnels' addresses",
                args.seconds, 1.0, forge, (lab.ns(CLIENT_B), peers), args.attacker_nice,
            ))  # fmt: skip
            alive = sum(
                1 for p in probers
                for conn in (p.enclave.uplink, p.enclave.downlink)
                if conn is not None and conn.closed is None and conn.session.established
            )  # fmt: skip
            phases[-1].status["client_tunnels_alive"] = f"{alive} of {2 * len(probers)}"
            stop.set()
            for thread in threads:
                thread.join(2.0)
            return phases


def idle(seconds: float, sent: Any) -> None:
    time.sleep(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each attack")
    parser.add_argument("--settle", type=float, default=15.0, help="wait after the flood")
    parser.add_argument("--tunnels", type=int, default=4, help="established enclaves")
    parser.add_argument("--unlimited", action="store_true", help="also flood without limits")
    parser.add_argument(
        "--attacker-nice", type=int, default=NICE, help="niceness of the attacking processes"
    )
    parser.add_argument(
        "--limits", type=json.loads, help='gateway.yaml limits as JSON, e.g. {"max_half_open": 64}'
    )
    parser.add_argument("--py-spy", help="py-spy binary: profile the gateway during the flood")
    parser.add_argument("--profile", type=Path, default=Path("flood-profile.txt"),
                        help="where py-spy writes the flood's collapsed stacks")  # fmt: skip
    args = parser.parse_args()
    print(f"attackers run at niceness {args.attacker_nice}")
    print("seng-fw robustness benchmark (namespace lab, one machine, 2 cores shared)")
    for line in (line for phase in run(args, args.limits) for line in phase.report()):
        print(line, flush=True)
    if args.unlimited:
        print("\nthe same with the limits out of the way:")
        for line in (line for phase in run(args, UNLIMITED) for line in phase.report()):
            print(line, flush=True)


if __name__ == "__main__":
    main()
