"""Logging: one event per line, text (journal-aware) or JSON."""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator

import pytest

from seng_fw.system.logs import JsonFormatter, TextFormatter, setup_logging, stderr_is_journal


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def record(message: str, level: int = logging.WARNING, **extra: object) -> logging.LogRecord:
    made = logging.makeLogRecord(
        {"name": "seng_fw.gateway", "levelno": level, "levelname": logging.getLevelName(level),
         "msg": message, "args": (), "created": 1_700_000_000.5, **extra}
    )  # fmt: skip
    return made


def with_exception() -> logging.LogRecord:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        import sys

        return record("failed", logging.ERROR, exc_info=sys.exc_info())


def test_text_is_one_line_even_with_tracebacks() -> None:
    line = TextFormatter().format(with_exception())
    assert "\n" not in line
    assert line.startswith("2023-11-14T22:13:20.500+00:00 ERROR seng_fw.gateway: failed | ")
    assert "ValueError: bad | thing" in line
    assert TextFormatter().format(record("config:\nline 3")).endswith("config: | line 3")


def test_text_for_the_journal_has_a_priority_and_no_time() -> None:
    assert TextFormatter(journal=True).format(record("x")) == "<4>WARNING seng_fw.gateway: x"
    assert TextFormatter(journal=True).format(record("x", logging.DEBUG)).startswith("<7>")
    assert TextFormatter(journal=True).format(with_exception()).startswith("<3>ERROR")


def test_json_lines() -> None:
    event = json.loads(JsonFormatter().format(record("admitted", logging.INFO, app="webapp")))
    assert event == {
        "time": "2023-11-14T22:13:20.500+00:00", "level": "info",
        "logger": "seng_fw.gateway", "message": "admitted", "app": "webapp",
    }  # fmt: skip
    line = JsonFormatter().format(with_exception())
    assert "\n" not in line and "ValueError" in json.loads(line)["exception"]


def test_setup_logging_replaces_handlers() -> None:
    stream = io.StringIO()
    setup_logging("json", logging.INFO, stream)
    logging.getLogger("seng_fw.test").info("hello %s", "there")
    logging.getLogger("seng_fw.test").debug("hidden")
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["hello there"]
    with pytest.raises(ValueError, match="unknown log format"):
        setup_logging("xml", logging.INFO, stream)  # type: ignore[arg-type]


def test_journal_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryFile("w") as stream:
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        assert stderr_is_journal(stream)
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino + 1}")
        assert not stderr_is_journal(stream)
    assert not stderr_is_journal(io.StringIO())  # no file descriptor
