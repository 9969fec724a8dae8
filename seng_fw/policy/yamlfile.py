"""YAML files validated by pydantic models, with errors that name file, line and field.

PyYAML's composer keeps the position of every node; we convert the node tree ourselves
(instead of `yaml.safe_load`) so that each value's line is remembered, and so that
duplicate mapping keys, which `safe_load` silently overwrites, are reported.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from seng_fw.system.cli_toolkit import os_error_text

Path_ = tuple[str | int, ...]
ModelT = TypeVar("ModelT", bound=pydantic.BaseModel)
# libyaml's composer when PyYAML was built with it (Debian's and PyPI's wheels are):
# several times faster on large policies, same nodes and marks.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class ConfigIssue:
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class ConfigError(Exception):
    """One or more problems in configuration files; each names file, line and field."""

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))


@dataclass
class YamlDocument:
    file: str
    data: Any
    lines: dict[Path_, int]

    def line_of(self, path: Path_) -> int:
        """Line of the deepest node on `path` that exists (1-based)."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return 1

    def issue(self, path: Path_, message: str) -> ConfigIssue:
        return ConfigIssue(self.file, self.line_of(path), format_path(path), message)


def format_path(path: Path_) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _convert(
    node: yaml.Node,
    path: Path_,
    doc: YamlDocument,
    issues: list[ConfigIssue],
    scalars: yaml.constructor.SafeConstructor,
) -> Any:
    doc.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _convert(key_node, (*path, "<key>"), doc, issues, scalars)
            if not isinstance(key, str | int):
                issues.append(doc.issue(path, f"mapping key {key!r} is not a string"))
                continue
            child = (*path, str(key))
            if key in result:
                doc.lines[child] = key_node.start_mark.line + 1
                issues.append(doc.issue(child, "duplicate key"))
                continue
            result[key] = _convert(value_node, child, doc, issues, scalars)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [
            _convert(item, (*path, i), doc, issues, scalars) for i, item in enumerate(node.value)
        ]
    # Scalars: PyYAML's safe constructor resolves the tag (int, bool, null, str, ...).
    value = scalars.construct_object(node, deep=True)
    if isinstance(value, int) and not isinstance(value, bool) and len(node.value) > 20:
        # A 64-digit MRENCLAVE made only of decimal digits would become a (lossy) int;
        # no integer setting is that long, so keep the text.
        return node.value
    return value


def load_yaml(path: Path) -> YamlDocument:
    """Parse one YAML file, remembering the line of every value. Raises ConfigError."""
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        reason = os_error_text(name, exc).removeprefix(f"{name}: ")
        raise ConfigError([ConfigIssue(name, 1, "", f"cannot read: {reason}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue(name, 1, "", "cannot read: not UTF-8 text")]) from None
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise ConfigError([ConfigIssue(name, line, "", f"invalid YAML: {exc}")]) from exc
    doc = YamlDocument(name, {}, {(): 1})
    if node is None:
        return doc
    issues: list[ConfigIssue] = []
    # A constructor per file: it keeps every node it constructed (a module-wide one kept
    # every policy's whole node tree, 400 MB for 10,000 apps, and more on each reload).
    doc.data = _convert(node, (), doc, issues, yaml.constructor.SafeConstructor())
    if issues:
        raise ConfigError(issues)
    return doc


def validation_issues(
    doc: YamlDocument, error: pydantic.ValidationError, prefix: Path_ = ()
) -> list[ConfigIssue]:
    """Map pydantic's errors back to the file and line of the offending field."""
    issues = []
    for item in error.errors(include_url=False):
        # pydantic adds the union member or validator name to `loc` for some errors;
        # keep only the parts that exist in the document for line lookup and display.
        loc = (*prefix, *(part for part in item["loc"] if isinstance(part, str | int)))
        issues.append(doc.issue(loc, item["msg"]))
    return issues


def load_model(path: Path, model: type[ModelT]) -> ModelT:
    """Load `path` and validate it as `model`. Raises ConfigError naming file, line, field."""
    doc = load_yaml(path)
    try:
        return model.model_validate(doc.data)
    except pydantic.ValidationError as exc:
        raise ConfigError(validation_issues(doc, exc)) from exc
