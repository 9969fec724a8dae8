"""Compile and apply time of policies with 10, 1,000 and 10,000 apps, 20 destinations each.

    python3 bench/bench_compile.py [--apps 10,1000,10000] [--no-apply] [--yaml]
                                   [--forwarding 10,10000] [--shared]
    python3 bench/bench_compile.py --commands 10000 [--no-baseline]

With --commands (root), the seng-fw commands an administrator runs, each one process
in a scratch network namespace, timed with /usr/bin/time (seconds, peak RSS): check,
apply into an empty table, apply of the same policy again, apply --dry-run and diff of
the policy with one app changed; once with branch main's code (exported with git
archive: the baseline, in the same run) and once with this branch's HEAD.

Each app has its own /24 enclave subnet (with --shared: all apps are on one shared
subnet, told apart by their labels) and 20 destinations: 16 prefixes or addresses
with TCP ports (some overlapping, so the compiler has to split boxes), 2 resolvers on
UDP 53, an ICMP prefix and the next app (whose ingress admits it). Figures:

- validate: building the pydantic Policy from plain data;
- yaml: loading the same policy from a YAML file (with --yaml; the loader keeps line
  numbers for error messages, so it is the slow part);
- compile: policy -> table (sets with disjoint interval elements);
- render: the libnftables JSON text;
- apply: the atomic transaction into an empty table, then a replacing one, through
  libnftables in a fresh network namespace (needs root; skipped otherwise). It
  includes reading the live counters and rendering the JSON again.

With --forwarding (root), the same policies are loaded in turn into a gateway namespace
between an "enclave" namespace (app0's address, no tunnel: a veth plays the TUN) and
an external one, and the run reports (in the same run, so the ratio is meaningful):

- new flows/s: UDP packets from app0, each from a new source port, so each is a new
  conntrack entry that goes through the egress lookups (sent through a raw socket
  by Python, which is most of the cost: compare the two rows, not with line rate;
  with --shared a stand-in labeller rule gives app0's connections its label);
- sys us/flow: system CPU time of the sending thread per packet, which includes the
  gateway's forwarding (a steadier figure than the rate on a busy machine);
- TCP Mbit/s: one iperf3 stream (established packets: counters and ct state only).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, TypeVar

import yaml

from seng_fw.compile import live
from seng_fw.compile.compiler import Options, compile_policy
from seng_fw.compile.nft import Table
from seng_fw.lab.topology import Host, Route, Segment, Topology
from seng_fw.policy.loader import load_policy
from seng_fw.policy.models import Policy
from seng_fw.system.netns import ip

T = TypeVar("T")


SHARED_SUBNET = "10.0.0.0/9"  # holds APP0, and the /24s the apps have without --shared


def policy_data(apps: int, seed: int = 1, *, shared: bool = False) -> dict[str, Any]:
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i in range(apps):
        egress: list[dict[str, Any]] = []
        for _ in range(16):
            prefix = rng.choice([32, 32, 24, 16])
            address = f"172.{16 + rng.randrange(16)}.{rng.randrange(256)}.{rng.randrange(256)}"
            network = f"{address}/{prefix}"
            if prefix < 32:
                network = str(IPv4Network(network, strict=False))
            ports = rng.choice([[443], [80, 443], ["8000-8100"], [22]])
            egress.append({"to": network, "protocol": "tcp", "ports": ports})
        egress.append({"to": ["100.64.0.53", "100.64.1.53"], "protocol": "udp", "ports": 53})
        egress.append({"to": "100.64.0.0/16", "protocol": "icmp"})
        egress[0] = {"to": "100.64.0.0/16", "protocol": "tcp", "ports": 5201}  # for iperf3
        neighbour = f"app{(i + 1) % apps}"
        egress.append({"to": {"app": neighbour}, "protocol": "tcp", "ports": 443})
        app: dict[str, Any] = {
            "name": f"app{i}",
            "mrenclave": f"{i:064x}",
            "hosts": "10.250.0.0/16",
            "egress": egress,
            "ingress": [{"from": {"app": f"app{(i - 1) % apps}"}, "protocol": "tcp", "ports": 443}],
        }
        if not shared:
            app["subnet"] = {"subnet": f"10.{i // 256}.{i % 256}.0/24"}
        out.append(app)
    policy: dict[str, Any] = {"gateway_networks": ["10.250.0.0/16"], "apps": out}
    if shared:
        policy["shared_subnet"] = {"subnet": SHARED_SUBNET}
    return policy


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def apply_twice(table: Table, policy: Policy) -> tuple[float, float, int]:
    """Seconds for the first and a replacing apply, in a scratch namespace; and how many
    elements the kernel holds."""

    def run() -> tuple[float, float, int]:
        nft = live.Nft()
        _, first = timed(lambda: live.apply(table, policy, nft))
        _, again = timed(lambda: live.apply(table, policy, nft))
        return first, again, sum(len(s.elements) for s in table.sets)

    return live.in_scratch_namespace(run)


# --- forwarding ----------------------------------------------------------------------

APP0, TARGET = "10.0.0.10", "100.64.0.53"


def _forwarding_topology() -> Topology:
    topo = Topology(
        f"sfwbc{os.getpid()}-",  # its own namespaces: other benchmarks may be running
        [
            Host("enc", routes=(Route.parse("0.0.0.0/0", "10.250.1.1"),)),
            Host("gw", forwarding=True, routes=(Route.parse("10.0.0.0/8", "10.250.1.2"),)),
            Host("ext", routes=(Route.parse("10.0.0.0/8", "100.64.0.1"),)),
        ],
        [
            Segment(
                "lan",
                IPv4Network("10.250.1.0/24"),
                "gw",
                IPv4Address("10.250.1.1"),
                (("enc", IPv4Address("10.250.1.2")),),
            ),
            Segment(
                "ext",
                IPv4Network("100.64.0.0/24"),
                "gw",
                IPv4Address("100.64.0.1"),
                (("ext", IPv4Address(TARGET)),),
            ),
        ],
    )
    topo.up(replace=True)
    ip("addr", "add", f"{APP0}/32", "dev", "lo", netns=topo.ns("enc"))
    rule = "udp dport 53 counter drop"  # count the flood where it arrives
    topo.run(
        "ext",
        [
            "nft",
            f"add table inet c; add chain inet c pre {{ type filter hook prerouting "
            f"priority -300; }}; add rule inet c pre {rule}",
        ],
    )
    return topo


def _arrived(topo: Topology) -> int:
    listing = json.loads(topo.run("ext", ["nft", "-j", "list", "table", "inet", "c"]).stdout)
    for obj in listing["nftables"]:
        for expr in obj.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return int(expr["counter"]["packets"])
    raise RuntimeError("no counter")


def _flood(seconds: float) -> tuple[int, float]:
    """UDP packets from APP0 with ever new source ports, as fast as Python sends them;
    returns how many, and the system CPU seconds of the sending thread (the gateway
    namespace forwards each packet in that thread's softirq, so this is the kernel's
    cost per new connection, less disturbed by other load than the rate)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    src, dst = socket.inet_aton(APP0), socket.inet_aton(TARGET)
    cpu = resource.getrusage(resource.RUSAGE_THREAD).ru_stime
    sent, port, end = 0, 1024, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(256):
            port = port + 1 if port < 65000 else 1024
            header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, src, dst)
            sock.sendto(header + struct.pack("!HHHH", port, 53, 8, 0), (TARGET, 0))
            sent += 1
    sock.close()
    return sent, resource.getrusage(resource.RUSAGE_THREAD).ru_stime - cpu


