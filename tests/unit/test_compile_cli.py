"""`seng-fw check | compile` (no privileges needed), and the parts of apply that are pure."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from seng_fw.cli import _COMMAND_MODULES
from seng_fw.cli import main as seng_fw_main
from seng_fw.compile import live
from seng_fw.compile.cli import main
from seng_fw.compile.compiler import compile_policy
from seng_fw.policy.loader import load_policy

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "policies/example.yaml"


def test_registered_in_the_main_cli() -> None:
    assert "seng_fw.compile.cli" in _COMMAND_MODULES


def test_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert seng_fw_main(["check", str(EXAMPLE)]) == 0
    assert "ok (4 apps, 2 categories)" in capsys.readouterr().out


def test_check_reports_every_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = EXAMPLE.read_text().replace("{app: sdk-nginx}", "{app: nginx}")
    bad = bad.replace("categories: [dns]\n    ingress", "categories: [dnss]\n    ingress")
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    assert seng_fw_main(["check", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"seng-fw: 2 error(s) in {path}"
    assert any(line.startswith(f"{path}:") and "unknown app 'nginx'" in line for line in err)
    assert any("apps[1].categories[0]: unknown category 'dnss' (did you mean 'dns'?)" in line
               for line in err)  # fmt: skip


def test_unreadable_policy_is_a_usage_error(tmp_path: Path) -> None:
    assert seng_fw_main(["check", str(tmp_path / "missing.yaml")]) == 2
    assert main(["compile", str(tmp_path / "missing.yaml")]) == 2


def test_invalid_yaml_fails_the_check(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("apps: [\n")
    assert seng_fw_main(["check", str(tmp_path / "p.yaml")]) == 1


def test_compile_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", str(EXAMPLE), "--tun", "tun7"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# seng-fw ruleset for")
    assert "add table inet seng\ndelete table inet seng\n" in text
    assert 'iifname "tun7"' in text
    out = tmp_path / "ruleset.json"
    assert main(["compile", str(EXAMPLE), "--format", "json", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc == compile_policy(load_policy(EXAMPLE)).transaction()


def test_compile_of_an_invalid_policy_prints_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p.yaml").write_text("apps: 3\n")
    assert main(["compile", str(tmp_path / "p.yaml")]) == 1
    assert capsys.readouterr().out == ""


# --- pieces of apply and diff that need no kernel -------------------------------------


def test_carry_over_keeps_counters_and_valid_exposures() -> None:
    policy = load_policy(EXAMPLE)
    table = compile_policy(policy)
    gateway = int(IPv4Address("10.77.2.1"))
    state = live.LiveState(
        exists=True,
        counters={"tx_sdk-nginx": (5, 500), "tx_gone": (1, 1)},
        exposed={
            (gateway, 6, 8443): IPv4Address("172.16.28.2"),  # still exposed, right app
            (gateway, 6, 9999): IPv4Address("172.16.28.3"),  # exposure removed
        },
    )
    live.carry_over(table, policy, state)
    counts = {c.name: (c.packets, c.bytes) for c in table.counters}
    assert counts["tx_sdk-nginx"] == (5, 500) and counts["rx_sdk-nginx"] == (0, 0)
    assert "tx_gone" not in counts
    exposed = table.set("expose_addr")
    assert exposed.elements == [((gateway, gateway), (6, 6), (8443, 8443))]
    assert exposed.values == [int(IPv4Address("172.16.28.2"))]
    assert "10.77.2.1 . tcp . 8443 : 172.16.28.2" in table.text()
    # a target outside the exposing app's subnet is dropped
    table = compile_policy(policy)
    state.exposed = {(gateway, 6, 8443): IPv4Address("192.168.28.9")}
    live.carry_over(table, policy, state)
    assert table.set("expose_addr").elements == []


def test_reload_gateway(tmp_path: Path) -> None:
    pid_file = tmp_path / "gateway.pid"
    assert "no gateway pid file" in live.reload_gateway(pid_file)
    pid_file.write_text("garbage\n")
    assert "does not hold a pid" in live.reload_gateway(pid_file)
    # A stand-in gateway: says so in its command line and records SIGHUP.
    marker = tmp_path / "hup"
    code = (
        "import signal, sys, time, pathlib  # seng-fw gateway stand-in\n"
        f"signal.signal(signal.SIGHUP, lambda *a: pathlib.Path({str(marker)!r}).touch())\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    gateway = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    other = subprocess.Popen(["sleep", "30"])
    try:
        assert gateway.stdout is not None and gateway.stdout.readline() == "ready\n"
        pid_file.write_text(f"{gateway.pid}\n")
        assert "told to reload" in live.reload_gateway(pid_file)
        deadline = time.monotonic() + 5
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marker.exists()
        # a pid file naming some other process: never signalled (SIGHUP would kill it)
        pid_file.write_text(f"{other.pid}\n")
        assert "not a seng-fw gateway" in live.reload_gateway(pid_file)
        assert other.poll() is None
    finally:
        for proc in (gateway, other):
            proc.send_signal(signal.SIGTERM)
            proc.wait()
        assert gateway.stdout is not None
        gateway.stdout.close()
    pid_file.write_text(f"{gateway.pid}\n")
    assert "is not running" in live.reload_gateway(pid_file)


# --- apply: progress and summary ------------------------------------------------------


def test_progress_shows_slow_phases_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from seng_fw.compile.cli import _Progress

    monkeypatch.setattr(_Progress, "DELAY", 0.05)
    progress = _Progress(enabled=True)
    with progress.step("quick"):
        pass
    with progress.step("kernel transaction"):
        time.sleep(0.3)
    err = capsys.readouterr().err
    assert "quick" not in err
    assert err.startswith("seng-fw apply: kernel transaction... ") and err.endswith(" s\n")
    with _Progress(enabled=False).step("kernel transaction"):  # not a terminal
        time.sleep(0.1)
    assert capsys.readouterr().err == ""


def test_apply_summary() -> None:
    from seng_fw.compile.cli import summary

    table = compile_policy(load_policy(EXAMPLE))
    result = live.ApplyResult(changed=True, replaced=False, digest=live.ruleset_digest(table))
    line = summary(table, result, 4)
    assert line.startswith("applied: table inet seng created: 4 apps, ")
    assert f"{len(table.chains)} chains with " in line and line.endswith(f"{result.digest[:12]})")
    # the digest: of the compiled table only, stable, and changed by any change
    again = compile_policy(load_policy(EXAMPLE))
    assert live.ruleset_digest(again) == result.digest
    again.chains[-1].rules.pop()
    assert live.ruleset_digest(again) != result.digest
