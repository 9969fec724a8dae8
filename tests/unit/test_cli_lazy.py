"""`seng-fw COMMAND ...` imports only COMMAND's module: a policy check (also the first step
of apply and diff) does not pay for importing the gateway, the lab and the attestation
code. The table of commands must match what the modules register."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from seng_fw import cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "policies/example.yaml"


def _registered(module: str) -> list[str]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    importlib.import_module(module).register(sub)
    return list(sub.choices)


def test_every_command_is_in_the_table_with_the_module_that_registers_it() -> None:
    table = {command: module for module in cli._COMMAND_MODULES for command in _registered(module)}
    assert table == cli._MODULE_OF_COMMAND


@pytest.mark.parametrize(
    ("argv", "modules"),
    [
        (["check", "x.yaml"], ("seng_fw.ops.check",)),
        (["-vv", "apply", "x.yaml"], ("seng_fw.compile.cli",)),
        (["--verbose", "diff", "x.yaml"], ("seng_fw.compile.cli",)),
        (["status"], ("seng_fw.ops.cli",)),
    ],
)
def test_a_command_line_needs_its_command_module_only(
    argv: list[str], modules: tuple[str, ...]
) -> None:
    assert cli.command_modules(argv) == modules


@pytest.mark.parametrize(
    "argv", [[], ["--help"], ["-h", "check"], ["man"], ["completion", "bash"], ["chek"]]
)
def test_other_command_lines_get_every_command(argv: list[str]) -> None:
    assert cli.command_modules(argv) == cli._COMMAND_MODULES


def test_check_imports_neither_gateway_nor_lab_nor_attestation() -> None:
    code = (
        "import sys\n"
        "from seng_fw.cli import main\n"
        f"assert main(['check', {str(EXAMPLE)!r}]) == 0\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('seng_fw'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    loaded = done.stdout.splitlines()[-1].split()
    assert "seng_fw.ops.check" in loaded
    for package in ("gateway", "lab", "attest", "tunnel", "label", "compile"):
        assert not [m for m in loaded if m.startswith(f"seng_fw.{package}")], package


def test_help_of_one_command_is_the_same_as_from_the_whole_tree(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv in (["check", "--help"], ["apply", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        alone = capsys.readouterr().out
        with pytest.raises(SystemExit):
            cli.run(cli.build_parser(), argv)
        assert capsys.readouterr().out == alone != ""
