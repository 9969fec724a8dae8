"""Load a policy from a file or a directory of files, validating it completely; every error
names file, line and field.

In a directory, every `*.yaml` / `*.yml` file (not subdirectories) is one part of the
policy: apps and categories add up, and each of the top-level settings
(`gateway_networks`, `shared_subnet`, `defaults`) may be set by one file only.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml

from seng_fw.policy.models import Policy, cross_check
from seng_fw.policy.yamlfile import (
    ConfigError,
    ConfigIssue,
    Path_,
    YamlDocument,
    load_yaml,
    validation_issues,
)

SETTINGS = ("gateway_networks", "shared_subnet", "defaults")


def policy_files(path: Path) -> list[Path]:
    """The files that make up the policy at `path` (a file or a directory)."""
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    if not files:
        raise ConfigError([ConfigIssue(str(path), 1, "", "no *.yaml files in this directory")])
    return files


@dataclass
class _Origins:
    """Where each part of the merged policy came from, to map its paths back to files."""

    first: YamlDocument
    apps: list[tuple[YamlDocument, int]] = field(default_factory=list)
    categories: dict[str, YamlDocument] = field(default_factory=dict)
    settings: dict[str, YamlDocument] = field(default_factory=dict)

    def locate(self, path: Path_) -> tuple[YamlDocument, Path_]:
        head = path[0] if path else ""
        if head == "apps" and len(path) > 1 and isinstance(path[1], int):
            doc, local = self.apps[path[1]]
            return doc, ("apps", local, *path[2:])
        if head == "categories" and len(path) > 1 and path[1] in self.categories:
            return self.categories[str(path[1])], path
        if isinstance(head, str) and head in self.settings:
            return self.settings[head], path
        return self.first, path

    def issue(self, path: Path_, message: str) -> ConfigIssue:
        doc, local = self.locate(path)
        return doc.issue(local, message)

    def describe(self, path: Path_) -> str:
        issue = self.issue(path, "")
        return f"{issue.file}:{issue.line}"


def load_policy(path: Path) -> Policy:
    """Load and validate a policy (file or directory). Raises ConfigError listing every
    problem found."""
    # The cyclic collector would scan the growing YAML and model trees again and again
    # (millions of objects for 10,000 apps, none in a cycle that matters here).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _load_policy(path)
    finally:
        if enabled:
            gc.enable()


def _load_policy(path: Path) -> Policy:
    return _validate([load_yaml(file) for file in policy_files(path)], path)


def load_policy_text(text: str, name: str = "<stdin>") -> Policy:
    """A policy given as text (`seng-fw check -`); errors name `name`."""
    return _validate([load_yaml(Path(name), text)], Path(name))


def _validate(docs: list[YamlDocument], path: Path) -> Policy:
    issues: list[ConfigIssue] = []
    parts: list[tuple[YamlDocument, Policy]] = []
    for doc in docs:
        data: Any = doc.data if doc.data is not None else {}
        try:
            parts.append((doc, Policy.model_validate(data)))
        except pydantic.ValidationError as exc:
            _point_at_keys(doc)
            issues += validation_issues(doc, exc, model=Policy)
    issues += _missing_apps(docs, path)
    if issues:
        raise ConfigError(issues)
    policy, origins, merge_issues = _merge(parts)
    problems = cross_check(policy, origins.describe)
    if merge_issues or problems:
        for doc in docs:
            _point_at_keys(doc)
        policy, origins, merge_issues = _merge(parts)  # again, with the keys' lines
        issues = merge_issues + [origins.issue(where, msg) for where, msg in problems]
        raise ConfigError(issues)
    return policy


def _missing_apps(docs: list[YamlDocument], path: Path) -> list[ConfigIssue]:
    """An empty file, or a policy without `apps`, is refused: it is more likely truncated
    or the wrong file than meant, and applying it would refuse every enclave. A policy
    without apps says so: `apps: []`."""
    issues = [
        ConfigIssue(doc.file, 1, "", "the file is empty (a policy without apps says `apps: []`)")
        for doc in docs
        if doc.data is None or doc.data == {}
    ]
    if issues or not all(isinstance(doc.data, dict) for doc in docs):
        return issues  # (a file that is not a mapping: pydantic says so)
    if any("apps" in doc.data for doc in docs):
        return []
    where = f" from every file in {path}" if path.is_dir() else ""
    message = f"missing{where}: the policy names no apps (a policy without apps says `apps: []`)"
    return [ConfigIssue(docs[0].file, 1, "apps", message)]


def _point_at_keys(doc: YamlDocument) -> None:
    """Make a field's line the line of its key (`egress:`), not of its value, which for a
    block list or mapping is the next line. Only done when there are errors to report:
    it parses the file a second time."""
    try:
        text = doc.text if doc.text is not None else Path(doc.file).read_text(encoding="utf-8")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return
    stack: list[tuple[yaml.Node, Path_]] = [(root, ())] if root is not None else []
    while stack:
        node, path = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = (*path, str(key_node.value))
                doc.lines[child] = key_node.start_mark.line + 1
                stack.append((value_node, child))
        elif isinstance(node, yaml.SequenceNode):
            stack += [(item, (*path, index)) for index, item in enumerate(node.value)]


def _merge(
    parts: list[tuple[YamlDocument, Policy]],
) -> tuple[Policy, _Origins, list[ConfigIssue]]:
    origins = _Origins(parts[0][0])
    if len(parts) == 1:  # one file: nothing to merge (and no second validation)
        doc, part = parts[0]
        origins.apps = [(doc, index) for index in range(len(part.apps))]
        origins.categories = dict.fromkeys(part.categories, doc)
        data = doc.data if isinstance(doc.data, dict) else {}
        origins.settings = {key: doc for key in SETTINGS if key in data}
        return part, origins, []
    issues: list[ConfigIssue] = []
    merged: dict[str, Any] = {"apps": [], "categories": {}}
    for doc, part in parts:
        data = doc.data if isinstance(doc.data, dict) else {}
        for key in SETTINGS:
            if key not in data:
                continue
            if key in origins.settings:
                first = origins.settings[key]
                issues.append(
                    doc.issue((key,), f"already set in {first.file}:{first.line_of((key,))}")
                )
                continue
            origins.settings[key] = doc
            merged[key] = getattr(part, key)
        for name, category in part.categories.items():
            if name in origins.categories:
                first = origins.categories[name]
                where = f"{first.file}:{first.line_of(('categories', name))}"
                message = f"duplicate category {name!r} (also at {where})"
                issues.append(doc.issue(("categories", name), message))
                continue
            origins.categories[name] = doc
            merged["categories"][name] = category
        for index, app in enumerate(part.apps):
            origins.apps.append((doc, index))
            merged["apps"].append(app)
    return Policy.model_validate(merged), origins, issues
