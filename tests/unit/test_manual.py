"""`seng-fw completion` and `seng-fw man`: generated from the parser, so they must cover
every command and option of it, and be valid bash / roff that groff renders cleanly."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from seng_fw.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser, path: str = "seng-fw") -> dict[str, list[str]]:
    """Every command path ("seng-fw lab ca") with the option strings it documents."""
    found: dict[str, list[str]] = {}
    options: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_commands(sub, f"{path} {name}"))
        elif action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction):
            options.extend(action.option_strings)
    found[path] = options
    return found


def _output(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def test_bash_completion_is_valid_and_completes_every_command(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    script = tmp_path / "seng-fw.bash"
    script.write_text(_output(capsys, "completion", "bash"))
    subprocess.run(["bash", "-n", str(script)], check=True)
    top = sorted(p.split()[1] for p in _commands(build_parser()) if p.count(" ") == 1)
    assert {"serve", "apply", "lab", "completion", "man"} <= set(top)

    def complete(*words: str) -> list[str]:
        # What bash-completion does on TAB: COMP_WORDS/COMP_CWORD in, COMPREPLY out.
        quoted = " ".join(shlex.quote(word) for word in words)
        program = (
            f"source {script}; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; "
            f"COMP_LINE={shlex.quote(' '.join(words))}; COMP_POINT=${{#COMP_LINE}}; "
            f"_shtab_seng_fw seng-fw {shlex.quote(words[-1])} {shlex.quote(words[-2])}; "
            'printf "%s\\n" "${COMPREPLY[@]}"'
        )
        out = subprocess.run(["bash", "-c", program], check=True, capture_output=True, text=True)
        return sorted(w.strip() for w in out.stdout.split())

    assert set(top) <= set(complete("seng-fw", ""))
    assert complete("seng-fw", "compl") == ["completion"]
    assert complete("seng-fw", "completion", "") == ["bash", "zsh"]
    assert "--config" in complete("seng-fw", "check", "--c")


def test_zsh_completion_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    script = _output(capsys, "completion", "zsh")
    assert script.startswith("#compdef seng-fw")
    for path in _commands(build_parser()):
        assert path.split()[-1] in script, path


def test_completion_of_an_unknown_shell_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["completion", "fish"])
    assert exit_.value.code == 2


def test_man_page_mentions_every_command_and_option(capsys: pytest.CaptureFixture[str]) -> None:
    roff = _output(capsys, "man")
    assert roff.startswith('.TH SENG\\-FW "8"')
    text = re.sub(r"\\f[BIRP]|\\[,/&]", "", roff).replace("\\-", "-")
    missing = []
    for path, options in _commands(build_parser()).items():
        if path != "seng-fw" and f".SS {path}\n" not in text:
            missing.append(path)
        missing += [f"{path} {option}" for option in options if option not in text]
    assert missing == []
    assert ".SH\nCOMMANDS\n" in text and ".SH EXIT STATUS" in text
    assert "no gateway answering" in text


def test_man_page_renders_without_warnings(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    page = tmp_path / "seng-fw.8"
    page.write_text(_output(capsys, "man"))
    env = {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "80"}
    groff = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True
    )
    assert (groff.returncode, groff.stderr) == (0, "")
    man = subprocess.run(
        ["man", "--warnings", "-l", str(page)], capture_output=True, text=True, env=env
    )
    assert (man.returncode, man.stderr) == (0, "")
    assert "seng-fw lab enclave-cert" in man.stdout.replace("\u2010", "-").replace("\u2212", "-")
    assert "\nCOMMANDS\n" in man.stdout and "EXIT STATUS" in man.stdout


def test_make_install_docs_installs_the_page_and_the_completions(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    checkout = Path(__file__).resolve().parents[2]
    seng_fw = Path(sys.executable).with_name("seng-fw")
    dirs = {
        "MANDIR": tmp_path / "man",
        "BASHCOMPDIR": tmp_path / "bash",
        "ZSHCOMPDIR": tmp_path / "zsh",
    }
    assignments = [f"{key}={value}" for key, value in dirs.items()]
    subprocess.run(
        ["make", "-s", "-C", str(checkout), "install-docs", f"SENG_FW={seng_fw}", *assignments],
        check=True,
    )
    assert (dirs["BASHCOMPDIR"] / "seng-fw").read_text() == _output(capsys, "completion", "bash")
    assert (dirs["ZSHCOMPDIR"] / "_seng-fw").read_text() == _output(capsys, "completion", "zsh")
    env = {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "80"}
    man = subprocess.run(
        ["man", "--warnings", "-M", str(dirs["MANDIR"]), "8", "seng-fw"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert (man.returncode, man.stderr) == (0, "")
    assert "SENG-FW(8)" in man.stdout
