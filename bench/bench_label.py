"""Labeller benchmark (issue: identity labelling with NFQUEUE). Run as root:

    python bench/bench_label.py [--connections 2000] [--seconds 3] [--clients 2]

On the labeller's namespace lab (tests/support/label_testbed.py: enclave 192.168.28.10 on a
client host, routed through the gateway namespace to an external host), the same
connections in one run, once with a static mark rule (`ct state new ... meta mark set,
ct mark set`: no queue) and once with the NFQUEUE hook (iptables-nft NFQUEUE on this
kernel, the hook on an asyncio loop in this process, as in the gateway). Prints:

- first-packet latency: TCP connect() time (SYN -> SYN-ACK) of sequential new
  connections, median and p99, and the difference (what the hook adds);
- new connections per second: `--clients` processes opening and resetting TCP
  connections as fast as they can;
- hook capacity: new UDP flows per second the hook labels when flooded (the kernel
  drops what does not fit in the queue);
- an established connection's throughput (iperf3) with and without the hook, and
  the ratio (the hook only sees first packets: it should be 1).
These machines are shared and noisy: compare within a run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path

from seng_fw.lab.topology import Topology
from seng_fw.label.hook import LabelHook
from seng_fw.label.install import Installed, QueueRules, install, remove
from seng_fw.label.marks import NONE, encode
from seng_fw.label.registry import EnclaveRecord, Registry, Scope

# The labeller's namespace testbed is test support, shared with the integration tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.label_testbed import (
    CLIENT_A,
    EXT_HOST,
    EXTERNAL,
    FLOOD_SCRIPT,
    GATEWAY,
    HOST_A,
    SHARED,
    LoopThread,
    label_topology,
    place_enclave,
)

ENCLAVE = IPv4Address("192.168.28.10")
ACCEPT_PORT, IPERF_PORT = 7001, 5201
STATIC_MARK = encode(1, NONE)

ACCEPTOR = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(4096)
while True:
    c, _ = s.accept()
    c.close()
"""

CONNECTOR = """
import json, socket, struct, sys, time
src, dst = sys.argv[1], sys.argv[2]
port, count, seconds = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
reset = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT, no port exhaustion
times, end = [], time.monotonic() + seconds
while len(times) < count and time.monotonic() < end:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
    s.bind((src, 0))
    start = time.perf_counter()
    s.connect((dst, port))
    times.append(time.perf_counter() - start)
    s.close()
print(json.dumps(times))
"""


def python(topo: Topology, host: str, script: str, *args: object) -> subprocess.Popen[str]:
    argv = [sys.executable, "-c", script, *map(str, args)]
    return topo.popen(host, argv, stdout=subprocess.PIPE, text=True)


def connect_times(topo: Topology, count: int, seconds: float) -> list[float]:
    proc = python(topo, CLIENT_A, CONNECTOR, ENCLAVE, EXTERNAL, ACCEPT_PORT, count, seconds)
    out, _ = proc.communicate(timeout=seconds + 30)
    return list(json.loads(out))


def connection_rate(topo: Topology, clients: int, seconds: float) -> float:
    procs = [
        python(topo, CLIENT_A, CONNECTOR, ENCLAVE, EXTERNAL, ACCEPT_PORT, 10**9, seconds)
        for _ in range(clients)
    ]
    total = sum(len(json.loads(p.communicate(timeout=seconds + 30)[0])) for p in procs)
    return total / seconds


def iperf(topo: Topology, seconds: float) -> float:
    argv = ["iperf3", "-c", str(EXTERNAL), "-B", str(ENCLAVE), "-t", str(seconds), "-J",
            "-p", str(IPERF_PORT)]  # fmt: skip
    report = json.loads(topo.run(CLIENT_A, argv, timeout=seconds + 30).stdout)
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e6


