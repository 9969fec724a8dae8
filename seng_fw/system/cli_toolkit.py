"""What every `seng-fw` command shares: the exit-code table, the exception that carries
an exit code to the one `main`, reading inputs (`-` is standard input), writing outputs,
ISO-8601 times, and JSON result documents.

Exit codes, the same for every command (README, "Exit codes"):

  0  done (trusted, valid, no differences)
  1  refused or rejected (invalid policy, attestation rejected, the gateway or the
     kernel said no) or, for `diff`, differences found
  2  usage error or unreadable input (missing, unreadable or unwritable files)
  3  no gateway answering on the control socket
  4  serve only: stopped on a fault a restart repairs (its TUN device deleted)

A command reports a user mistake by raising CliError (or one of its kinds); `main`
prints its message as one line on stderr and exits with its code. No traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NO_GATEWAY = 3
EXIT_FAULT = 4  # serve: stopped on a fault a restart repairs (Restart=on-failure)

EXIT_CODES = (
    (EXIT_OK, "done"),
    (EXIT_REFUSED, "refused or rejected, or differences found"),
    (EXIT_USAGE, "usage error or unreadable input"),
    (EXIT_NO_GATEWAY, "no gateway answering on the control socket"),
    (EXIT_FAULT, "serve: stopped on a fault a restart repairs (its TUN device deleted)"),
)

STDIN = "-"
# The version of every JSON document a command prints (`schema` key); bump when a key
# changes meaning or goes away (new keys do not bump it).
JSON_SCHEMA = 1


# The `error.code` of a JSON document, by exit status, unless the error names its own.
ERROR_KINDS = {EXIT_REFUSED: "refused", EXIT_USAGE: "usage", EXIT_NO_GATEWAY: "no_gateway"}


class CliError(Exception):
    """A user mistake or a refusal: `main` prints `message` on one line, exits `code`;
    under --json also a document whose `error.code` is `kind` (a stable machine name)."""

    def __init__(
        self,
        message: str,
        code: int = EXIT_USAGE,
        kind: str | None = None,
        details: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.kind = kind or ERROR_KINDS.get(code, "error")
        self.details = details or []


class UsageError(CliError):
    """Bad arguments or unreadable input: exit status 2."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message, EXIT_USAGE, kind)


class Refused(CliError):
    """The request was refused (invalid input, the kernel or the gateway said no): 1."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message, EXIT_REFUSED, kind)


class NoGateway(CliError):
    """Nothing answers on the control socket: exit status 3."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_NO_GATEWAY)


def os_error_text(path: str | os.PathLike[str], exc: OSError) -> str:
    """`PATH: no such file or directory`: the path, then what is wrong, in lower case."""
    reason = exc.strerror or str(exc)
    if isinstance(exc, IsADirectoryError):
        reason = "is a directory"
    elif isinstance(exc, NotADirectoryError):
        reason = "a part of the path is not a directory"
    return f"{os.fspath(path)}: {reason[:1].lower()}{reason[1:]}"


def read_input(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a file, or of standard input for `-`. Raises UsageError."""
    if os.fspath(path) == STDIN:
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {os_error_text(path, exc)}") from None


def check_readable(path: str | os.PathLike[str], *, directory_ok: bool = False) -> None:
    """Raise UsageError unless `path` is a readable file (or, if `directory_ok`, a
    directory), for inputs that a library opens itself."""
    if os.fspath(path) == STDIN:
        return
    target = Path(path)
    try:
        if target.is_dir():
            if not directory_ok:
                raise IsADirectoryError(21, "is a directory", os.fspath(path))
            os.listdir(target)
            return
        with target.open("rb"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot read {os_error_text(path, exc)}") from None


def read_text_input(path: str | os.PathLike[str]) -> str:
    """`read_input` decoded as UTF-8."""
    try:
        return read_input(path).decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"cannot read {os.fspath(path)}: not UTF-8 text") from None


def write_output(path: str | os.PathLike[str] | None, data: str | bytes) -> None:
    """Write to a file, or to standard output for None or `-`. Raises UsageError."""
    raw = data.encode() if isinstance(data, str) else data
    if path is None or os.fspath(path) == STDIN:
        sys.stdout.flush()
        sys.stdout.buffer.write(raw)
        sys.stdout.buffer.flush()
        return
    try:
        Path(path).write_bytes(raw)
    except OSError as exc:
        raise UsageError(f"cannot write {os_error_text(path, exc)}") from None


def iso_time(text: str) -> datetime:
    """argparse type: an ISO-8601 time, UTC when it names no zone."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def add_json_arguments(parser: argparse.ArgumentParser) -> None:
    """`--json` and `--pretty`, for commands that print a result document."""
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document (README: JSON documents)"
    )
    parser.add_argument(
        "--pretty", action="store_true", help="with --json: indent the document over several lines"
    )


def command_name(args: argparse.Namespace) -> str:
    """`attest verify`: the subcommand path argparse recorded (dests `*command`)."""
    parts = [v for k, v in vars(args).items() if k.endswith("command") and isinstance(v, str)]
    return " ".join(parts)


def json_document(
    command: str, result: Any = None, error: CliError | None = None
) -> dict[str, Any]:
    """The one shape of every JSON output: the same keys whether it worked or not.
    `error.code` is a stable machine name, `error.message` a sentence for people and
    `error.details` the lines behind it (every issue of a configuration file)."""
    return {
        "schema": JSON_SCHEMA,
        "command": command,
        "ok": error is None,
        "error": None
        if error is None
        else {"code": error.kind, "message": error.message, "details": error.details},
        "result": result,
    }


def print_json(document: dict[str, Any], pretty: bool = False) -> None:
    """One compact line per document, or indented with --pretty."""
    if pretty:
        print(json.dumps(document, indent=2))
    else:
        print(json.dumps(document, separators=(",", ":")))


def wants_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def emit_json(args: argparse.Namespace, result: Any) -> None:
    """Print a command's successful result as its JSON document."""
    print_json(json_document(command_name(args), result), getattr(args, "pretty", False))


def error_text(exc: Exception) -> str:
    """An exception in an administrator's words: `PATH: permission denied` for an
    OSError, not `[Errno 13] Permission denied: 'PATH'`."""
    if isinstance(exc, OSError):
        return os_error_text(exc.filename if exc.filename is not None else "error", exc)
    return str(exc)
