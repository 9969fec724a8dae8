"""Command-line entry point: `seng-fw SUBCOMMAND ...`.

Each area of the product registers its own subcommands (one module per concern),
so this file only wires them together. Exit codes shared by every command:
0 success / trusted, 1 rejected / check failed, 2 usage error or unreadable input;
`serve` exits 4 when it stopped on a fault a restart repairs (its TUN device deleted).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_FAULT = 4  # serve: stopped on a fault; systemd's Restart=on-failure restarts it

# Modules exposing `register(subparsers)`; each parser it adds sets `func(args) -> int`.
_COMMAND_MODULES = (
    "seng_fw.attest.cli",
    "seng_fw.lab.cli",
    "seng_fw.ops.serve",
    "seng_fw.compile.cli",
    "seng_fw.ops.cli",
    "seng_fw.label.service",
)


class UsageError(Exception):
    """Bad arguments or unreadable input: reported on stderr, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seng-fw", description="Per-application gateway for SGX enclaves (SENG)."
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (repeatable)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        result: int = args.func(args)
    except UsageError as exc:
        print(f"seng-fw: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
