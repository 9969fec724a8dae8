"""Logging to stderr, one event per line, as text or JSON.

journald stores each line of a service's stderr as one entry: a message with a
newline in it (a traceback, a multi-line configuration error) would become several
unrelated entries, so both formats keep every event on one line.

Text: ``LEVEL logger: message``. When stderr is the journal (systemd sets
$JOURNAL_STREAM to stderr's device:inode), the timestamp is left to journald and the
line starts with a ``<N>`` syslog priority prefix, which journald turns into the
entry's PRIORITY (so `journalctl -p warning` works); elsewhere it starts with a time.

JSON: ``{"time", "level", "logger", "message", ...}`` with the fields passed in
``extra={...}`` and the traceback as ``"exception"``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")

# logging level -> syslog priority (sd-daemon(3) prefixes).
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
# Attributes every LogRecord has; anything else came from `extra=`.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _one_line(text: str) -> str:
    return " | ".join(line for line in text.splitlines() if line.strip()) if "\n" in text else text


def _priority(levelno: int) -> int:
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class TextFormatter(logging.Formatter):
    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info:
            text += " | " + self.formatException(record.exc_info)
        text = _one_line(text)
        if self.journal:
            return f"<{_priority(record.levelno)}>{text}"
        when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        return f"{when} {text}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                event[key] = value
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str, ensure_ascii=False)


def stderr_is_journal(stream: TextIO | None = None) -> bool:
    """True if `stream` (stderr) is connected to journald ($JOURNAL_STREAM=DEV:INODE)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        stat = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{stat.st_dev}:{stat.st_ino}"


def setup_logging(
    log_format: LogFormat = "text", level: int = logging.INFO, stream: TextIO | None = None
) -> logging.Handler:
    """Replace the root logger's handlers with one stderr handler in `log_format`."""
    if log_format not in FORMATS:
        raise ValueError(f"unknown log format {log_format!r}; known: {', '.join(FORMATS)}")
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else TextFormatter(stderr_is_journal(stream))
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
