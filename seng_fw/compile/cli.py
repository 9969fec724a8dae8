"""`seng-fw compile | diff | apply | import-db`: the policy and its ruleset (`check`:
seng_fw/ops/check.py).

Exit status: 0 success; 1 the policy is invalid, or the kernel refused the ruleset;
2 usage error or unreadable input. `diff` exits like `git diff --exit-code`: 0 no
changes, 1 changes, 2 when it cannot compare (invalid policy, nftables error).
`check`, `compile` and `import-db` need no privileges; `diff` and `apply` read (and
`apply` writes) the live ruleset, so they need CAP_NET_ADMIN (root).

`apply` replaces seng-fw's table (`table inet seng`) in one transaction, stamped with
the policy's digest, then asks the running gateway over its control socket
(`--control-socket`) to load that very policy (its absolute path and digest): the
gateway reads it, refuses it if its digest differs (the file changed meanwhile),
disconnects enclaves of apps that are no longer allowed and deletes their leases'
conntrack entries. With no gateway answering the ruleset is applied all the same and
apply says so, with exit status 3 (seng-fw-policy.service, which runs before the
gateway, counts that as success); a gateway that refuses the policy gives exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from seng_fw.compile import live
from seng_fw.compile.compiler import DEFAULT_TUN, TABLE, Options, compile_policy
from seng_fw.compile.diff import SHARED, RulesetDiff
from seng_fw.compile.nft import Table, gc_paused
from seng_fw.policy.importdb import DbImportError, DbUnreadable, import_db
from seng_fw.policy.loader import load_policy
from seng_fw.policy.models import Policy
from seng_fw.policy.yamlfile import ConfigError
from seng_fw.system import ipc
from seng_fw.system.cli_toolkit import (
    EXIT_NO_GATEWAY,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    Refused,
    UsageError,
    check_readable,
    error_text,
    write_output,
)
from seng_fw.system.ipc import DEFAULT_CONTROL_SOCKET

# A 10,000-app policy takes the gateway seconds to load and check.
RELOAD_TIMEOUT = 300.0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    compile_ = sub.add_parser(
        "compile",
        help="print the nftables ruleset of a policy",
        description="Print the transaction that replaces seng-fw's table: nft syntax for "
        "humans (`nft -f` loads it too) or JSON for libnftables.",
    )
    _policy_argument(compile_)
    _ruleset_arguments(compile_)
    compile_.add_argument(
        "--format",
        choices=("nft", "json"),
        default="nft",
        help="nft: nft -f syntax (default); json: the libnftables JSON transaction",
    )
    compile_.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="write to FILE instead of stdout"
    )
    compile_.set_defaults(func=_cmd_compile)

    diff = sub.add_parser(
        "diff",
        help="show what apply would change in the live ruleset",
        description="Compare seng-fw's live table with the policy's (root needed). Exit "
        "status like `git diff --exit-code`: 0 no changes, 1 changes, 2 invalid policy or "
        "the comparison failed.",
    )
    _policy_argument(diff)
    _ruleset_arguments(diff)
    diff.add_argument(
        "--stat",
        action="store_true",
        help="a summary per app (rules and set elements added and removed) instead of the diff",
    )
    _colour_argument(diff)
    diff.set_defaults(func=_cmd_diff)

    apply = sub.add_parser(
        "apply",
        help="load a policy's ruleset atomically and reload the gateway",
        description="Replace seng-fw's table in one transaction (all or nothing; other "
        "tables are not touched), then make a running gateway admit by the same policy "
        "(over its control socket).",
    )
    _policy_argument(apply)
    _ruleset_arguments(apply)
    apply.add_argument(
        "--dry-run",
        action="store_true",
        help="let the kernel check the transaction and show the diff; change nothing",
    )
    apply.add_argument("--stat", action="store_true", help="with --dry-run: the diff's summary")
    apply.add_argument(
        "--force",
        action="store_true",
        help="load the ruleset even if the live table holds the same one (same digest)",
    )
    _colour_argument(apply)
    apply.add_argument(
        "--control-socket",
        type=Path,
        default=DEFAULT_CONTROL_SOCKET,
        metavar="PATH",
        help=f"the gateway to hand the policy to (default {DEFAULT_CONTROL_SOCKET})",
    )
    apply.set_defaults(func=_cmd_apply)

    importer = sub.add_parser(
        "import-db",
        help="convert an original SENG server database to a YAML policy",
        description="Convert a SENG database (plain or netfilter-extension schema).",
    )
    importer.add_argument(
        "database", type=Path, metavar="SENG.db", help="the SQLite database of a SENG server"
    )
    importer.add_argument("-o", "--output", type=Path, metavar="FILE", help="default: stdout")
    importer.add_argument(
        "--allow-debug", action="store_true", help="admit DEBUG enclaves, as the original did"
    )
    importer.set_defaults(func=_cmd_import_db)


EXIT_DIFFERENCES = 1  # diff: the live table differs from the policy's


def _policy_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "policy", type=Path, metavar="POLICY", help="policy file, or directory of *.yaml files"
    )


def _colour_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--color",
        "--colour",
        choices=("auto", "always", "never"),
        default="auto",
        help="colour the diff: auto (default: on a terminal only), always or never",
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


# The commands hold the policy and its table (millions of objects, no cycles) to the
# end: without the cyclic collector, which would scan them again and again (1 to 2 s
# of `diff` and `apply --dry-run` for 2,000 apps).
@gc_paused()
def _cmd_compile(args: argparse.Namespace) -> int:
    compiled = _compiled(args)
    if compiled is None:
        return EXIT_REFUSED
    _, table = compiled
    if args.format == "json":
        text = json.dumps(table.transaction(), indent=1) + "\n"
    else:
        text = table.text(header=(f"seng-fw ruleset for {args.policy} (seng-fw compile)",))
    write_output(args.output, text)
    return EXIT_OK


@gc_paused()
def _cmd_diff(args: argparse.Namespace) -> int:
    """Like `git diff --exit-code`: 0 no changes, 1 changes; 2 when it cannot compare."""
    compiled = _compiled(args)
    if compiled is None:
        return EXIT_USAGE
    policy, table = compiled
    try:
        changes = live.diff(table, policy)
    except (live.NftError, OSError) as exc:
        print(f"seng-fw: diff: {error_text(exc)}", file=sys.stderr)
        return EXIT_USAGE  # (returned, not raised: the diff tests call _cmd_diff)
    _show_diff(changes, stat=args.stat, colour=_colour_wanted(args.color))
    return EXIT_DIFFERENCES if changes.changed else EXIT_OK


_COLOURS = {"+": "\033[32m", "-": "\033[31m", "@": "\033[36m"}
_BOLD, _RESET = "\033[1m", "\033[0m"


def _colour_wanted(choice: str) -> bool:
    if choice == "auto":
        return (
            sys.stdout.isatty()
            and os.environ.get("TERM") != "dumb"
            and not os.environ.get("NO_COLOR")
        )
    return choice == "always"


def _show_diff(changes: RulesetDiff, *, stat: bool, colour: bool) -> None:
    if not changes.changed:
        print("no changes")
        return
    if stat:
        for line in stat_lines(changes):
            print(line)
        return
    for line in changes.lines():
        if colour:
            if line.startswith(("--- ", "+++ ")):
                line = f"{_BOLD}{line}{_RESET}"
            elif line[:1] in _COLOURS:
                line = f"{_COLOURS[line[0]]}{line}{_RESET}"
        print(line)


def stat_lines(changes: RulesetDiff) -> list[str]:
    """`git diff --stat` for rulesets: per app, rules and set elements added/removed."""
    rows = changes.stat()
    width = max([len(row[0]) for row in rows] + [3])
    out = [f" {'app':<{width}} | rules   +added -removed | set elements +added -removed"]
    totals = [0, 0, 0, 0]
    for app, *numbers in rows:
        totals = [t + n for t, n in zip(totals, numbers, strict=True)]
        rules = f"+{numbers[0]} -{numbers[1]}"
        elements = f"+{numbers[2]} -{numbers[3]}"
        out.append(f" {app:<{width}} | rules {rules:>17} | set elements {elements:>16}")
    apps = sum(1 for row in rows if row[0] != SHARED)
    out.append(
        f" {apps} app(s) changed; rules +{totals[0]} -{totals[1]}, "
        f"set elements +{totals[2]} -{totals[3]}"
    )
    return out


class _Progress:
    """Phases of a long apply on a terminal: a phase is shown once it has taken more than
    a second, with its time when it ends (stderr, so that stdout stays the result)."""

    DELAY = 1.0

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        started = time.monotonic()
        timer = threading.Timer(
            self.DELAY,
            lambda: print(f"seng-fw apply: {name}...", end="", file=sys.stderr, flush=True),
        )
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            timer.join()
            took = time.monotonic() - started
            if took >= self.DELAY:
                print(f" {took:.1f} s", file=sys.stderr, flush=True)


def summary(table: Table, result: live.ApplyResult, apps: int) -> str:
    """One line: what the transaction wrote (it replaces the whole table)."""
    sets = len(table.sets)
    elements = sum(len(named.elements) for named in table.sets)
    rules = sum(len(chain.rules) for chain in table.chains)
    how = "replaced" if result.replaced else "created"
    return (
        f"applied: table inet {table.name} {how}: {apps} apps, {sets} sets and maps with "
        f"{elements} elements, {len(table.chains)} chains with {rules} rules, "
        f"{len(table.counters)} counters (digest {result.digest[:12]})"
    )


@gc_paused()
def _cmd_apply(args: argparse.Namespace) -> int:
    progress = _Progress(sys.stderr.isatty())
    with progress.step("load the policy"):
        policy = _load(args.policy)
    if policy is None:
        return EXIT_REFUSED
    with progress.step("compile"):
        table = compile_policy(policy, Options(tun=args.tun, table=TABLE))
    try:
        nft = live.Nft()
        result = live.apply(
            table, policy, nft, dry_run=args.dry_run, force=args.force, step=progress.step
        )
        if not result.changed:
            print(f"no changes: the live table holds this ruleset (digest {result.digest[:12]})")
            if args.dry_run:
                return EXIT_OK
            # The gateway may still admit by another policy (an earlier apply found no
            # gateway, or it refused the policy): hand it over all the same.
            return _hand_over(args.policy.resolve(), result.policy_digest, args.control_socket)
        if args.dry_run:
            with progress.step("diff"):
                changes = live.diff(table, policy, nft)
            _show_diff(changes, stat=args.stat, colour=_colour_wanted(args.color))
            print("dry run: the kernel accepts the ruleset; nothing was changed")
            return EXIT_OK
    except (live.NftError, OSError) as exc:
        raise Refused(f"apply: the ruleset was not changed: {error_text(exc)}") from None
    print(summary(table, result, len(policy.apps)))
    return _hand_over(args.policy.resolve(), result.policy_digest, args.control_socket)


def _hand_over(path: Path, digest: str, control_socket: Path) -> int:
    """Ask the running gateway to admit by the policy just applied."""
    message = {"command": "reload", "args": {"policy": str(path), "digest": digest}}
    try:
        answer = ipc.request(control_socket, message, timeout=RELOAD_TIMEOUT)
    except ipc.IpcPermissionDenied as exc:  # a gateway may be running: not "no gateway"
        raise UsageError(f"apply: the ruleset is applied, but {exc}") from None
    except ipc.IpcNoAnswer as exc:  # a gateway was reached and failed: not a success
        raise Refused(
            f"apply: the ruleset is applied, but the gateway did not confirm the reload: "
            f"{exc} (seng-fw status shows both digests)"
        ) from None
    except ipc.IpcUnavailable as exc:
        print(f"seng-fw apply: no gateway answering ({exc}): the ruleset is applied, "
              "no gateway was reloaded", file=sys.stderr)  # fmt: skip
        return EXIT_NO_GATEWAY
    if not isinstance(answer, dict) or not answer.get("ok"):
        error = answer.get("error") if isinstance(answer, dict) else answer
        print(
            f"seng-fw apply: the ruleset is applied, but the gateway refused the policy: "
            f"{error}\nits admission policy and the ruleset now differ (seng-fw status "
            "shows both digests)",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    result = answer.get("result") or {}
    print(
        f"gateway reloaded {result.get('policy')}: {result.get('enclaves')} enclaves remain, "
        f"{result.get('closed')} disconnected"
    )
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
