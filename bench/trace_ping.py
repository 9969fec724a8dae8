"""Where a ping's round trip goes through each tunnel (issue 12, added RTT). Run as root:

    .venv/bin/python bench/trace_ping.py [--pings 200] [--keep DIR]

Builds the lab of bench_datapath.py (plain routing, OpenVPN, seng-fw with one emulated
enclave), and for each contender records a ping run with `perf record -a` on the
scheduler and system-call tracepoints. For every echo (from ping's send to its receive
of the reply) it adds up, per process on the path (the client side: the emulator or
OpenVPN's client; the gateway side: seng-fw's gateway or OpenVPN's server):

- run: time on a CPU inside the echo's window (wakeup to sleep: the process's own work,
  its system calls included, in which the kernel forwards the packet);
- wait: wakeup to running (scheduling latency: a busy or idle CPU to get going);
- wakes and syscalls per echo, and the time spent in system calls.

Prints medians over the echoes per contender, and the syscall timeline of seng-fw's
median echo. Perf's own tracing slows everything a little, alike for all contenders.
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as bench/trace_ping.py
from bench.bench_datapath import (
    OVPN_CLIENT,
    start_openvpn,
    write_policy,
)
from seng_fw.lab.lab import DEMO_WEBAPP, EnclaveSpec, Lab
from seng_fw.lab.topology import CLIENT_A, EXTERNAL
from seng_fw.system.netns import ip

EVENTS = "sched:sched_switch,sched:sched_wakeup,raw_syscalls:sys_enter,raw_syscalls:sys_exit"
LINE = re.compile(r"^\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+([\w:]+):\s*(.*)$")
SYSCALL_NAMES = {0: "read", 1: "write", 7: "poll", 44: "sendto", 45: "recvfrom", 46: "sendmsg",
                 47: "recvmsg", 232: "epoll_wait", 281: "epoll_pwait", 20: "writev",
                 271: "ppoll", 441: "epoll_pwait2", 228: "clock_gettime", 13: "rt_sigaction",
                 14: "rt_sigprocmask", 299: "recvmmsg", 307: "sendmmsg", 23: "select",
                 270: "pselect6", 39: "getpid", 72: "fcntl", 16: "ioctl"}  # fmt: skip


@dataclass
class Event:
    ts: float
    pid: int
    kind: str
    fields: str


@dataclass
class Echo:
    start: float
    end: float
    per_process: dict[str, dict[str, float]] = field(default_factory=dict)


def parse(script: str) -> list[Event]:
    events = []
    for line in script.splitlines():
        m = LINE.match(line)
        if m:
            events.append(Event(float(m.group(4)), int(m.group(2)), m.group(5), m.group(6)))
    return events


def _field(fields: str, name: str) -> str:
    m = re.search(rf"{name}=(\S+)", fields)
    return m.group(1) if m else ""


def echoes(events: list[Event], ping_pid: int) -> list[tuple[float, float]]:
    """(send, reply) times: ping's sendto enter to the exit of the recvmsg that follows
    a wakeup."""
    out = []
    start: float | None = None
    woken = False
    for e in events:
        if e.pid != ping_pid:
            if e.kind == "sched:sched_wakeup" and _field(e.fields, "pid") == str(ping_pid):
                woken = start is not None
            continue
        if e.kind == "raw_syscalls:sys_enter" and e.fields.startswith("NR 44 "):
            start, woken = e.ts, False
        elif (
            e.kind == "raw_syscalls:sys_exit"
            and e.fields.startswith("NR 47 ")
            and start is not None
            and woken
            and not e.fields.endswith("= -11")
        ):
            out.append((start, e.ts))
            start = None
    return out


def account(
    events: list[Event], window: tuple[float, float], pids: dict[str, int]
) -> dict[str, dict[str, float]]:
    """Run, wait, wakes, syscalls and syscall time of each process inside `window`."""
    lo, hi = window
    by_pid = {pid: name for name, pid in pids.items()}
    stats = {name: collections.defaultdict(float) for name in pids}
    on_cpu: dict[int, float] = {}
    woken_at: dict[int, float] = {}
    in_call: dict[int, float] = {}
    for e in events:
        if e.ts > hi:
            break
        if e.kind == "sched:sched_wakeup":
            target = int(_field(e.fields, "pid") or 0)
            if target in by_pid:
                woken_at[target] = e.ts
            continue
        if e.kind == "sched:sched_switch":
            prev = int(_field(e.fields, "prev_pid") or 0)
            nxt = int(_field(e.fields, "next_pid") or 0)
            if prev in on_cpu:
                began = on_cpu.pop(prev)
                if e.ts >= lo:
                    stats[by_pid[prev]]["run"] += (e.ts - max(began, lo)) * 1e6
            if nxt in by_pid:
                on_cpu[nxt] = e.ts
                if nxt in woken_at:
                    w = woken_at.pop(nxt)
                    if w >= lo:
                        stats[by_pid[nxt]]["wait"] += (e.ts - w) * 1e6
                        stats[by_pid[nxt]]["wakes"] += 1
            continue
        if e.pid not in by_pid or e.ts < lo:
            if e.kind == "raw_syscalls:sys_enter" and e.pid in by_pid:
                in_call[e.pid] = e.ts
            continue
        s = stats[by_pid[e.pid]]
        if e.kind == "raw_syscalls:sys_enter":
            in_call[e.pid] = e.ts
            nr = int(e.fields.split()[1])
            if nr not in (232, 281, 441):  # the wait itself is not work
                s["syscalls"] += 1
        elif e.kind == "raw_syscalls:sys_exit" and e.pid in in_call:
            nr = int(e.fields.split()[1])
            began = in_call.pop(e.pid)
            if nr not in (232, 281, 441):
                s["in_syscalls"] += (e.ts - max(began, lo)) * 1e6
    for pid, began in on_cpu.items():
        stats[by_pid[pid]]["run"] += (hi - max(began, lo)) * 1e6
    return {name: dict(s) for name, s in stats.items()}


def timeline(events: list[Event], window: tuple[float, float], pids: dict[str, int]) -> list[str]:
    lo, hi = window
    by_pid = {pid: name for name, pid in pids.items()}
    lines = []
    entered: dict[int, tuple[float, int]] = {}
    for e in events:
        if e.ts > hi + 1e-6:
            break
        t = (e.ts - lo) * 1e6
        if e.ts < lo - 1e-6:
            if e.pid in by_pid and e.kind == "raw_syscalls:sys_enter":
                entered[e.pid] = (t, int(e.fields.split()[1]))  # e.g. the epoll_wait
            continue
        if e.kind == "sched:sched_wakeup":
            target = int(_field(e.fields, "pid") or 0)
            if target in by_pid:
                lines.append(f"{t:8.1f} µs  wakeup   {by_pid[target]}")
        elif e.kind == "sched:sched_switch":
            nxt = int(_field(e.fields, "next_pid") or 0)
            if nxt in by_pid:
                lines.append(f"{t:8.1f} µs  running  {by_pid[nxt]}")
        elif e.pid in by_pid and e.kind == "raw_syscalls:sys_enter":
            entered[e.pid] = (t, int(e.fields.split()[1]))
        elif e.pid in by_pid and e.kind == "raw_syscalls:sys_exit" and e.pid in entered:
            began, nr = entered.pop(e.pid)
            result = e.fields.rsplit("=", 1)[-1].strip()
            name = SYSCALL_NAMES.get(nr, f"sys{nr}")
            lines.append(f"{began:8.1f} µs  {by_pid[e.pid]:8} {name}() = {result}"
                         f"  [{t - began:.1f} µs]")  # fmt: skip
    return lines


def trace(lab: Lab, source: str, pings: int, data: Path) -> tuple[str, int]:
    """perf record -a around one ping run; returns (perf script output, ping's pid)."""
    perf = subprocess.Popen(
        ["perf", "record", "-a", "-e", EVENTS, "-o", str(data), "--", "sleep", "3600"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(1.0)
    ping = lab.topology.popen(
        CLIENT_A,
        ["ping", "-n", "-q", "-I", source, "-c", str(pings), "-i", "0.01", "-W", "1",
         str(lab.external)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = ping.communicate(timeout=pings * 0.05 + 30)
    ping_pid = ping.pid
    perf.send_signal(2)
    perf.wait(30)
    script = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "comm,pid,cpu,time,event,trace"],
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    summary = out.decode(errors="replace").strip().splitlines()[-1:]
    print(f"  ping: {' '.join(summary)}", flush=True)
    return script, ping_pid


def profile(lab: Lab, source: str, pings: int, pids: dict[str, int], data: Path, top: int) -> None:
    """Cycles of the tunnel's processes (perf, high rate) over a ping run: what the
    per-echo run time is made of."""
    pid_list = ",".join(str(pid) for name, pid in pids.items() if name != "ping")
    perf = subprocess.Popen(
        ["perf", "record", "-F", "20000", "-p", pid_list, "-o", str(data)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(1.0)
    lab.topology.run(
        CLIENT_A, ["ping", "-n", "-q", "-I", source, "-c", str(pings), "-i", "0.01", "-W", "1",
                   str(lab.external)],
        check=False, timeout=pings * 0.05 + 30,
    )  # fmt: skip
    perf.send_signal(2)
    perf.wait(30)
    for name, pid in pids.items():
        if name == "ping":
            continue
        out = subprocess.run(
            ["perf", "report", "-i", str(data), "--stdio", "--no-children", "--pid", str(pid),
             "--sort", "dso,sym", "--percent-limit", "1"],
            capture_output=True, text=True,
        ).stdout  # fmt: skip
        lines = [line for line in out.splitlines() if line.strip() and line[0] != "#"]
        print(f"  perf, {name} (pid {pid}), by symbol:")
        for line in lines[:top]:
            print("   ", line.strip())


def report(name: str, events: list[Event], ping_pid: int, pids: dict[str, int]) -> list[Echo]:
    found = []
    for window in echoes(events, ping_pid):
        found.append(Echo(*window, account(events, window, pids)))
    if not found:
        print(f"{name}: no echoes traced")
        return found
    rtts = [(e.end - e.start) * 1e6 for e in found]
    print(f"\n== {name}: {len(found)} echoes, RTT seen by ping's syscalls median "
          f"{statistics.median(rtts):.0f} µs ==")  # fmt: skip
    print(f"  {'process':10} {'run µs':>8} {'wait µs':>8} {'wakes':>6} {'syscalls':>9} "
          f"{'in sys µs':>10}")  # fmt: skip
    for proc in pids:

        def med(key: str, proc: str = proc) -> float:
            return statistics.median(e.per_process[proc].get(key, 0.0) for e in found)

        print(f"  {proc:10} {med('run'):8.1f} {med('wait'):8.1f} {med('wakes'):6.0f} "
              f"{med('syscalls'):9.0f} {med('in_syscalls'):10.1f}")  # fmt: skip
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description="trace ping's path through each tunnel")
    parser.add_argument("--pings", type=int, default=200)
    parser.add_argument("--prefix", default="sfwtp-")
    parser.add_argument("--timeline", action="store_true", help="syscalls of the median echo")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="PINGS",
        help="then sample the processes with perf over PINGS echoes",
    )
    parser.add_argument("--only", default=None, help="contenders, e.g. openvpn,seng-fw")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        write_policy(policy)
        lab = Lab(args.prefix, Path(tmp) / "state", policy)
        with lab:
            ip("route", "add", "10.77.2.0/24", "via", str(lab.gateway_lan), netns=lab.ns(CLIENT_A))
            ip("route", "add", "10.77.1.0/24", "via", "10.77.2.1", netns=lab.ns(EXTERNAL))
            ovpn_server, ovpn_client = start_openvpn(lab, Path(tmp) / "openvpn")
            enclave = lab.start_enclave(EnclaveSpec("trace", CLIENT_A, DEMO_WEBAPP))
            state = enclave.wait_settled()
            if state.get("status") != "up":
                print(f"trace_ping: enclave not up: {state}", file=sys.stderr)
                return 1
            assert lab.gateway is not None
            a_lan = str(lab.topology.address(CLIENT_A, "lan"))
            contenders = {
                "plain": (a_lan, {}),
                "openvpn": (OVPN_CLIENT, {"client": ovpn_client.pid, "gateway": ovpn_server.pid}),
                "seng-fw": (state["address"], {"client": enclave.process.pid,
                                               "gateway": lab.gateway.pid}),
            }  # fmt: skip
            time.sleep(0.5)
            results: dict[str, list[Echo]] = {}
            for name, (source, pids) in contenders.items():
                if args.only and name not in args.only.split(","):
                    continue
                print(f"trace_ping: {name}", flush=True)
                script, ping_pid = trace(lab, source, args.pings, Path(tmp) / f"{name}.data")
                events = parse(script)
                results[name] = report(name, events, ping_pid, {"ping": ping_pid, **pids})
                if name != "plain" and args.timeline and results[name]:
                    echoes_sorted = sorted(results[name], key=lambda e: e.end - e.start)
                    middle = echoes_sorted[len(echoes_sorted) // 2]
                    print("  timeline of the median echo:")
                    for line in timeline(events, (middle.start, middle.end),
                                         {"ping": ping_pid, **pids}):  # fmt: skip
                        print("   ", line)
                if name != "plain" and args.profile:
                    profile(lab, source, args.profile, pids, Path(tmp) / f"{name}-prof.data", 25)
            for process in (ovpn_client, ovpn_server):
                process.terminate()
                process.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