def _iperf(topo: Topology, seconds: int) -> float:
    if shutil.which("iperf3") is None:
        return float("nan")
    server = topo.popen("ext", ["iperf3", "-s", "-1", "-B", TARGET], stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        out = topo.run(
            "enc", ["iperf3", "-c", TARGET, "-B", APP0, "-t", str(seconds), "-J"], timeout=60
        ).stdout
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e6
    finally:
        server.wait(timeout=10)


def forwarding(counts: list[int], seconds: float, *, shared: bool = False) -> None:
    topo = _forwarding_topology()
    try:
        if shared:  # the labeller's part: app0 (label 1) opens the connections
            topo.run(
                "gw",
                [
                    "nft",
                    "add table ip labeller; add chain ip labeller label { type filter hook "
                    "forward priority mangle; }; add rule ip labeller label ct state new "
                    f"ip saddr {APP0} ct mark set 1",
                ],
            )
        print(f"{'apps':>6} {'new flows/s':>12} {'sys us/flow':>12} {'TCP Mbit/s':>11}")
        for count in counts:
            policy = Policy.model_validate(policy_data(count, shared=shared))
            table = compile_policy(policy, Options(tun="lan"))
            topo.call("gw", lambda t=table, p=policy: live.apply(t, p, live.Nft()))  # type: ignore[misc]
            topo.run("gw", ["conntrack", "-F"], check=False)
            before = _arrived(topo)
            sent, cpu = topo.call("enc", _flood, seconds)
            arrived = _arrived(topo) - before
            lost = f" ({sent - arrived} lost)" if arrived < sent else ""
            mbits = _iperf(topo, int(seconds) + 1)
            per_flow = cpu / sent * 1e6
            print(
                f"{count:>6} {arrived / seconds:>12.0f} {per_flow:>12.2f} {mbits:>11.0f}{lost}",
                flush=True,
            )
    finally:
        topo.down()


# --- the commands, as an administrator runs them -------------------------------------

COMMANDS = ("check", "apply", "apply again", "apply --dry-run", "diff")


def _tree_of(ref: str, tmp: Path) -> Path:
    """The code of commit `ref` (main: the baseline; HEAD: this branch, as committed, so
    that the tree does not change while the benchmark runs), exported into `tmp`."""
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", ref], capture_output=True, check=True
    ).stdout
    (tmp / ref).mkdir()
    subprocess.run(["tar", "-x", "-C", str(tmp / ref)], input=archive, check=True)
    return tmp / ref


