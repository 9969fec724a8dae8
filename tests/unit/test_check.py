"""`seng-fw check`: every error of a file in one run, in an administrator's words, with
did-you-mean; `check -` reads standard input; `check --config` validates the gateway
configuration and the policy it names together, offline."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import pytest

from seng_fw.cli import main
from seng_fw.ops.servercert import generate_server_certificate

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "policies/example.yaml"
DEMO = ROOT / "policies/lab/demo.yaml"
IAS_ROOT = ROOT / "tests/fixtures/attest/intel-ias-root-ca.pem"
PYDANTIC_PHRASES = ("Value error,", "Input should be", "Field required", "Extra inputs", "^[")

MISTAKES = """\
apps:
  - name: webapp
    mrenclave: [zz]
    min_isvsvn: 1
    hosts: 10.0.0.0/33
    allow_debug: maybe
    egress:
      - to: {app: sdk-nginx}
        proto: tcp
  - name: Web App
    mrenclave: ['%s']
    hosts: [10.0.0.0/8]
    subnet: 5
""" % ("ab" * 32)


def _check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_every_error_in_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(MISTAKES)
    code, _, err = _check(capsys, str(policy))
    assert code == 1
    lines = err.splitlines()
    for phrase in PYDANTIC_PHRASES:
        assert phrase not in err, (phrase, err)
    expected = [
        f"{policy}:3: apps[0].mrenclave[0]: must be 64 hex digits (32 bytes), got 'zz'",
        f"{policy}:4: apps[0].min_isvsvn: unknown key 'min_isvsvn' (did you mean 'min_isv_svn'?)",
        f"{policy}:5: apps[0].hosts[0]: ",
        f"{policy}:6: apps[0].allow_debug: must be true or false, got 'maybe'",
        f"{policy}:9: apps[0].egress[0].proto: unknown key 'proto' (did you mean 'protocol'?)",
        f"{policy}:8: apps[0].egress[0].protocol: missing: this key is required",
        f"{policy}:10: apps[1].name: 'Web App' is not valid: a name is a lower-case letter",
        f"{policy}:13: apps[1].subnet: must be a mapping (key: value), got 5",
    ]
    for start in expected:
        assert any(line.startswith(start) for line in lines), (start, err)
    assert lines[-1] == f"seng-fw: {len(lines) - 1} error(s) in {policy}"


def test_misspelled_app_and_category(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = EXAMPLE.read_text().replace("{app: sdk-nginx}", "{app: sdk-ngnix}")
    bad = bad.replace("categories: [dns]\n    ingress", "categories: [dsn]\n    ingress")
    policy = tmp_path / "p.yaml"
    policy.write_text(bad)
    code, _, err = _check(capsys, str(policy))
    assert code == 1
    assert "unknown app 'sdk-ngnix' (did you mean 'sdk-nginx'?)" in err
    assert "unknown category 'dsn' (did you mean 'dns'?)" in err


def test_check_reads_standard_input(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(EXAMPLE.read_bytes())))
    assert _check(capsys, "-")[:2] == (0, "-: ok (4 apps, 2 categories)\n")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(MISTAKES.encode())))
    code, _, err = _check(capsys, "-")
    assert code == 1 and "<stdin>:4: apps[0].min_isvsvn: unknown key" in err


def _gateway(tmp_path: Path, mode: str = "per_app", policy: Path = DEMO, extra: str = "") -> Path:
    cert, key = generate_server_certificate("test gateway")
    (tmp_path / "server.pem").write_bytes(cert)
    (tmp_path / "server.key").write_bytes(key)
    shutil.copyfile(IAS_ROOT, tmp_path / "root.pem")
    shutil.copyfile(policy, tmp_path / "policy.yaml")
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "listen: {address: 10.0.0.1, port: 12345}\n"
        "tls: {certificate: server.pem, key: server.key}\n"
        "attestation: {roots: [root.pem]}\n"
        f"policy: policy.yaml\nmode: {mode}\n{extra}"
    )
    return config


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _gateway(tmp_path)
    code, out, err = _check(capsys, "--config", str(config))
    assert (code, err) == (0, "")
    assert f"{tmp_path / 'policy.yaml'}: ok (2 apps" in out
    assert f"{config}: ok (mode per_app, listen 10.0.0.1:12345" in out


def test_check_config_reports_both_files_in_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _gateway(tmp_path, extra="timeouts: {idle: -1, pairng: 3}\n")
    (tmp_path / "policy.yaml").write_text(MISTAKES)
    (tmp_path / "server.key").write_text("not a key\n")
    code, _, err = _check(capsys, "--config", str(config))
    assert code == 1
    assert f"{config}:6: timeouts.pairng: unknown key 'pairng' (did you mean 'pairing'?)" in err
    assert f"{config}:6: timeouts.idle: must be " in err
    assert f"{tmp_path / 'policy.yaml'}:4: apps[0].min_isvsvn: unknown key" in err
    for phrase in PYDANTIC_PHRASES:
        assert phrase not in err, (phrase, err)


def test_check_config_refuses_shared_apps_under_per_app(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _gateway(tmp_path, "per_app", EXAMPLE)
    code, _, err = _check(capsys, "--config", str(config))
    assert code == 1
    assert f"{config}:5: mode: mode per_app, but apps batch-worker, report-builder" in err
    config = _gateway(tmp_path, "shared", EXAMPLE)
    assert _check(capsys, "--config", str(config))[0] == 0


def test_check_config_names_unloadable_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _gateway(tmp_path)
    (tmp_path / "root.pem").write_text("garbage\n")
    (tmp_path / "server.pem").unlink()
    code, _, err = _check(capsys, "--config", str(config))
    assert code == 1
    assert f"{config}:2: tls: {tmp_path / 'server.pem'}: no such file or directory" in err
    assert f"{config}:3: attestation: " in err


def test_check_needs_something(capsys: pytest.CaptureFixture[str]) -> None:
    assert _check(capsys)[0] == 2
