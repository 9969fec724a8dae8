"""Load a policy file, validating it completely; every error names file, line and field."""

from __future__ import annotations

from pathlib import Path

import pydantic

from seng_fw.policy.models import Policy, cross_check
from seng_fw.yamlfile import ConfigError, load_yaml, validation_issues


def load_policy(path: Path) -> Policy:
    """Load and validate a policy. Raises ConfigError listing every problem found."""
    doc = load_yaml(path)
    try:
        policy = Policy.model_validate(doc.data if doc.data is not None else {})
    except pydantic.ValidationError as exc:
        raise ConfigError(validation_issues(doc, exc)) from exc
    problems = cross_check(policy)
    if problems:
        raise ConfigError(doc.issue(where, message) for where, message in problems)
    return policy
