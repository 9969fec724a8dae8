"""Command-line entry point: `seng-fw SUBCOMMAND ...`.

Each area of the product registers its own subcommands (one module per concern),
so this file only wires them together. Exit codes shared by every command
(seng_fw/system/cli_toolkit.py): 0 done, 1 refused or differences found, 2 usage error
or unreadable input, 3 no gateway answering.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from collections.abc import Sequence
from importlib import metadata

from seng_fw.ops import manual
from seng_fw.policy.yamlfile import ConfigError
from seng_fw.system.cli_toolkit import (
    EXIT_CODES,
    EXIT_FAULT,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    CliError,
    UsageError,
    command_name,
    error_text,
    json_document,
    print_json,
    wants_json,
)

EXIT_REJECTED = EXIT_REFUSED  # the older name
__all__ = [
    "EXIT_FAULT",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_REJECTED",
    "EXIT_USAGE",
    "UsageError",
    "main",
]

log = logging.getLogger("seng_fw.cli")

# Modules exposing `register(subparsers)`; each parser it adds sets `func(args) -> int`.
_COMMAND_MODULES = (
    "seng_fw.attest.cli",
    "seng_fw.lab.cli",
    "seng_fw.ops.serve",
    "seng_fw.compile.cli",
    "seng_fw.ops.check",
    "seng_fw.ops.cli",
    "seng_fw.label.service",
)
# The commands each module registers: `seng-fw COMMAND ...` imports only that module (a
# policy check need not import the gateway, the lab and the attestation code; unit test
# test_cli_lazy checks this table against the modules). Other command lines (help,
# `completion`, `man`, a mistyped command) build the whole tree.
_MODULE_OF_COMMAND = {
    "attest": "seng_fw.attest.cli",
    "lab": "seng_fw.lab.cli",
    "serve": "seng_fw.ops.serve",
    "compile": "seng_fw.compile.cli",
    "diff": "seng_fw.compile.cli",
    "apply": "seng_fw.compile.cli",
    "import-db": "seng_fw.compile.cli",
    "check": "seng_fw.ops.check",
    "status": "seng_fw.ops.cli",
    "enclaves": "seng_fw.ops.cli",
    "revoke": "seng_fw.ops.cli",
    "reload": "seng_fw.ops.cli",
    "init": "seng_fw.ops.cli",
    "install-units": "seng_fw.ops.cli",
    "label-hook": "seng_fw.label.service",
}
_VERBOSE = re.compile(r"-v+|--verbose")


def version() -> str:
    try:
        return metadata.version("seng-fw")
    except metadata.PackageNotFoundError:  # run from a checkout without installing
        return "unknown"


def command_modules(argv: Sequence[str]) -> tuple[str, ...]:
    """The command modules a command line needs: only its command's module when the
    line starts with that command (after -v options), else all of them."""
    for word in argv:
        if _VERBOSE.fullmatch(word):
            continue
        module = _MODULE_OF_COMMAND.get(word)
        if module in _COMMAND_MODULES:
            return (module,)
        break
    return _COMMAND_MODULES


def build_parser(
    modules: Sequence[str] | None = None, *, manual_pages: bool = True
) -> argparse.ArgumentParser:
    """The parser of `modules` (default: every command module) and, with
    `manual_pages`, of `completion` and `man`, which walk the whole tree."""
    if modules is None:
        modules = _COMMAND_MODULES
    parser = argparse.ArgumentParser(
        prog="seng-fw",
        description="Per-application gateway for SGX enclaves (SENG).",
        epilog="exit status: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES),
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (repeatable)"
    )
    parser.add_argument(
        "--version", action="version", version=f"seng-fw {version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        importlib.import_module(name).register(sub)
    if manual_pages:
        manual.register(sub, parser, version())  # needs the whole tree: registered last
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse and run one command, turning a user mistake into one line on stderr and its
    exit code (never a traceback)."""
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(getattr(args, "verbose", 0), 2)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        result: int = args.func(args)
    except CliError as exc:
        return _report(args, exc)
    except ConfigError as exc:  # a configuration file: every issue (then a summary)
        issues = [str(issue) for issue in exc.issues]
        if len(issues) == 1:
            return _report(args, CliError(issues[0], EXIT_USAGE, "invalid_configuration"))
        for issue in issues:
            print(issue, file=sys.stderr)
        error = CliError(f"{len(issues)} errors", EXIT_USAGE, "invalid_configuration", issues)
        return _report(args, error)
    except OSError as exc:
        # A file the user named that a command opened without the toolkit: still a user
        # mistake, not a crash. The traceback is there for -vv.
        log.debug("unhandled OSError", exc_info=True)
        return _report(args, UsageError(error_text(exc)))
    except KeyboardInterrupt:
        return 130
    return result


def _report(args: argparse.Namespace, error: CliError) -> int:
    """One line on stderr; under --json also the failure document on stdout."""
    print(f"seng-fw: {error.message}", file=sys.stderr)
    if wants_json(args):
        print_json(json_document(command_name(args), None, error), getattr(args, "pretty", False))
    return error.code


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    modules = command_modules(words)
    return run(build_parser(modules, manual_pages=modules == _COMMAND_MODULES), argv)


if __name__ == "__main__":
    sys.exit(main())
