"""Where the gateway's time goes under a TCP stream (issue 12). Run as root:

    .venv/bin/python bench/profile_gateway.py [--seconds 10] [--direction up|down|both]

Builds the namespace lab with one emulated enclave, runs iperf3 through the tunnels
and meanwhile samples the gateway process with py-spy (Python stacks; `--native` adds
C frames) and, if it works on this machine, perf (whole process, kernel included).
Prints the top entries: py-spy by own time (the innermost frame) and by inclusive time
(any frame), perf by shared object and symbol. Raw profiles are kept in --out.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from seng_fw.lab.lab import DEMO_WEBAPP, EnclaveSpec, Lab
from seng_fw.lab.topology import CLIENT_A, EXTERNAL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as bench/profile_gateway.py
from bench.bench_datapath import (
    IPERF_PORT,
    cpu_seconds,
    tcp_mbits,
    write_policy,
)


def iperf_thread(lab: Lab, source: str, seconds: float, extra: tuple[str, ...]) -> threading.Thread:
    """iperf3 TCP in the background (the profilers attach meanwhile)."""

    def run() -> None:
        print(f"  iperf3: {tcp_mbits(lab, source, seconds, *extra):.0f} Mbit/s", flush=True)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


IDLE_FRAMES = ("EpollSelector.select", "select (selectors.py")


def py_spy_tops(raw: Path, top: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(own, inclusive) shares per frame from py-spy's raw (collapsed) output, of the
    samples where the gateway was busy (not waiting in epoll). A frame's own time
    includes the system calls it makes (TUN writes, sendto): the kernel's forwarding
    work runs inside them."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames or frames[-1].startswith(IDLE_FRAMES):
            continue  # waiting in epoll: idle, not work
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    share = 100.0 / max(1, total)
    return (
        [(f, c * share) for f, c in own.most_common(top)],
        [(f, c * share) for f, c in inclusive.most_common(top)],
    )


def run_perf(pid: int, seconds: float, out: Path, top: int) -> str:
    if shutil.which("perf") is None:
        return "perf: not installed (Debian linux-perf)"
    data = out / "perf.data"
    record = subprocess.run(
        ["perf", "record", "-F", "499", "-g", "-p", str(pid), "-o", str(data), "--",
         "sleep", str(seconds)],
        capture_output=True, text=True,
    )  # fmt: skip
    if record.returncode != 0:
        return f"perf record failed: {record.stderr.strip()[-300:]}"
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso,sym",
         "--percent-limit", "0.8", "-g", "none"],
        capture_output=True, text=True,
    )  # fmt: skip
    lines = [line for line in report.stdout.splitlines() if line.strip() and line[0] != "#"]
    (out / "perf-report.txt").write_text(report.stdout)
    by_dso = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso",
         "-g", "none"],
        capture_output=True, text=True,
    )  # fmt: skip
    shares = [line for line in by_dso.stdout.splitlines() if line.strip() and line[0] != "#"]
    return "\n".join(["by shared object:", *shares[:6], "by symbol:", *lines[:top]])


def main() -> int:
    parser = argparse.ArgumentParser(description="profile the gateway under iperf3 TCP")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--direction", choices=("up", "down", "both"), default="both")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "seng-fw-prof")
    parser.add_argument("--prefix", default="sfwprof-")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("profile_gateway: py-spy missing (pip install -e '.[bench]')", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    directions = ("up", "down") if args.direction == "both" else (args.direction,)
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        write_policy(policy)
        lab = Lab(args.prefix, Path(tmp) / "state", policy)
        with lab:
            server = lab.topology.popen(
                EXTERNAL, ["iperf3", "-s", "-p", str(IPERF_PORT), "-B", str(lab.external)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            enclave = lab.start_enclave(EnclaveSpec("prof", CLIENT_A, DEMO_WEBAPP))
            state = enclave.wait_settled()
            if state.get("status") != "up":
                print(f"profile_gateway: enclave not up: {state}", file=sys.stderr)
                return 1
            assert lab.gateway is not None
            pid = lab.gateway.pid
            time.sleep(0.5)
            for direction in directions:
                extra = ("-R",) if direction == "down" else ()
                iperf = iperf_thread(lab, state["address"], args.seconds + 2, extra)
                time.sleep(1.0)  # past slow start
                cpu0 = cpu_seconds(pid)
                raw = args.out / f"py-spy-{direction}.txt"
                spy = subprocess.run(
                    [py_spy, "record", "--pid", str(pid), "--duration", str(int(args.seconds)),
                     "--rate", "200", "--format", "raw", "--output", str(raw), "--nonblocking",
                     *(["--native"] if args.native else [])],
                    capture_output=True, text=True,
                )  # fmt: skip
                cpu1 = cpu_seconds(pid)
                iperf.join()
                if spy.returncode != 0:
                    print(f"py-spy failed: {spy.stderr.strip()[-400:]}", file=sys.stderr)
                    return 1
                own, inclusive = py_spy_tops(raw, args.top)
                print(f"\n== TCP {direction}: gateway "
                      f"{(cpu1 - cpu0) / args.seconds:.2f} CPU s/s while sampled ==")  # fmt: skip
                print("py-spy, own time (innermost frame), share of busy samples:")
                for frame, pct in own:
                    print(f"  {pct:5.1f}%  {frame}")
                print("py-spy, inclusive time:")
                for frame, pct in inclusive:
                    print(f"  {pct:5.1f}%  {frame}")
                # perf on a second run of the same test: py-spy's sampling would show up.
                iperf = iperf_thread(lab, state["address"], args.seconds + 2, extra)
                time.sleep(1.0)
                perf_out = args.out / f"perf-{direction}"
                perf_out.mkdir(exist_ok=True)
                print(f"perf (by shared object and symbol; {args.out}/perf-{direction}):")
                print(run_perf(pid, args.seconds, perf_out, args.top))
                iperf.join()
            server.terminate()
    print(f"\nraw profiles: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
