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

Repeats are collapsed (`RepeatFilter`, on the handler `setup_logging` installs): a
fault that recurs on every event-loop wakeup (a deleted TUN device, a flood of refused
handshakes) must not turn into tens of thousands of lines a second. After `burst`
similar lines within `interval` seconds the rest are suppressed until the interval
ends; then one line says "N similar lines suppressed".
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass
class _Window:
    start: float
    passed: int = 1
    suppressed: int = 0
    level: int = logging.INFO
    logger: str = ""
    sample: str = ""


# Operator actions are an audit trail: never collapsed, however many come at once.
AUDIT_EVENTS = frozenset({"revocation", "revocations_cleared", "reload", "reload_refused"})


class RepeatFilter(logging.Filter):
    """Lets at most `burst` similar records through per `interval` seconds.

    Similar: same logger, level and message template (``"rejected host=%s ..."``) for
    warnings and errors, so that a flood of refusals from many ports collapses; the
    same formatted message below WARNING, so that one line per admission, lease and
    tunnel end stays (they differ in address). A suppressed run is reported by one
    record, "N similar lines suppressed (last: ...)", once its interval is over and
    any record passes, and by `flush()` (at exit). Keys are bounded (`max_keys`, the
    oldest forgotten first).
    """

    SUMMARY = "_seng_repeat_summary"

    def __init__(
        self,
        emit: Callable[[logging.LogRecord], object],
        *,
        burst: int = 10,
        interval: float = 10.0,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._emit = emit
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._windows: OrderedDict[tuple[str, int, str], _Window] = OrderedDict()
        self.suppressed_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, self.SUMMARY, False) or getattr(record, "event", None) in AUDIT_EVENTS:
            return True
        now = self._clock()
        self._report_expired(now)
        template = str(record.msg) if record.levelno >= logging.WARNING else record.getMessage()
        key = (record.name, record.levelno, template)
        window = self._windows.get(key)
        if window is None:
            self._windows[key] = _Window(now, level=record.levelno, logger=record.name)
            while len(self._windows) > self.max_keys:
                self._report(self._windows.popitem(last=False)[1])
            return True
        if window.passed < self.burst:
            window.passed += 1
            return True
        window.suppressed += 1
        window.sample = record.getMessage()
        self.suppressed_total += 1
        return False

    def _report_expired(self, now: float) -> None:
        # Oldest first: windows are kept in creation order.
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if now - window.start < self.interval:
                return
            del self._windows[key]
            self._report(window)

    def _report(self, window: _Window) -> None:
        if not window.suppressed:
            return
        summary = logging.makeLogRecord(
            {
                "name": window.logger,
                "levelno": window.level,
                "levelname": logging.getLevelName(window.level),
                "msg": "%d similar lines suppressed in %.0fs (last: %s)",
                "args": (window.suppressed, self.interval, _one_line(window.sample)),
                self.SUMMARY: True,
            }
        )
        self._emit(summary)

    def flush(self) -> None:
        """Report every suppressed run now (at exit)."""
        windows, self._windows = list(self._windows.values()), OrderedDict()
        for window in windows:
            self._report(window)


def flush_repeats() -> None:
    """Report suppressed log lines of the root logger's handlers (call before exit)."""
    for handler in logging.getLogger().handlers:
        for filter_ in handler.filters:
            if isinstance(filter_, RepeatFilter):
                filter_.flush()


def setup_logging(
    log_format: LogFormat = "text", level: int = logging.INFO, stream: TextIO | None = None
) -> logging.Handler:
    """Replace the root logger's handlers with one stderr handler in `log_format`, which
    collapses repeated lines (`RepeatFilter`)."""
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
    handler.addFilter(RepeatFilter(handler.handle))
    root.addHandler(handler)
    root.setLevel(level)
    return handler
