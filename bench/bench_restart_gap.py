"""The restart gap (issue 14 item 4). Run as root:

    .venv/bin/python bench/bench_restart_gap.py [--cycles 3] [--keepalive 2] [--enclaves 2]

On the namespace lab, emulated enclaves run with `--reconnect --keepalive K`; each cycle
SIGKILLs the gateway and restarts it once every enclave has noticed. Prints per cycle
and as median/max:
- detection: SIGKILL -> the enclave's state says "reconnecting" (its TUN device is gone);
  bounded by 2 x K (K idle, then K for the probes' answer);
- restart gap: gateway listening again -> first echo reply through the tunnel (ping from
  the enclave's new address to the external host), what an application sees;
and, as the baseline measured in the same run, the same "listening -> first reply" for a
fresh enclave started against a running gateway (a cold start). The gap over the cold
start is what the backoff costs. Shared, noisy machine: compare the ratio.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from seng_fw.lab.lab import DEMO_WEBAPP, EnclaveSpec, Lab, RunningEnclave
from seng_fw.lab.services import probe_icmp
from seng_fw.lab.topology import CLIENT_A, CLIENT_B


def _until(check: Callable[[], bool], timeout: float) -> float:
    """Seconds until `check()` is true (raises after `timeout`)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise TimeoutError("condition not met")
        time.sleep(0.02)
    return time.monotonic() - start


def _pings(lab: Lab, enclave: RunningEnclave) -> bool:
    state = enclave.read_state()
    if state.get("status") != "up":
        return False
    return probe_icmp(lab.ns(enclave.spec.host), enclave.address, str(lab.external), 0.4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--keepalive", type=float, default=2.0)
    parser.add_argument("--enclaves", type=int, default=2)
    args = parser.parse_args()
    flags = ("--reconnect", "--keepalive", str(args.keepalive), "--backoff-max", "2")
    detections: list[float] = []
    gaps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, Lab("bgap-", Path(tmp) / "state") as lab:
        # Baseline: a fresh enclave against a running gateway, start -> first reply.
        start = time.monotonic()
        cold = lab.start_enclave(EnclaveSpec("cold", CLIENT_A, DEMO_WEBAPP))
        _until(lambda: _pings(lab, cold), 30)
        cold_start = time.monotonic() - start
        lab.stop_enclave(cold)

        enclaves = [
            lab.start_enclave(
                EnclaveSpec(f"web{i}", (CLIENT_A, CLIENT_B)[i % 2], DEMO_WEBAPP), extra_args=flags
            )
            for i in range(args.enclaves)
        ]
        for enclave in enclaves:
            _until(lambda e=enclave: _pings(lab, e), 30)
        for cycle in range(args.cycles):
            lab.stop_gateway(signal.SIGKILL)
            killed = time.monotonic()
            for enclave in enclaves:
                _until(lambda e=enclave: e.read_state().get("status") == "reconnecting", 60)
                detections.append(time.monotonic() - killed)
            lab.start_gateway()
            restarted = time.monotonic()
            for enclave in enclaves:
                _until(lambda e=enclave: _pings(lab, e), 60)
                gaps.append(time.monotonic() - restarted)
            print(
                f"cycle {cycle + 1}: detection {max(detections[-len(enclaves) :]):.2f} s, "
                f"restart gap {max(gaps[-len(enclaves) :]):.2f} s (slowest of {len(enclaves)})"
            )
    print(
        f"detection (keepalive {args.keepalive:g} s): median {statistics.median(detections):.2f} s,"
        f" max {max(detections):.2f} s"
    )
    print(f"restart gap: median {statistics.median(gaps):.2f} s, max {max(gaps):.2f} s")
    print(
        f"cold start (baseline, same run): {cold_start:.2f} s; "
        f"gap / cold start: {statistics.median(gaps) / cold_start:.2f}"
    )


if __name__ == "__main__":
    main()
