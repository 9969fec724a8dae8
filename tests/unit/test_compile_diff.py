"""`seng-fw diff` without a kernel: listings compared object by object, elements sorted
numerically, a summary per app, and the command's exit status and colours."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from seng_fw.compile import cli, diff
from seng_fw.compile.diff import SHARED, compare, element_key, parse_listing

OLD = """table inet seng {
\tcounter tx_a {
\t}

\tset s {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = { 10.0.0.10, 10.0.0.2,
\t\t\t     10.0.0.3 }
\t}

\tmap tx_counters {
\t\ttype ipv4_addr : counter
\t\tflags interval
\t\telements = { 10.1.0.0/24 : "tx_a", 10.1.1.0/24 : "tx_b" }
\t}

\tset allowed_out_0 {
\t\ttype ipv4_addr . inet_proto . inet_service . ipv4_addr
\t\tflags interval
\t\telements = { 10.1.0.0/24 . tcp . 443 . 0.0.0.0/0,
\t\t\t     10.1.1.0/24 . tcp . 80 . 0.0.0.0/0 }
\t}

\tchain out_a {
\t\tip saddr . meta l4proto . th dport . ip daddr @allowed_out_0 return
\t\tdrop
\t}
}
"""


def test_parse_listing_one_element_per_item() -> None:
    objects = parse_listing(OLD)
    assert list(objects) == [
        "counter tx_a",
        "set s",
        "map tx_counters",
        "set allowed_out_0",
        "chain out_a",
    ]
    assert objects["set s"].elements == ["10.0.0.10", "10.0.0.2", "10.0.0.3"]
    assert objects["set s"].lines == ["type ipv4_addr", "flags interval"]
    assert objects["chain out_a"].lines[-1] == "drop"
    # the block lists elements one per line, in numeric order
    assert objects["set s"].block()[-5:-2] == [
        "\t\t\t10.0.0.2",
        "\t\t\t10.0.0.3",
        "\t\t\t10.0.0.10",
    ]


def test_elements_sort_numerically() -> None:
    elements = [
        "10.0.0.10 . tcp . 443",
        "10.0.0.2 . tcp . 8000-8080",
        "10.0.0.2 . tcp . 80",
        "9.255.0.0/16 . udp . 53",
        "0x0000000a . tcp . 1",
        "0x00000009/16 . tcp . 1",
    ]
    assert sorted(elements, key=element_key) == [
        "0x00000009/16 . tcp . 1",
        "0x0000000a . tcp . 1",
        "9.255.0.0/16 . udp . 53",
        "10.0.0.2 . tcp . 80",
        "10.0.0.2 . tcp . 8000-8080",
        "10.0.0.10 . tcp . 443",
    ]


def test_no_changes() -> None:
    result = compare(OLD, OLD)
    assert not result.changed and result.text() == "" and result.stat() == []


def test_changes_and_their_summary_per_app() -> None:
    new = OLD.replace("10.0.0.2,", "10.0.0.4,").replace(
        "10.1.1.0/24 . tcp . 80 . 0.0.0.0/0 }",
        "10.1.1.0/24 . tcp . 80 . 0.0.0.0/0,\n\t\t\t     10.1.1.0/24 . tcp . 8080 . 0.0.0.0/0 }",
    )
    new = new.replace("\t\tdrop\n", '\t\tlimit rate 10/minute log prefix "x"\n\t\tdrop\n')
    result = compare(OLD, new)
    assert result.changed
    lines = list(result.lines())
    assert lines[:2] == ["--- live", "+++ policy"]
    hunk = lines[lines.index("@@ set s @@") + 1 :][:2]
    assert hunk == ["-\t\t\t10.0.0.2", "+\t\t\t10.0.0.4"]
    assert "+\t\t\t10.1.1.0/24 . tcp . 8080 . 0.0.0.0/0" in lines
    assert '+\t\tlimit rate 10/minute log prefix "x"' in lines
    assert result.stat() == [("a", 1, 0, 0, 0), ("b", 0, 0, 1, 0), (SHARED, 0, 0, 1, 1)]
    # a whole table: everything is new
    assert all(line[0] in "+-@" for line in compare("", new, old_exists=False).lines())


def test_stat_lines() -> None:
    new = OLD.replace("10.0.0.3 }", "10.0.0.3, 10.0.0.5 }")
    lines = cli.stat_lines(compare(OLD, new))
    assert lines[1].split() == [
        SHARED,
        "|",
        "rules",
        "+0",
        "-0",
        "|",
        "set",
        "elements",
        "+1",
        "-0",
    ]
    assert lines[-1] == " 0 app(s) changed; rules +0 -0, set elements +1 -0"


@pytest.mark.parametrize(
    ("choice", "tty", "expected"),
    [("always", False, True), ("never", True, False), ("auto", True, True), ("auto", False, False)],
)
def test_colour_on_a_terminal_only(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    choice: str,
    tty: bool,
    expected: bool,
) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setattr("sys.stdout.isatty", lambda: tty)
    assert cli._colour_wanted(choice) is expected
    cli._show_diff(compare(OLD, OLD.replace("10.0.0.3", "10.0.0.4")), stat=False, colour=expected)
    out = capsys.readouterr().out
    assert ("\033[31m-\t\t\t10.0.0.3\033[0m" in out) is expected
    assert "-\t\t\t10.0.0.3" in out


def test_diff_exit_status(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """0 without changes, 1 with, 2 when it cannot compare."""
    example = Path(__file__).resolve().parents[2] / "policies/example.yaml"
    results = iter([compare(OLD, OLD), compare(OLD, OLD.replace("10.0.0.3", "10.0.0.4"))])
    monkeypatch.setattr(cli.live, "diff", lambda table, policy: next(results))
    args = argparse.Namespace(
        policy=example, tun="tunFA", stat=False, color="never", func=cli._cmd_diff
    )
    assert cli._cmd_diff(args) == 0
    assert cli._cmd_diff(args) == 1

    def failing(table: object, policy: object) -> diff.RulesetDiff:
        raise cli.live.NftError("Operation not permitted")

    monkeypatch.setattr(cli.live, "diff", failing)
    assert cli._cmd_diff(args) == 2
    assert cli.main(["diff", str(tmp_path / "missing.yaml")]) == 2
    (tmp_path / "bad.yaml").write_text("apps: 3\n")
    assert cli.main(["diff", str(tmp_path / "bad.yaml")]) == 2
