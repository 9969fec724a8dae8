"""`seng-fw compile | diff | apply | import-db`: the policy and its ruleset (`check`:
seng_fw/ops/check.py).

Exit status: 0 success; 1 the policy is invalid, or the kernel refused the ruleset;
2 usage error or unreadable input. `check`, `compile` and `import-db` need no
privileges; `diff` and `apply` read (and `apply` writes) the live ruleset, so they
need CAP_NET_ADMIN (root).

`apply` replaces seng-fw's table (`table inet seng`) in one transaction, then sends
SIGHUP to the gateway whose pid is in `--gateway-pid-file` (default
/run/seng-fw/gateway.pid), if that file exists: the gateway reloads its policy file
(apply the same file its configuration names), disconnects enclaves of apps that are
no longer allowed and deletes their leases' conntrack entries.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from seng_fw.compile import live
from seng_fw.compile.compiler import DEFAULT_TUN, TABLE, Options, compile_policy
from seng_fw.compile.nft import Table
from seng_fw.policy.importdb import DbImportError, DbUnreadable, import_db
from seng_fw.policy.loader import load_policy
from seng_fw.policy.models import Policy
from seng_fw.policy.yamlfile import ConfigError
from seng_fw.system.cli_toolkit import (
    EXIT_OK,
    EXIT_REFUSED,
    Refused,
    UsageError,
    check_readable,
    error_text,
    write_output,
)

EXIT_REJECTED = EXIT_REFUSED


def register(sub: argparse._SubParsersAction[Any]) -> None:
    compile_ = sub.add_parser(
        "compile",
        help="print the nftables ruleset of a policy",
        description="Print the transaction that replaces seng-fw's table: nft syntax for "
        "humans (`nft -f` loads it too) or JSON for libnftables.",
    )
    _policy_argument(compile_)
    _ruleset_arguments(compile_)
    compile_.add_argument("--format", choices=("nft", "json"), default="nft")
    compile_.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="write to FILE instead of stdout"
    )
    compile_.set_defaults(func=_cmd_compile)

    diff = sub.add_parser(
        "diff",
        help="show what apply would change in the live ruleset",
        description="Compare seng-fw's live table with the policy's (root needed).",
    )
    _policy_argument(diff)
    _ruleset_arguments(diff)
    diff.set_defaults(func=_cmd_diff)

    apply = sub.add_parser(
        "apply",
        help="load a policy's ruleset atomically and reload the gateway",
        description="Replace seng-fw's table in one transaction (all or nothing; other "
        "tables are not touched), then send SIGHUP to a running gateway.",
    )
    _policy_argument(apply)
    _ruleset_arguments(apply)
    apply.add_argument(
        "--dry-run",
        action="store_true",
        help="let the kernel check the transaction and show the diff; change nothing",
    )
    apply.add_argument(
        "--gateway-pid-file",
        type=Path,
        default=live.DEFAULT_PID_FILE,
        metavar="PATH",
        help=f"pid file of the gateway to reload (default {live.DEFAULT_PID_FILE})",
    )
    apply.set_defaults(func=_cmd_apply)

    importer = sub.add_parser(
        "import-db",
        help="convert an original SENG server database to a YAML policy",
        description="Convert a SENG database (plain or netfilter-extension schema).",
    )
    importer.add_argument("database", type=Path, metavar="SENG.db")
    importer.add_argument("-o", "--output", type=Path, metavar="FILE", help="default: stdout")
    importer.add_argument(
        "--allow-debug", action="store_true", help="admit DEBUG enclaves, as the original did"
    )
    importer.set_defaults(func=_cmd_import_db)


def _policy_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "policy", type=Path, metavar="POLICY", help="policy file, or directory of *.yaml files"
    )


def _ruleset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tun",
        default=DEFAULT_TUN,
        metavar="NAME",
        help=f"the gateway's TUN device (gateway config tun.name; default {DEFAULT_TUN})",
    )


def _load(path: Path) -> Policy | None:
    """The policy, or None after printing its errors."""
    check_readable(path, directory_ok=True)
    try:
        return load_policy(path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        print(f"{path}: {len(exc.issues)} error(s)", file=sys.stderr)
        return None


def _compiled(args: argparse.Namespace) -> tuple[Policy, Table] | None:
    policy = _load(args.policy)
    if policy is None:
        return None
    return policy, compile_policy(policy, Options(tun=args.tun, table=TABLE))


def _cmd_compile(args: argparse.Namespace) -> int:
    compiled = _compiled(args)
    if compiled is None:
        return EXIT_REJECTED
    _, table = compiled
    if args.format == "json":
        text = json.dumps(table.transaction(), indent=1) + "\n"
    else:
        text = table.text(header=(f"seng-fw ruleset for {args.policy} (seng-fw compile)",))
    write_output(args.output, text)
    return EXIT_OK


def _cmd_diff(args: argparse.Namespace) -> int:
    compiled = _compiled(args)
    if compiled is None:
        return EXIT_REJECTED
    policy, table = compiled
    try:
        text = live.diff(table, policy)
    except (live.NftError, OSError) as exc:
        raise Refused(f"diff: {error_text(exc)}") from None
    print(text if text else "no changes")
    return EXIT_OK


def _cmd_apply(args: argparse.Namespace) -> int:
    compiled = _compiled(args)
    if compiled is None:
        return EXIT_REJECTED
    policy, table = compiled
    try:
        nft = live.Nft()
        if args.dry_run:
            text = live.diff(table, policy, nft)
            live.apply(table, policy, nft, dry_run=True)
            print(text if text else "no changes")
            print("dry run: the kernel accepts the ruleset; nothing was changed")
            return EXIT_OK
        live.apply(table, policy, nft)
    except (live.NftError, OSError) as exc:
        raise Refused(f"apply: the ruleset was not changed: {error_text(exc)}") from None
    print(f"applied table inet {table.name}: {len(policy.apps)} apps")
    print(live.reload_gateway(args.gateway_pid_file))
    return EXIT_OK


def _cmd_import_db(args: argparse.Namespace) -> int:
    try:
        text = import_db(args.database, allow_debug=args.allow_debug)
    except DbUnreadable as exc:
        raise UsageError(str(exc)) from None
    except DbImportError as exc:
        raise Refused(f"import-db: {exc}") from None
    write_output(args.output, text)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Only these commands (`python -m seng_fw.compile.cli`), for tests and scripts; the
    same error handling as `seng-fw`."""
    from seng_fw import cli

    return cli.run(cli.build_parser((__name__,)), argv)


if __name__ == "__main__":
    sys.exit(main())
