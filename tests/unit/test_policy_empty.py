"""Empty or truncated policies are refused unless they say `apps: []` (issue 13, defect 5):
applying one would load a ruleset without apps and a reload would disconnect everyone."""

from __future__ import annotations

from pathlib import Path

import pytest

from seng_fw.cli import main
from seng_fw.policy.loader import load_policy
from seng_fw.policy.yamlfile import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "policies/example.yaml"


def _issues(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    return [str(issue) for issue in caught.value.issues]


@pytest.mark.parametrize("text", ["", "\n\n", "# a comment only\n", "{}\n", "---\n"])
def test_an_empty_file_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    assert _issues(path) == [f"{path}:1: the file is empty (a policy without apps says `apps: []`)"]


def test_a_policy_without_apps_is_refused(tmp_path: Path) -> None:
    # example.yaml cut off before its apps: a truncated copy
    truncated = EXAMPLE.read_text().split("\napps:")[0]
    path = tmp_path / "policy.yaml"
    path.write_text(truncated)
    assert _issues(path) == [
        f"{path}:1: apps: missing: the policy names no apps (a policy without apps says `apps: []`)"
    ]
    path.write_text(truncated + "\napps: []\n")
    assert load_policy(path).apps == []


def test_a_directory_without_apps_is_refused(tmp_path: Path) -> None:
    (tmp_path / "settings.yaml").write_text("defaults: {log_refused: true}\n")
    (tmp_path / "categories.yaml").write_text("categories: {web: {}}\n")
    (issue,) = _issues(tmp_path)
    assert f"apps: missing from every file in {tmp_path}" in issue
    (tmp_path / "apps.yaml").write_text("apps: []\n")
    assert load_policy(tmp_path).apps == []
    # an empty part is refused even when others have apps: it may be a truncated one
    (tmp_path / "apps.yaml").write_text(
        f"apps:\n  - {{name: one, mrenclave: '{'ab' * 32}', hosts: 10.77.1.0/24}}\n"
    )
    assert len(load_policy(tmp_path).apps) == 1
    (tmp_path / "more.yaml").write_text("")
    assert _issues(tmp_path) == [
        f"{tmp_path / 'more.yaml'}:1: the file is empty (a policy without apps says `apps: []`)"
    ]


def test_check_and_compile_refuse_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("")
    assert main(["check", str(path)]) == 1
    assert main(["compile", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "the file is empty" in err
    path.write_text("apps: []\n")
    assert main(["check", str(path)]) == 0
    assert "ok (0 apps" in capsys.readouterr().out
