"""A gateway that cannot start closes what it had opened (`build_server`): the socket of
tunnel #1 when the port of tunnel #2 is taken, and a socket whose bind fails. Before,
they were left to the garbage collector (a ResourceWarning, the port held until then)."""

from __future__ import annotations

import gc
import socket
import warnings
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from seng_fw.cli import main
from seng_fw.gateway.config import load_gateway_config
from seng_fw.gateway.server import bind_udp
from seng_fw.lab.ca import LabCA
from seng_fw.ops.serve import build_server

ROOT = Path(__file__).resolve().parents[2]
LOCAL = "127.0.0.1"


def _port_below_a_busy_one() -> tuple[socket.socket, int]:
    """A socket on port P + 1 (no SO_REUSEPORT: nobody may share it) and a free port P."""
    for _ in range(50):
        busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        busy.bind((LOCAL, 0))
        port = busy.getsockname()[1] - 1
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((LOCAL, port))
            except OSError:
                busy.close()
                continue
        return busy, port
    raise AssertionError("no free port below a busy one")


@pytest.fixture
def downlink_taken(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Path]:
    """gateway.yaml listening on LOCAL:P, with P + 1 taken by another socket."""
    root = tmp_path / "root.pem"
    root.write_bytes(LabCA.generate().root_pem)
    busy, port = _port_below_a_busy_one()
    with busy:
        argv = ["init", "--dir", str(tmp_path / "etc"), "--listen", f"{LOCAL}:{port}",
                "--root", str(root), "--policy", str(ROOT / "policies/lab/demo.yaml")]  # fmt: skip
        assert main(argv) == 0
        capsys.readouterr()
        yield tmp_path / "etc" / "gateway.yaml"


def _resource_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    gc.collect()
    return [str(w.message) for w in record if issubclass(w.category, ResourceWarning)]


def test_a_taken_downlink_port_closes_the_uplink_socket(downlink_taken: Path) -> None:
    config = load_gateway_config(downlink_taken)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(OSError, match="in use"):
            build_server(config)
        assert _resource_warnings(record) == []
    # Port P is free again at once: bound without SO_REUSEPORT, which a socket still
    # open on it (bound with SO_REUSEPORT) would refuse.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind((LOCAL, config.listen.port))


def test_serve_with_a_taken_port_exits_2_with_one_line(
    downlink_taken: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--config", str(downlink_taken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot start" in err and "in use" in err


def test_bind_udp_closes_its_socket_when_the_bind_fails() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(OSError):
            bind_udp(IPv4Address("192.0.2.1"), 12345)  # TEST-NET-1: no local address
        assert _resource_warnings(record) == []