def _timed_command(netns: str, tree: Path, argv: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, exit status) of `seng-fw ARGV` run from `tree`'s code."""
    timing = Path(tempfile.mktemp(prefix="sfwbench-time-"))
    command = ["ip", "netns", "exec", netns, "/usr/bin/time", "-o", str(timing), "-f", "%e %M"]
    # `seng-fw` itself (every command's module imported): `check` is not a compile command
    command += [sys.executable, "-m", "seng_fw", *argv]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    seconds, kbytes = timing.read_text().split()[-2:]
    timing.unlink()
    return float(seconds), int(kbytes) / 1024, done.returncode


def commands(count: int, trees: dict[str, Path]) -> None:
    """check, apply (into an empty table), apply of the same policy again, apply
    --dry-run and diff of a policy with one app changed, each a process of its own in
    a scratch network namespace, for each code tree: seconds and peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        policy, changed = Path(tmp) / "policy.yaml", Path(tmp) / "changed.yaml"
        data = policy_data(count)
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        policy.write_text(yaml.dump(data, Dumper=dumper, sort_keys=False))
        data["apps"][count // 2]["egress"][1]["ports"] = [4242]
        changed.write_text(yaml.dump(data, Dumper=dumper, sort_keys=False))
        argvs = {
            "check": ["check", str(policy)],
            "apply": ["apply", str(policy), "--control-socket", "/nonexistent"],
            "apply again": ["apply", str(policy), "--control-socket", "/nonexistent"],
            "apply --dry-run": ["apply", str(changed), "--dry-run"],
            "diff": ["diff", str(changed)],
        }
        names = list(trees)
        print(f"{count} apps: seconds and peak RSS (MB) per command, one process each")
        header = f"{'command':<16}" + "".join(f" {n + ' s':>9} {n + ' MB':>9}" for n in names)
        print(header + (f" {'ratio s':>8} {'ratio MB':>8}" if len(names) == 2 else ""))
        spaces = {name: f"sfwbench{os.getpid()}-{index}" for index, name in enumerate(names)}
        for netns in spaces.values():
            ip("netns", "add", netns)
        try:
            # command by command, each tree in turn: the two figures of a row are taken
            # close together, under the same load
            for command in COMMANDS:
                row, figures = f"{command:<16}", []
                for name, tree in trees.items():
                    seconds, mbytes, status = _timed_command(spaces[name], tree, argvs[command])
                    figures.append((seconds, mbytes))
                    row += f" {seconds:>9.1f} {mbytes:>9.0f}" + ("" if status in (0, 1) else "!")
                if len(figures) == 2:
                    (s0, m0), (s1, m1) = figures
                    row += f" {s0 / s1:>8.1f} {m0 / m1:>8.1f}"
                print(row, flush=True)
        finally:
            for netns in spaces.values():
                ip("netns", "delete", netns)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", default="10,1000,10000", help="comma-separated app counts")
    parser.add_argument("--no-apply", action="store_true", help="skip the kernel part")
    parser.add_argument("--yaml", action="store_true", help="also time loading from YAML")
    parser.add_argument(
        "--forwarding", metavar="COUNTS", help="also measure forwarding, e.g. 10,10000 (root)"
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="per forwarding figure")
    parser.add_argument(
        "--shared", action="store_true", help="apps on the shared subnet (by label)"
    )
    parser.add_argument(
        "--commands",
        metavar="APPS",
        type=int,
        help="time the seng-fw commands (check, apply, apply --dry-run, diff) for a policy "
        "of APPS apps, this branch's HEAD against branch main (root)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="with --commands: no main")
    parser.add_argument(
        "--baseline", default="main", metavar="REF", help="with --commands: the commit to compare"
    )
    args = parser.parse_args()
    if args.commands:
        with tempfile.TemporaryDirectory() as tmp:
            trees = {} if args.no_baseline else {args.baseline: _tree_of(args.baseline, Path(tmp))}
            trees["HEAD"] = _tree_of("HEAD", Path(tmp))
            commands(args.commands, trees)
        return 0
    do_apply = not args.no_apply and os.geteuid() == 0
    if not do_apply and not args.no_apply:
        print("not root: apply times skipped", file=sys.stderr)
    header = f"{'apps':>6} {'elements':>9} {'validate':>9} {'yaml':>7} {'compile':>8}"
    header += f" {'render':>7} {'apply':>7} {'re-apply':>8}   (seconds)"
    print(header)
    for count in (int(n) for n in args.apps.split(",")):
        data = policy_data(count, shared=args.shared)
        policy, validate_s = timed(lambda d=data: Policy.model_validate(d))  # type: ignore[misc]
        yaml_s = float("nan")
        if args.yaml:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "policy.yaml"
                path.write_text(yaml.safe_dump(data, sort_keys=False))
                _, yaml_s = timed(lambda p=path: load_policy(p))  # type: ignore[misc]
        table, compile_s = timed(lambda p=policy: compile_policy(p))  # type: ignore[misc]
        _, render_s = timed(lambda t=table: json.dumps(t.transaction()))  # type: ignore[misc]
        elements = sum(len(s.elements) for s in table.sets)
        first = again = float("nan")
        if do_apply:
            first, again, elements = apply_twice(table, policy)
        print(
            f"{count:>6} {elements:>9} {validate_s:>9.3f} {yaml_s:>7.2f} {compile_s:>8.3f}"
            f" {render_s:>7.3f} {first:>7.3f} {again:>8.3f}",
            flush=True,
        )
    if args.forwarding:
        forwarding([int(n) for n in args.forwarding.split(",")], args.seconds, shared=args.shared)
    return 0


if __name__ == "__main__":
    sys.exit(main())
