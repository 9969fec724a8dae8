"""`seng-fw lab ...`: the lab CA, the enclave emulator and the namespace lab."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

# Each module registers its own `lab` subcommands.
_LAB_COMMAND_MODULES = (
    "seng_fw.lab.ca_cli",
    "seng_fw.lab.run_cli",
)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    lab = sub.add_parser("lab", help="lab attestation CA, enclave emulator and namespace lab")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True, metavar="LAB_COMMAND")
    for name in _LAB_COMMAND_MODULES:
        importlib.import_module(name).register(lab_sub)
