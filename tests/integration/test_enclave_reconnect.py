"""Issue 14 item 4: emulated enclaves notice a dead gateway, tear their TUN device down,
reconnect with backoff once it is back, and say so truthfully in their state file.

The lab runs the demo policy: webapp may reach the external host (ICMP, TCP echo) but
nothing on the gateway itself, so the keepalive has to work without any rule for it."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from seng_fw.lab.lab import DEMO_WEBAPP, EnclaveSpec, Lab, RunningEnclave
from seng_fw.lab.services import probe_icmp
from seng_fw.lab.topology import CLIENT_A

pytestmark = pytest.mark.root

KEEPALIVE = 1.0
RECONNECT = ("--reconnect", "--keepalive", str(KEEPALIVE), "--backoff-max", "1")


@pytest.fixture
def lab(ns_prefix: str, tmp_path: Path) -> Iterator[Lab]:
    with Lab(ns_prefix, tmp_path / "state") as running:
        yield running


def _wait_state(
    enclave: RunningEnclave, accept: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = enclave.read_state()
        if accept(state):
            return state
        assert enclave.process.poll() is None, enclave.log_file.read_text()[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"state {enclave.state}; log:\n{enclave.log_file.read_text()[-3000:]}")


def _tun_exists(lab: Lab, name: str) -> bool:
    shown = subprocess.run(
        ["ip", "-n", lab.ns(CLIENT_A), "link", "show", name], capture_output=True, check=False
    )
    return shown.returncode == 0


def _log(enclave: RunningEnclave) -> str:
    return enclave.log_file.read_text(errors="replace")


def _ping(lab: Lab, enclave: RunningEnclave) -> bool:
    return probe_icmp(lab.ns(CLIENT_A), enclave.address, str(lab.external), timeout=1.0)


def test_an_enclave_notices_a_killed_gateway_and_reconnects_after_its_restart(lab: Lab) -> None:
    enclave = lab.start_enclave(EnclaveSpec("web", CLIENT_A, DEMO_WEBAPP), extra_args=RECONNECT)
    first = enclave.wait_settled()
    assert first["status"] == "up" and first["keepalive"] == KEEPALIVE, first
    assert _ping(lab, enclave)
    tun = first["tun"]

    # Idle but healthy for several keepalive intervals: the probes are answered (by the
    # gateway's kernel, under a policy that allows nothing to the gateway), nothing flaps.
    time.sleep(4 * KEEPALIVE)
    assert enclave.read_state() == first
    assert "tunnel dead" not in _log(enclave)

    lab.stop_gateway(signal.SIGKILL)  # no close_notify: the tunnels just go silent
    killed = time.monotonic()
    _wait_state(enclave, lambda s: s.get("status") == "reconnecting", 10 * KEEPALIVE)
    noticed = time.monotonic() - killed
    # (The state file may already tell of the next attempt: the log keeps each.)
    assert "tunnel down: tunnel dead: no answer from the gateway" in _log(enclave)
    assert not _tun_exists(lab, tun)  # torn down, not left "up" with nothing flowing
    assert noticed <= 2 * KEEPALIVE + 2.0, noticed  # idle interval + answer window + slack
    # While the gateway is away, attempts fail fast (port unreachable) and are retried.
    time.sleep(1.5)
    assert enclave.read_state()["status"] == "reconnecting"

    lab.start_gateway()
    restarted = time.monotonic()
    again = _wait_state(
        enclave,
        lambda s: s.get("status") == "up" and s.get("up_at") != first["up_at"],
        15.0,
    )
    assert again["reconnects"] >= 1, again
    enclave.state = again
    deadline = time.monotonic() + 10.0
    while not _ping(lab, enclave):
        assert time.monotonic() < deadline, "no traffic after the reconnect"
    gap = time.monotonic() - restarted
    print(f"restart gap: {gap:.2f} s (gateway listening -> first echo reply through the tunnel)")
    assert _tun_exists(lab, tun)


def test_a_gateway_that_closes_the_tunnel_is_reconnected_to(lab: Lab) -> None:
    """SIGTERM: the gateway sends close_notify; the emulator reports it and comes back."""
    enclave = lab.start_enclave(EnclaveSpec("web", CLIENT_A, DEMO_WEBAPP), extra_args=RECONNECT)
    first = enclave.wait_settled()
    assert first["status"] == "up", first
    assert lab.stop_gateway() == 0
    _wait_state(enclave, lambda s: s.get("status") == "reconnecting", 5.0)
    assert "tunnel down: gateway ended the tunnel: close_notify" in _log(enclave)
    lab.start_gateway()
    again = _wait_state(
        enclave, lambda s: s.get("status") == "up" and s.get("up_at") != first["up_at"], 15.0
    )
    enclave.state = again
    assert _ping(lab, enclave)


def test_without_reconnect_a_dead_tunnel_ends_the_emulator_with_state_down(lab: Lab) -> None:
    enclave = lab.start_enclave(
        EnclaveSpec("web", CLIENT_A, DEMO_WEBAPP), extra_args=("--keepalive", str(KEEPALIVE))
    )
    first = enclave.wait_settled()
    assert first["status"] == "up", first
    lab.stop_gateway(signal.SIGKILL)
    assert enclave.process.wait(10 * KEEPALIVE) == 1
    state = enclave.read_state()
    assert state["status"] == "down" and "tunnel dead" in state["reason"], state
    assert not _tun_exists(lab, first["tun"])
    lab.start_gateway()  # for the lab's own clean-up
