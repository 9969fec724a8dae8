"""Admission of many enclaves joining at once (issue 12). Run as root:

    .venv/bin/python bench/bench_admission.py [--enclaves 1000] [--rounds 2] [--processes 2]

On the namespace lab, `--enclaves` scripted enclaves (tests/support/crowd.py, in
`--processes` worker processes on client host B) join at once, each with tunnel #1,
the IpAssignment exchange and tunnel #2 (two DTLS handshakes). Contenders, alternated
round by round in one run:

- `queued`: the gateway as configured by default (`limits.max_handshakes_in_progress`
  handshakes at once, further cookie-checked hellos wait in a FIFO);
- `unbounded`: every cookie-checked hello starts a handshake at once (the behaviour
  before the queue: `max_handshakes_in_progress` as large as `max_half_open`).

The crowd comes from one host, so the gateway's per-host limits are raised here (the
defaults, 20 handshakes/s with bursts of 5 and 16 half-open or waiting per source, admit
10 enclaves a second and no more), and so is the total handshake rate (100/s by
default). Everything else is the default configuration.

Per round: enclaves joined, wall time until the last tunnel #2 was up, rate, join
latency p50/p99 (first datagram to tunnel #2 up), and CPU per handshake of the gateway
and of the client side (process CPU time over the handshakes). Both run on the same two
cores, so the client side's CPU is part of the figure: the table says how much. These
machines are shared: compare the contenders within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support, as a script

from bench.bench_datapath import percentile, write_policy
from seng_fw.gateway.limits import LimitsConfig
from seng_fw.lab.lab import Lab
from tests.support.crowd import CROWD_LIMITS, Crowd

CONTENDERS: dict[str, dict[str, Any]] = {
    "queued": {},
    "unbounded": {"max_handshakes_in_progress": LimitsConfig().max_half_open},
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def admit(lab: Lab, count: int, timeout: float, processes: int, name: str) -> dict[str, Any]:
    """`count` enclaves join at once; the figures of that one join."""
    assert lab.gateway is not None
    crowd = Crowd(lab, name=name, processes=processes)
    try:
        crowd.prepare(count)  # certificates and keys before the clock starts
        gateway_cpu = cpu_seconds(lab.gateway.pid)
        times, wall = crowd.join(count, timeout)
        gateway_cpu = cpu_seconds(lab.gateway.pid) - gateway_cpu
    finally:
        crowd.close()
    handshakes = 2 * len(times)  # per completed handshake: none completed, no figure
    return {
        "enclaves": count,
        "joined": len(times),
        "wall_s": wall,
        "rate_per_s": len(times) / wall if wall else 0.0,
        "p50_ms": percentile(times, 0.5) * 1000 if times else None,
        "p99_ms": percentile(times, 0.99) * 1000 if times else None,
        "gateway_cpu_s": gateway_cpu,
        "client_cpu_s": crowd.cpu_seconds,
        "gateway_ms_per_handshake": gateway_cpu / handshakes * 1000 if handshakes else None,
        "client_ms_per_handshake": crowd.cpu_seconds / handshakes * 1000 if handshakes else None,
    }


def restart_gateway(lab: Lab, limits: dict[str, Any]) -> None:
    """A gateway with these limits; prints the previous one's counters (its last line)."""
    start = lab.gateway_log.stat().st_size
    lab.stop_gateway(timeout=300.0)  # closes every tunnel, flushes conntrack per address
    with lab.gateway_log.open() as log:
        log.seek(start)
        for line in log:
            if "gateway stopped:" in line:
                print("    " + line.split("gateway stopped: ", 1)[1].strip(), flush=True)
    lab.write_gateway_config(limits={**CROWD_LIMITS, **limits})
    lab.start_gateway()


ROW = "| {name} | {joined}/{enclaves} | {wall_s:.1f} | {rate_per_s:.1f} | {p50} | {p99} | " \
      "{gateway_ms_per_handshake:.1f} | {client_ms_per_handshake:.1f} |"  # fmt: skip


def markdown(rounds: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> str:
    lines = [
        f"Admission, {meta['enclaves']} enclaves joining at once from one host "
        f"({meta['processes']} client processes), medians of {meta['rounds']} rounds; "
        f"load average before: {meta['load']}",
        "",
        "| gateway | joined | wall (s) | rate (/s) | p50 (ms) | p99 (ms) | "
        "gateway CPU/handshake (ms) | client CPU/handshake (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, results in rounds.items():
        def median(key: str, results: list[dict[str, Any]] = results) -> float:
            values = [r[key] for r in results if r[key] is not None]
            return statistics.median(values) if values else float("nan")

        row = {k: median(k) for k in results[0] if k not in ("p50_ms", "p99_ms")}
        # (nan where no enclave joined in any round)
        row["joined"], row["enclaves"] = int(row["joined"]), int(row["enclaves"])
        lines.append(ROW.format(name=name, p50=f"{median('p50_ms'):,.0f}",
                                p99=f"{median('p99_ms'):,.0f}", **row))  # fmt: skip
    lines += ["", "Per round: " + "; ".join(
        f"{name}: " + ", ".join(f"{r['joined']} in {r['wall_s']:.1f} s" for r in results)
        for name, results in rounds.items()
    )]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="run as root")
    parser.add_argument("--enclaves", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2, help="client worker processes")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per join")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--out", type=Path, default=None, help="write results.md/.json here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_admission: must run as root (namespaces)", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # two sockets per enclave
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    names = args.contenders.split(",")
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    meta = {"enclaves": args.enclaves, "rounds": args.rounds, "processes": args.processes,
            "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        write_policy(policy)
        lab = Lab("sfwadm-", Path(tmp) / "state", policy, {"limits": CROWD_LIMITS})
        with lab:
            for r in range(args.rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    restart_gateway(lab, CONTENDERS[name])
                    result = admit(lab, args.enclaves, args.timeout, args.processes, f"r{r}{name}")
                    rounds[name].append(result)
                    print(f"  round {r + 1} {name:9} {result['joined']}/{args.enclaves} in "
                          f"{result['wall_s']:.1f} s, gateway {result['gateway_cpu_s']:.1f} s "
                          f"CPU, clients {result['client_cpu_s']:.1f} s", flush=True)  # fmt: skip
                    time.sleep(1.0)
            restart_gateway(lab, {})  # the last round's counters
    table = markdown(rounds, meta)
    print()
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(table)
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "rounds": rounds},
                                                          indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
