"""`seng-fw check | compile` (no privileges needed), and the parts of apply that are pure."""

from __future__ import annotations

import json
import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from seng_fw.cli import _COMMAND_MODULES
from seng_fw.cli import main as seng_fw_main
from seng_fw.compile import live
from seng_fw.compile.cli import _hand_over, main
from seng_fw.compile.compiler import compile_policy
from seng_fw.policy.digest import policy_digest
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


def test_apply_without_a_gateway_exits_3_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _hand_over(EXAMPLE, "ab" * 32, tmp_path / "none.sock") == 3
    assert "no gateway answering" in capsys.readouterr().err


POLICY_YAML = """\
apps:
  - name: webapp
    mrenclave: [{webapp}]
    hosts: [10.0.0.0/24]
    subnet: {{subnet: 192.168.29.0/24}}
"""


def test_apply_hands_the_policy_and_its_digest_to_the_gateway(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The gateway loads the very file apply applied (not its configured one), checks
    its digest, and admits by it; a digest that does not match is refused."""
    from tests.support.gateway_service import NGINX, WEBAPP, RunningGateway

    applied = tmp_path / "applied.yaml"
    applied.write_text(POLICY_YAML.format(webapp=WEBAPP.hex()))
    digest = policy_digest(load_policy(applied))
    with RunningGateway(tmp_path) as running:
        running.gateway.control.load_policy = load_policy  # the real loader
        before = running.gateway.control.policy_digest()
        # A digest of something else: refused, the running policy kept (fail closed).
        assert _hand_over(applied, "cd" * 32, running.socket) == 1
        assert "gateway refused the policy" in capsys.readouterr().err
        assert running.gateway.control.policy_digest() == before
        assert running.gateway.admit(NGINX) == "nginx"
        assert _hand_over(applied, digest, running.socket) == 0
        assert "gateway reloaded" in capsys.readouterr().out
        service = running.gateway.control
        assert service.policy_digest() == digest and service.policy_path == applied
        assert running.gateway.admit(NGINX) == "unknown_mrenclave"
        assert running.gateway.admit(WEBAPP) == "webapp"


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
    result = live.ApplyResult(
        changed=True, replaced=False, digest=live.ruleset_digest(table), policy_digest="ab" * 32
    )
    line = summary(table, result, 4)
    assert line.startswith("applied: table inet seng created: 4 apps, ")
    assert f"{len(table.chains)} chains with " in line and line.endswith(f"{result.digest[:12]})")
    # the digest: of the compiled table only, stable, and changed by any change
    again = compile_policy(load_policy(EXAMPLE))
    assert live.ruleset_digest(again) == result.digest
    again.chains[-1].rules.pop()
    assert live.ruleset_digest(again) != result.digest
