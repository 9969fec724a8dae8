"""Every command meets a user mistake (a missing file, a directory, an unwritable output)
with one line on stderr and exit status 2, never a traceback (issue 13, defect 9)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from seng_fw.cli import main, version
from seng_fw.ops.control import ControlClient, ControlPermissionDenied
from seng_fw.system import cli_toolkit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "policies/example.yaml")
HEX = "ab" * 32


def _bad_path_commands(tmp: Path) -> dict[str, list[str]]:
    missing = str(tmp / "missing")
    directory = str(tmp)
    under_file = str(ROOT / "README.md" / "x")  # a path through a regular file
    return {
        "check missing": ["check", missing],
        "compile missing": ["compile", missing],
        "compile -o into a missing directory": ["compile", EXAMPLE, "-o", "/nonexistent/x.nft"],
        "compile -o a directory": ["compile", EXAMPLE, "-o", directory],
        "compile --format json -o a directory": [
            "compile", EXAMPLE, "--format", "json", "-o", directory,
        ],
        "diff missing": ["diff", missing],
        "apply missing": ["apply", missing],
        "import-db missing": ["import-db", missing],
        "import-db a directory": ["import-db", directory],
        "attest verify missing": ["attest", "verify", missing, "--root", EXAMPLE],
        "attest verify a directory": ["attest", "verify", directory, "--root", EXAMPLE],
        "attest verify missing root": ["attest", "verify", EXAMPLE, "--root", missing],
        "attest verify-report missing": [
            "attest", "verify-report", "--report", missing, "--signature", missing,
            "--signing-cert", missing, "--root", missing,
        ],
        "attest verify-quote missing": [
            "attest", "verify-quote", missing, "--root", missing, "--collateral", missing,
        ],
        "attest fetch-collateral missing quote": [
            "attest", "fetch-collateral", "--pccs", "https://127.0.0.1:1", "--quote", missing,
            "--out", str(tmp / "c.json"),
        ],
        "serve missing config": ["serve", "--config", missing],
        "serve config is a directory": ["serve", "--config", directory],
        "status missing config": ["status", "--config", missing],
        "enclaves missing config": ["enclaves", "--config", missing],
        "reload config is a directory": ["reload", "--config", directory],
        "revoke missing config": ["revoke", "--app", "x", "--config", missing],
        "init missing policy": ["init", "--dir", str(tmp / "etc"), "--policy", missing],
        "init missing root": ["init", "--dir", str(tmp / "etc"), "--root", missing],
        "init unwritable dir": ["init", "--dir", under_file],
        "install-units missing source": ["install-units", "--source", missing, "--root", directory],
        "lab ca init unwritable": ["lab", "ca", "init", under_file],
        "lab ca collateral missing ca": [
            "lab", "ca", "collateral", "--ca", missing, "--out", missing,
        ],
        "lab ca revoke-pck missing": ["lab", "ca", "revoke-pck", "--ca", missing, missing],
        "lab enclave-cert missing ca": [
            "lab", "enclave-cert", "--ca", missing, "--mrenclave", HEX, "--mrsigner", HEX,
            "--out", str(tmp / "out"),
        ],
        "lab enclave missing cert": [
            "lab", "enclave", "--server", "127.0.0.1:1", "--server-cert", missing,
            "--cert", missing, "--key", missing,
        ],
    }  # fmt: skip


@pytest.mark.parametrize("name", sorted(_bad_path_commands(Path("/tmp"))))
def test_bad_path_is_one_line_and_exit_2(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _bad_path_commands(tmp_path)[name]
    assert main(argv) == 2, name
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("seng-fw: ")
    assert "Traceback" not in captured.err and "Errno" not in captured.err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("apps: []\n")
    policy.chmod(0)
    assert main(["check", str(policy)]) == 2
    assert capsys.readouterr().err == f"seng-fw: cannot read {policy}: permission denied\n"


def test_compile_output_messages_name_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compile", EXAMPLE, "-o", "/nonexistent/x.nft"]) == 2
    assert capsys.readouterr().err == (
        "seng-fw: cannot write /nonexistent/x.nft: no such file or directory\n"
    )
    assert main(["compile", EXAMPLE, "-o", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"seng-fw: cannot write {tmp_path}: is a directory\n"


def test_read_input_dash_is_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"data")))
    assert cli_toolkit.read_input("-") == b"data"


def test_iso_time_defaults_to_utc() -> None:
    assert cli_toolkit.iso_time("2026-01-02T03:04:05").isoformat() == "2026-01-02T03:04:05+00:00"
    with pytest.raises(Exception, match="not an ISO-8601 time"):
        cli_toolkit.iso_time("yesterday")


def test_no_gateway_is_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--socket", str(tmp_path / "control.sock")]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no gateway is listening" in err


def test_failure_under_json_is_a_document_on_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    assert main(["status", "--socket", str(tmp_path / "control.sock"), "--json"]) == 3
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert document.keys() == {"schema", "command", "ok", "error", "result"}
    assert document["ok"] is False and document["command"] == "status"
    assert document["error"]["code"] == "no_gateway" and document["result"] is None
    assert captured.err.count("\n") == 1
    assert main(["enclaves", "--config", str(tmp_path / "missing"), "--json"]) == 2
    document = json.loads(capsys.readouterr().out)
    assert document["error"]["code"] == "invalid_configuration"


def test_permission_denied_is_not_no_gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gateway may be running behind a socket this user may not open: its own message
    and exit 2, not "no gateway" (3). Root passes file permissions, so connect() is made
    to fail as it does for other users."""

    def denied(self: socket.socket, address: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", denied)
    with pytest.raises(ControlPermissionDenied):
        ControlClient(tmp_path / "control.sock").request("status")
    assert main(["status", "--socket", str(tmp_path / "control.sock")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "permission denied on" in err
    assert "no gateway" not in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"seng-fw {version()}\n"
    assert version() != "unknown"


def test_every_command_and_option_has_a_description() -> None:
    import argparse

    from seng_fw.cli import build_parser

    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {choice.dest: choice.help for choice in action._choices_actions}
                for name, sub in action.choices.items():
                    if not helps.get(name):
                        missing.append(f"{path} {name}")
                    walk(sub, f"{path} {name}")
            elif not action.help:
                missing.append(f"{path} {action.option_strings or action.dest}")

    walk(build_parser(), "seng-fw")
    assert missing == []


def test_init_listen_error_names_the_listen_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", "--dir", str(tmp_path), "--listen", "10.0.0.1"]) == 2
    err = capsys.readouterr().err
    assert "--listen (the tunnel address)" in err and "10.0.0.1:12345" in err
    assert "9108" not in err
    assert main(["init", "--dir", str(tmp_path), "--metrics", "x"]) == 2
    assert "--metrics: expected ADDRESS:PORT, e.g. 127.0.0.1:9108" in capsys.readouterr().err


def test_install_units_prefix_and_its_old_name(tmp_path: Path) -> None:
    from seng_fw.cli import build_parser

    for option in ("--prefix", "--root"):
        args = build_parser().parse_args(["install-units", option, str(tmp_path)])
        assert args.prefix == tmp_path
    assert build_parser().parse_args(["install-units"]).prefix == Path("/")
    assert (
        "--root"
        not in build_parser()
        ._subparsers._group_actions[0]
        .choices[  # type: ignore[union-attr]
            "install-units"
        ]
        .format_help()
    )
