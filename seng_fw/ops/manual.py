"""`seng-fw completion bash|zsh` and `seng-fw man`: shell completion and the manual page,
generated from the argparse tree itself, so neither can drift from the commands.

shtab writes the completion scripts and argparse-manpage the roff page; both walk the
parser that `seng_fw.cli.build_parser` assembles, which this module receives (it does not
import the entry point). `make install` installs the outputs of both.
"""

from __future__ import annotations

import argparse
import sys

from seng_fw.system.cli_toolkit import EXIT_CODES, EXIT_OK

SHELLS = ("bash", "zsh")
MAN_SECTION = "8"  # a system administration command (it needs root for most of its work)


# shtab and argparse-manpage are imported where they are used: every `seng-fw` start,
# `serve` included, builds the parser, and only these two commands need them.


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    import shtab

    return shtab.complete(parser, shell=shell)


def man_page(parser: argparse.ArgumentParser, version: str) -> str:
    """The roff source of seng-fw(8): every command with its options, then EXIT STATUS."""
    from argparse_manpage.manpage import Manpage

    # The page takes its headings from the parser: the exit codes (the epilog) get a
    # section of their own, and the commands are under COMMANDS, not POSITIONAL ARGUMENTS.
    epilog, parser.epilog = parser.epilog, None
    title, parser._positionals.title = parser._positionals.title, "commands"
    try:
        page = Manpage(
            parser,
            {
                "version": version,
                "manual_section": MAN_SECTION,
                "manual_title": "System Manager's Manual",
                "description": "per-application gateway for SGX enclaves (SENG)",
            },
            format="single-commands-section",
        )
        items = "".join(f".TP\n.B {code}\n{_roff(meaning)}\n" for code, meaning in EXIT_CODES)
        page.add_section("exit status", "=", items.rstrip("\n"))
        page.add_section("see also", "=", ".BR nft (8),\n.BR systemctl (1)")
        return str(page)
    finally:
        parser.epilog, parser._positionals.title = epilog, title


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def register(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    root: argparse.ArgumentParser,
    version: str,
) -> None:
    completion = sub.add_parser(
        "completion",
        help="print the shell completion script (bash or zsh)",
        description="Print a completion script for seng-fw. Bash: "
        "seng-fw completion bash > /usr/share/bash-completion/completions/seng-fw; "
        "zsh: seng-fw completion zsh > a directory of $fpath, as _seng-fw.",
    )
    completion.add_argument("shell", choices=SHELLS, help="the shell to complete for")
    completion.set_defaults(func=lambda args: _print(completion_script(root, args.shell)))

    man = sub.add_parser(
        "man",
        help="print the manual page seng-fw(8) as roff",
        description="Print the manual page, generated from the commands' own help. "
        "Read it with: seng-fw man | man -l -",
    )
    man.set_defaults(func=lambda args: _print(man_page(root, version)))


def _print(text: str) -> int:
    sys.stdout.write(text)
    return EXIT_OK
