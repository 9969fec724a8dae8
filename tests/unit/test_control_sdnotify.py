"""sd_notify: datagrams to $NOTIFY_SOCKET, watchdog interval and pings."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from seng_fw.system import sdnotify


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    yield sock
    sock.close()


def test_ready_with_status(notify_socket: socket.socket) -> None:
    assert sdnotify.ready("listening on 10.0.0.1:12345")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=listening on 10.0.0.1:12345"
    assert sdnotify.watchdog() and notify_socket.recv(4096) == b"WATCHDOG=1"
    assert sdnotify.stopping() and notify_socket.recv(4096) == b"STOPPING=1"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"seng-fw-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.status("starting")
        assert sock.recv(4096) == b"STATUS=starting"


def test_without_systemd_nothing_happens(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))  # nobody listens: no crash
    assert sdnotify.ready() is False


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert sdnotify.watchdog_interval() is None


def test_watchdog_loop_pings_until_cancelled(notify_socket: socket.socket) -> None:
    async def main() -> None:
        task = asyncio.get_running_loop().create_task(sdnotify.watchdog_loop(0.01))
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(main())
    pings = 0
    notify_socket.settimeout(0.1)
    with pytest.raises(TimeoutError):
        while True:
            assert notify_socket.recv(64) == b"WATCHDOG=1"
            pings += 1
    assert pings >= 3


def test_watchdog_loop_returns_without_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    asyncio.run(asyncio.wait_for(sdnotify.watchdog_loop(), 1))
