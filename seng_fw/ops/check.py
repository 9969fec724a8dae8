"""`seng-fw check POLICY | - | --config gateway.yaml`: validate offline, like `nginx -t`.

With `--config`, the gateway configuration and the policy it names are checked together:
every field of both files, the files it points at (server key and certificate, trust
anchors, DCAP collateral), and whether the policy can run in the configured mode. Every
error of every file is reported in one run. Exit 0 valid, 1 invalid, 2 unreadable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seng_fw.policy.loader import load_policy, load_policy_text
from seng_fw.policy.models import Policy
from seng_fw.policy.yamlfile import ConfigError, ConfigIssue, load_yaml
from seng_fw.system.cli_toolkit import (
    EXIT_OK,
    STDIN,
    CliError,
    Refused,
    UsageError,
    check_readable,
    error_text,
    read_text_input,
)

if TYPE_CHECKING:
    from seng_fw.gateway.config import GatewayConfig

# The gateway configuration's modules (and what they import: the attestation, tunnel and
# label code) are imported only by `check --config`: a policy check does without them.


def register(sub: argparse._SubParsersAction[Any]) -> None:
    check = sub.add_parser(
        "check",
        help="validate a policy, or a gateway configuration and its policy, offline",
        description="Validate a policy (a file, a directory of *.yaml parts, or - for "
        "standard input) and report every error with file, line and field. With --config, "
        "check the gateway configuration, the files it names and its policy together.",
    )
    check.add_argument(
        "policy",
        nargs="?",
        metavar="POLICY",
        help="policy file, directory of *.yaml files, or - (standard input); "
        "default with --config: the policy it names",
    )
    check.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="also check this gateway configuration (gateway.yaml) and what it names",
    )
    check.set_defaults(func=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    if args.policy is None and args.config is None:
        raise UsageError("check: give a POLICY (or -) or --config FILE")
    issues: list[ConfigIssue] = []
    config: GatewayConfig | None = None
    if args.config is not None:
        from seng_fw.gateway.config import load_gateway_config

        check_readable(args.config)
        try:
            config = load_gateway_config(args.config)
        except ConfigError as exc:
            issues += exc.issues
    policy_source: str | None = args.policy
    if policy_source is None and args.config is not None:
        policy_source = _policy_named_by(args.config, config)
    policy = None
    if policy_source is not None:
        policy, policy_issues = _check_policy(policy_source)
        issues += policy_issues
    if config is not None:
        from seng_fw.gateway.config import mode_problem

        issues += _check_config_files(config, str(args.config))
        if policy is not None and (problem := mode_problem(config.mode, policy)) is not None:
            line = _line_of(args.config, "mode")
            issues.append(ConfigIssue(str(args.config), line, "mode", problem))
    if issues:
        for issue in issues:
            print(issue, file=sys.stderr)
        files = sorted({issue.file for issue in issues})
        raise Refused(f"{len(issues)} error(s) in {', '.join(files)}")
    if policy is not None:
        print(f"{policy_source}: ok ({len(policy.apps)} apps, {len(policy.categories)} categories)")
    if config is not None:
        print(f"{args.config}: ok (mode {config.mode}, listen {config.listen.address}:"
              f"{config.listen.port}, policy {config.policy})")  # fmt: skip
    return EXIT_OK


def _policy_named_by(path: Path, config: GatewayConfig | None) -> str | None:
    """The policy of the configuration, even of one with errors elsewhere, so that one
    run reports the errors of both files."""
    if config is not None:
        return str(config.policy)
    try:
        data = load_yaml(path).data
    except ConfigError:
        return None
    named = data.get("policy") if isinstance(data, dict) else None
    if not isinstance(named, str):
        return None
    return str(path.parent / named) if not Path(named).is_absolute() else named


def _check_policy(source: str) -> tuple[Policy | None, list[ConfigIssue]]:
    try:
        if source == STDIN:
            return load_policy_text(read_text_input(STDIN), "<stdin>"), []
        check_readable(source, directory_ok=True)
        return load_policy(Path(source)), []
    except ConfigError as exc:
        return None, exc.issues


def _check_config_files(config: GatewayConfig, name: str) -> list[ConfigIssue]:
    """The files the configuration names exist and load, as `serve` would load them."""
    from seng_fw.ops.serve import build_verifier  # serve's own loading, not a copy
    from seng_fw.tunnel.dtls import make_server_config

    issues = []
    try:
        make_server_config(
            Path(config.tls.certificate).read_bytes(), Path(config.tls.key).read_bytes()
        )
    except (OSError, ValueError) as exc:
        issues.append(ConfigIssue(name, _line_of(Path(name), "tls"), "tls", error_text(exc)))
    try:
        build_verifier(config)
    except CliError as exc:
        where = _line_of(Path(name), "attestation")
        issues.append(ConfigIssue(name, where, "attestation", exc.message))
    return issues


def _line_of(path: Path, key: str) -> int:
    """The line of a top-level key of a YAML file (1 if not found)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return 1
    return next((i + 1 for i, line in enumerate(lines) if line.startswith(f"{key}:")), 1)
