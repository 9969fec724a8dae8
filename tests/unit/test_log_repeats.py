"""Repeated log lines are collapsed (seng_fw.system.logs.RepeatFilter)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from seng_fw.system.logs import RepeatFilter, flush_repeats, setup_logging


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def captured() -> Iterator[tuple[list[str], RepeatFilter, Clock, logging.Logger]]:
    lines: list[str] = []
    clock = Clock()

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.levelname} {record.getMessage()}")

    handler = ListHandler()
    repeat = RepeatFilter(handler.handle, burst=3, interval=10.0, clock=clock)
    handler.addFilter(repeat)
    logger = logging.getLogger("test.repeats")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield lines, repeat, clock, logger
    logger.removeHandler(handler)


def test_a_line_repeated_in_a_busy_loop_is_collapsed(
    captured: tuple[list[str], RepeatFilter, Clock, logging.Logger],
) -> None:
    lines, repeat, clock, logger = captured
    for _ in range(20_000):
        logger.error("TUN read failed: %s", "[Errno 77] File descriptor in bad state")
    assert len(lines) == 3 and repeat.suppressed_total == 19_997
    clock.now += 11
    logger.info("something else")
    assert lines[3] == (
        "ERROR 19997 similar lines suppressed in 10s "
        "(last: TUN read failed: [Errno 77] File descriptor in bad state)"
    )
    assert lines[4] == "INFO something else"


def test_warnings_collapse_by_template_info_lines_only_when_identical(
    captured: tuple[list[str], RepeatFilter, Clock, logging.Logger],
) -> None:
    lines, repeat, _clock, logger = captured
    for port in range(100):
        logger.warning("rejected host=%s port=%d: %s", "10.0.0.9", port, "bad cookie")
    for address in range(100):
        logger.info("leased 192.168.29.%d to app=webapp", address)
    assert len(lines) == 3 + 100
    repeat.flush()
    assert lines[-1] == (
        "WARNING 97 similar lines suppressed in 10s "
        "(last: rejected host=10.0.0.9 port=99: bad cookie)"
    )


def test_the_line_passes_again_after_the_interval(
    captured: tuple[list[str], RepeatFilter, Clock, logging.Logger],
) -> None:
    lines, _repeat, clock, logger = captured
    for _ in range(5):
        logger.warning("again")
    clock.now += 10
    logger.warning("again")
    summary = "WARNING 2 similar lines suppressed in 10s (last: again)"
    assert lines == ["WARNING again"] * 3 + [summary, "WARNING again"]


def test_keys_are_bounded(captured: tuple[list[str], RepeatFilter, Clock, logging.Logger]) -> None:
    _lines, repeat, _clock, logger = captured
    for n in range(5000):
        logger.info("line %d", n)
    assert len(repeat._windows) <= repeat.max_keys


def test_setup_logging_installs_it() -> None:
    stream = io.StringIO()
    setup_logging("text", stream=stream)
    log = logging.getLogger("seng_fw.test")
    for _ in range(1000):
        log.error("spin")
    flush_repeats()
    text = stream.getvalue().splitlines()
    assert len(text) == 11 and "990 similar lines suppressed" in text[-1]


def test_operator_actions_are_never_collapsed(
    captured: tuple[list[str], RepeatFilter, Clock, logging.Logger],
) -> None:
    lines, repeat, _, logger = captured
    for n in range(10):  # a scripted batch of revocations: each one is the audit trail
        logger.warning(
            "revocation: revoked %s by %s", f"app a{n}", "root", extra={"event": "revocation"}
        )
    assert [line for line in lines if "revoked" in line] == [
        f"WARNING revocation: revoked app a{n} by root" for n in range(10)
    ]
    assert repeat.suppressed_total == 0
