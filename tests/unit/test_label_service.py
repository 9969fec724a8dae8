"""The labeller service's small parts: queue ranges and systemd notification."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from seng_fw.label.service import parse_queues, sd_notify


def test_parse_queues() -> None:
    assert parse_queues("3") == [3]
    assert parse_queues("0-3") == [0, 1, 2, 3]
    for bad in ("3-1", "70000", "x"):
        with pytest.raises(ValueError):
            parse_queues(bad)


def test_sd_notify_path_and_abstract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    abstract = f"seng-fw-test-{os.getpid()}"
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as by_path,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as by_name,
    ):
        by_path.bind(str(path))
        by_name.bind("\0" + abstract)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        sd_notify("READY=1")
        assert by_path.recv(64) == b"READY=1"
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + abstract)
        sd_notify("STOPPING=1")
        assert by_name.recv(64) == b"STOPPING=1"


def test_sd_notify_without_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    sd_notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/socket")
    sd_notify("READY=1")  # an unreachable socket is not our failure
