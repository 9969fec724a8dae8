"""Issue 13 defect 3: shared-subnet apps under `mode: per_app` were admitted, leased an
address, and then every packet of theirs was dropped (no labeller marks the shared
subnet). The gateway now refuses to start, a reload refuses such a policy, and `init
--policy` picks the mode the policy needs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from seng_fw.cli import main
from seng_fw.gateway.config import load_gateway_config, mode_problem, shared_subnet_apps
from seng_fw.ops.serve import build_server, checked_policy
from seng_fw.policy.loader import load_policy
from seng_fw.policy.yamlfile import ConfigError
from seng_fw.system.cli_toolkit import CliError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "policies/example.yaml"  # batch-worker and report-builder: shared subnet
DEMO = ROOT / "policies/lab/demo.yaml"  # every app has its own subnet


def _config(tmp_path: Path, mode: str, policy: Path = EXAMPLE) -> Path:
    shutil.copyfile(policy, tmp_path / "policy.yaml")
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "tls: {certificate: server.pem, key: server.key}\n"
        "attestation: {roots: [root.pem]}\n"
        f"policy: policy.yaml\nmode: {mode}\n"
    )
    return path


def test_the_problem_names_the_shared_subnet_apps() -> None:
    policy = load_policy(EXAMPLE)
    assert shared_subnet_apps(policy) == ["batch-worker", "report-builder"]
    problem = mode_problem("per_app", policy)
    assert problem is not None
    assert "batch-worker, report-builder" in problem and "mode: shared" in problem
    assert mode_problem("shared", policy) is None
    assert mode_problem("per_app", load_policy(DEMO)) is None


def test_gateway_refuses_to_start(tmp_path: Path) -> None:
    """build_server checks before it binds a socket or creates the TUN device."""
    config = load_gateway_config(_config(tmp_path, "per_app"))
    with pytest.raises(CliError) as refused:
        build_server(config)
    assert "batch-worker, report-builder" in refused.value.message


def test_serve_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--config", str(_config(tmp_path, "per_app"))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "batch-worker, report-builder" in err


def test_a_reload_refuses_such_a_policy(tmp_path: Path) -> None:
    config = load_gateway_config(_config(tmp_path, "per_app", DEMO))
    assert len(checked_policy(config).apps) == 2
    shutil.copyfile(EXAMPLE, tmp_path / "policy.yaml")
    with pytest.raises(ConfigError, match="batch-worker, report-builder"):
        checked_policy(config)


def test_init_picks_the_mode_the_policy_needs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", "--dir", str(tmp_path / "a"), "--policy", str(EXAMPLE)]) == 0
    assert "\nmode: shared\n" in (tmp_path / "a/gateway.yaml").read_text()
    assert "mode shared" in capsys.readouterr().out  # says why
    assert main(["init", "--dir", str(tmp_path / "b"), "--policy", str(DEMO)]) == 0
    assert "\nmode: per_app\n" in (tmp_path / "b/gateway.yaml").read_text()
    capsys.readouterr()
    argv = ["init", "--dir", str(tmp_path / "c"), "--policy", str(EXAMPLE), "--mode", "per_app"]
    assert main(argv) == 2
    assert "batch-worker, report-builder" in capsys.readouterr().err
    assert not (tmp_path / "c/gateway.yaml").exists()
