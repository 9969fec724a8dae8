"""The labeller service's small parts: queue ranges and its command line. (Its systemd
notifications go through seng_fw.system.sdnotify: tests/unit/test_control_sdnotify.py.)"""

from __future__ import annotations

import pytest

from seng_fw.cli import build_parser
from seng_fw.label.registry import DEFAULT_SOCKET
from seng_fw.label.service import parse_queues, run


def test_parse_queues() -> None:
    assert parse_queues("3") == [3]
    assert parse_queues("0-3") == [0, 1, 2, 3]
    for bad in ("3-1", "70000", "x"):
        with pytest.raises(ValueError):
            parse_queues(bad)


def test_seng_fw_label_hook_command_line() -> None:
    args = build_parser().parse_args(["label-hook", "--queues", "2-3"])
    assert args.func is run
    assert args.queues == [2, 3] and args.socket == DEFAULT_SOCKET


def test_a_bad_queue_range_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["label-hook", "--queues", "5-1"])
    assert exited.value.code == 2
    assert "--queues" in capsys.readouterr().err
