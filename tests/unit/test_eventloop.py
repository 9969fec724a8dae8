"""The data-path processes' event loop: uvloop unless told otherwise, asyncio's as fallback."""

from __future__ import annotations

import asyncio

import pytest

from seng_fw.system import eventloop


async def _loop_type() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_uvloop_by_default() -> None:
    pytest.importorskip("uvloop")
    assert eventloop.loop_name() == "uvloop"
    assert eventloop.run(_loop_type()).startswith("uvloop")


def test_environment_forces_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "asyncio")
    assert eventloop.loop_name() == "asyncio"
    assert eventloop.run(_loop_type()).startswith("asyncio")


def test_reader_callbacks_on_the_chosen_loop() -> None:
    """What the gateway and the emulator use: add_reader on a raw descriptor."""
    import socket

    async def main() -> bytes:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        a.setblocking(False)
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(a.fileno(), lambda: got.set_result(a.recv(64)))
        b.send(b"datagram")
        try:
            return await asyncio.wait_for(got, 5)
        finally:
            asyncio.get_running_loop().remove_reader(a.fileno())
            a.close()
            b.close()

    assert eventloop.run(main()) == b"datagram"
