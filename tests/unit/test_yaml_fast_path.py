"""The fast YAML path (libyaml events, no line marks) gives exactly the data of the careful
path (node tree with the line of every value), or leaves the document to it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from seng_fw.policy import yamlfile
from seng_fw.policy.loader import load_policy
from seng_fw.policy.yamlfile import ConfigError, load_yaml

ROOT = Path(__file__).resolve().parents[2]


def careful(text: str) -> object:
    node = yaml.compose(text, Loader=yamlfile._LOADER)
    if node is None:
        return {}
    doc = yamlfile.YamlDocument("x", {}, {(): 1})
    issues: list[yamlfile.ConfigIssue] = []
    data = yamlfile._convert(node, (), doc, issues, yaml.constructor.SafeConstructor())
    return yamlfile._SLOW if issues else data


SAME = [
    "",
    "# only a comment\n",
    "---\n",
    "a: 1\nb: [1, 2, '3', 0x10, 010, 1_000, -5, 0b11]\n",
    "flags: [yes, no, on, off, true, False, ~, null, '']\n",
    "floats: [1.5, .inf, -.Inf, .nan, 1e3, 6.8523015e+5]\n",
    "when: [2001-12-14t21:59:43.10-05:00, 2002-12-14]\n",
    "mrenclave: 1234567890123456789012345678901234567890123456789012345678901234\n",
    "short: 12345678901234567890\n",
    "nested: {a: [{b: [[1], [2, {c: d}]]}], e: {}}\n",
    "- just\n- a list\n",
    "plain scalar document\n",
    "42\n",
    "1: one\n2: two\n",
    'quoted: ["1", "true", "null", "1.5"]\n',
    "multi: |\n  line one\n  line two\nfolded: >\n  a\n  b\n",
]
LEFT_TO_CAREFUL_PATH = [
    "a: 1\na: 2\n",  # duplicate key
    "a: !!int 0x\n",  # explicit tag, bad value
    "a: !!str 1\n",  # explicit tag
    "a: &x [1]\nb: *x\n",  # anchor and alias
    "<<: {a: 1}\n",  # merge key
    "? [a]\n: 1\n",  # a key that is not a scalar
    "null: 1\n",  # a key that is not a string
    "a: 1\n---\nb: 2\n",  # two documents
    "a: [1, 2\n",  # syntax error
    "a: =\n",  # the 'value' tag
    "a: " + "[" * 150 + "]" * 150 + "\n",  # deep: the careful path says whether too deep
]


@pytest.mark.parametrize("text", SAME)
def test_fast_path_gives_the_careful_paths_data(text: str) -> None:
    fast = yamlfile._fast_load(text)
    assert fast is not yamlfile._SLOW
    assert fast == careful(text)
    assert repr(fast) == repr(careful(text))  # (types too: 1 and True, nan)


@pytest.mark.parametrize("text", LEFT_TO_CAREFUL_PATH)
def test_unusual_documents_take_the_careful_path(text: str) -> None:
    assert yamlfile._fast_load(text) is yamlfile._SLOW


def test_lines_are_found_when_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("apps:\n  - name: a\n    egress:\n      - to: 10.0.0.1\n")
    doc = load_yaml(path)
    assert doc._lines is None  # none kept until an error needs them
    assert doc.line_of(("apps", 0, "egress", 0, "to")) == 4
    assert doc.issue(("apps", 0, "name"), "x").line == 2


def test_duplicate_key_still_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("apps: []\ngateway_networks: []\napps: []\n")
    with pytest.raises(ConfigError) as caught:
        load_yaml(path)
    assert [str(issue) for issue in caught.value.issues] == [f"{path}:3: apps: duplicate key"]


@pytest.mark.parametrize("name", ["policies/example.yaml", "policies/split-example"])
def test_example_policies_load_the_same_either_way(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = load_policy(ROOT / name)
    monkeypatch.setattr(yamlfile, "_fast_load", lambda text: yamlfile._SLOW)
    assert load_policy(ROOT / name) == fast