def static_rule(topo: Topology, present: bool) -> None:
    if present:
        ruleset = (
            "table ip bench_static {\n"
            "  chain static_mark { type filter hook forward priority mangle; policy accept;\n"
            f"    ct state new ip saddr {SHARED} meta mark set {STATIC_MARK} "
            "ct mark set meta mark\n"
            "  }\n"
            "}\n"
        )
        topo.run(GATEWAY, ["nft", "-f", "-"], input=ruleset)
    else:
        topo.run(GATEWAY, ["nft", "delete", "table", "ip", "bench_static"], check=False)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Modes:
    """Switch the gateway between the static mark rule and the NFQUEUE hook."""

    def __init__(self, topo: Topology, loop: LoopThread) -> None:
        self.topo, self.loop = topo, loop
        self.registry = Registry(Scope(SHARED))
        self.registry.add(EnclaveRecord(ENCLAVE, "web", 1, HOST_A))
        self.hook = LabelHook(self.registry, [0], netns=topo.ns(GATEWAY))
        self.installed: Installed | None = None

    def static(self) -> None:
        if self.installed is not None:
            self.loop.call(self.hook.stop)
            remove(self.installed)
            self.installed = None
        static_rule(self.topo, True)

    def hooked(self) -> None:
        static_rule(self.topo, False)
        if self.installed is None:
            self.installed = install(QueueRules(SHARED, 0, 1), netns=self.topo.ns(GATEWAY))
            self.loop.call(self.hook.start)

    def close(self) -> None:
        if self.installed is not None:
            self.loop.call(self.hook.stop)
            remove(self.installed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=2000, help="sequential, for latency")
    parser.add_argument("--seconds", type=float, default=3.0, help="rate and iperf3 duration")
    parser.add_argument("--clients", type=int, default=2, help="parallel connecting processes")
    parser.add_argument("--rounds", type=int, default=3, help="alternating iperf3 runs per mode")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (network namespaces)")
    topo = label_topology(f"sfwbl{os.getpid()}-")
    topo.up()
    loop = LoopThread()
    servers: list[subprocess.Popen[str]] = []
    latency: dict[str, list[float]] = {}
    rate: dict[str, float] = {}
    throughput: dict[str, list[float]] = {"static": [], "hook": []}
    modes = Modes(topo, loop)
    try:
        place_enclave(topo, ENCLAVE, HOST_A)
        servers.append(python(topo, EXT_HOST, ACCEPTOR, EXTERNAL, ACCEPT_PORT))
        servers.append(topo.popen(EXT_HOST, ["iperf3", "-s", "-B", str(EXTERNAL), "-p",
                                             str(IPERF_PORT)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL))  # fmt: skip
        time.sleep(0.5)
        for name, switch in (("static", modes.static), ("hook", modes.hooked)):
            switch()
            connect_times(topo, 200, 5)  # warm up: ARP, caches, the hook's first packets
            latency[name] = connect_times(topo, args.connections, 60)
            rate[name] = connection_rate(topo, args.clients, args.seconds)
        for _ in range(args.rounds):  # alternate: the machine's load drifts
            for name, switch in (("static", modes.static), ("hook", modes.hooked)):
                switch()
                throughput[name].append(iperf(topo, args.seconds))
        modes.hooked()
        before = loop.call(modes.hook.counters)
        flood = python(topo, CLIENT_A, FLOOD_SCRIPT, args.seconds, ENCLAVE, EXTERNAL)
        start = time.monotonic()
        flood.communicate(timeout=args.seconds + 30)
        elapsed = time.monotonic() - start
        after = loop.call(modes.hook.counters)
        mode = modes.installed.mode.value if modes.installed else "?"
    finally:
        for server in servers:
            server.kill()
        modes.close()
        loop.close()
        topo.down()

    capacity = (after["labelled"] - before["labelled"]) / elapsed
    dropped = after["queue_dropped"] - before["queue_dropped"]
    median = {name: statistics.median(times) * 1e6 for name, times in latency.items()}
    p99 = {name: percentile(times, 0.99) * 1e6 for name, times in latency.items()}
    mbits = {name: statistics.mean(values) for name, values in throughput.items()}

    def row(name: str, text: str) -> None:
        print(f"  {name:<36}: {text}")

    print("seng-fw labeller benchmark (namespace lab, one machine; same run, same connections)")
    row("queue mode", mode)
    row("first-packet latency (TCP connect)", " median     p99")
    for name, title in (("static", "  static mark rule"), ("hook", "  NFQUEUE hook")):
        row(title, f"{median[name]:5.0f} us {p99[name]:5.0f} us")
    row(
        "  added by the hook",
        f"{median['hook'] - median['static']:5.0f} us "
        f"{p99['hook'] - p99['static']:5.0f} us  ({args.connections} sequential connections)",
    )
    row(
        f"new TCP connections/s ({args.clients} clients)",
        f"static {rate['static']:7.0f}   hook {rate['hook']:7.0f}   "
        f"ratio {rate['hook'] / rate['static']:5.2f}",
    )
    row(
        "hook capacity, flooded (UDP flows)",
        f"{capacity:7.0f} labelled/s ({dropped} dropped by the kernel: queue full)",
    )
    row(
        "established TCP throughput (iperf3)",
        f"static {mbits['static']:7.0f} Mbit/s   hook {mbits['hook']:7.0f} Mbit/s   "
        f"ratio {mbits['hook'] / mbits['static']:5.2f}",
    )
    row(
        "  per run (static | hook)",
        " ".join(f"{v:.0f}" for v in throughput["static"])
        + " | "
        + " ".join(f"{v:.0f}" for v in throughput["hook"]),
    )
    row("hook counters", str(after))


if __name__ == "__main__":
    main()
