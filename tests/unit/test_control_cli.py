"""`seng-fw status | enclaves | revoke | reload | init | install-units`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from seng_fw.cli import main
from seng_fw.gateway.config import load_gateway_config
from seng_fw.gateway.counters import Traffic
from seng_fw.ops.cli import EXIT_UNREACHABLE, human_bytes, human_duration, render_config, table
from seng_fw.ops.servercert import fingerprint
from tests.support.gateway_service import NGINX, WEBAPP, RunningGateway

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def running(tmp_path: Path) -> Iterator[RunningGateway]:
    with RunningGateway(tmp_path) as gateway:
        gateway.gateway.add("webapp", WEBAPP).traffic = Traffic(bytes_in=2048, bytes_out=10)
        gateway.gateway.add("nginx", NGINX, host="10.0.0.20")
        yield gateway


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_status_table_and_json(running: RunningGateway, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "status", "--socket", str(running.socket))
    assert code == 0
    assert "listen    10.0.0.1:12345 (tunnel #1), 10.0.0.1:12346 (tunnel #2)" in out
    assert "mode      per_app, queue: none" in out
    assert "pending   0 handshakes half-open from 0 sources; 0 started" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("APP "))
    webapp = next(line for line in lines if line.startswith("webapp "))
    # Aligned: every column starts where its header does.
    assert webapp.index("192.168.29.0/24") == header.index("SUBNET")
    assert "2.0 KiB" in webapp
    code, out, _ = run(capsys, "status", "--socket", str(running.socket), "--json")
    assert code == 0 and out.count("\n") == 1
    document = json.loads(out)
    assert document["schema"] == 1 and document["ok"] is True and document["error"] is None
    assert document["result"]["enclaves"] == 2
    assert document["result"]["queue_mode"] == "none"


def test_enclaves_and_revoke(running: RunningGateway, capsys: pytest.CaptureFixture[str]) -> None:
    sock = str(running.socket)
    code, out, _ = run(capsys, "enclaves", "--socket", sock)
    assert code == 0
    assert out.splitlines()[0].split() == [
        "ADDRESS", "APP", "MRENCLAVE", "HOST", "SINCE", "FROM", "ENCLAVE", "TO", "ENCLAVE",
        "PAIRED",
    ]  # fmt: skip
    assert out.splitlines()[1].split()[:4] == ["192.168.30.2", "nginx", NGINX.hex()[:16],
                                               "10.0.0.20"]  # fmt: skip
    code, out, _ = run(capsys, "revoke", "--list", "--socket", sock)
    assert code == 0 and out == "no revocations\n"
    code, out, _ = run(
        capsys, "revoke", "--app", "webapp", "--reason", "key leaked", "--socket", sock
    )
    assert code == 0 and "revoked app webapp: 1 enclaves disconnected" in out
    code, out, _ = run(capsys, "revoke", "--list", "--socket", sock)
    header, row = out.splitlines()
    assert header.split() == ["KIND", "WHAT", "WHO", "WHEN", "WHY"]
    # who: the user on the other end of the socket (this test's process)
    assert row.split()[:2] == ["app", "webapp"] and f"pid={os.getpid()})" in row
    assert "2027-01-15T08:00:00Z" in row and row.endswith("key leaked")
    code, out, _ = run(capsys, "enclaves", "--socket", sock, "--json")
    assert [e["app"] for e in json.loads(out)["result"]["enclaves"]] == ["nginx"]
    code, _, err = run(capsys, "revoke", "--app", "ghost", "--socket", sock)
    assert code == 1 and "no app 'ghost'" in err
    code, out, err = run(capsys, "revoke", "--app", "ghost", "--socket", sock, "--json")
    failure = json.loads(out)
    assert code == 1 and failure["ok"] is False and failure["result"] is None
    assert failure["error"]["code"] == "refused" and "ghost" in failure["error"]["message"]
    code, out, _ = run(capsys, "revoke", "--enclave", "192.168.30.2", "--socket", sock, "--json")
    assert json.loads(out)["result"]["revoked"] == (
        "enclave 192.168.30.2 (app nginx, host 10.0.0.20)"
    )
    code, out, _ = run(capsys, "status", "--socket", sock, "--json")
    revocations = json.loads(out)["result"]["revocations"]
    assert [(r["kind"], r["target"]) for r in revocations] == [
        ("app", "webapp"), ("enclave", "192.168.30.2"),
    ]  # fmt: skip
    code, out, _ = run(capsys, "status", "--socket", sock)
    assert "revoked   app webapp; enclave 192.168.30.2 (app nginx, host 10.0.0.20)" in out
    code, out, _ = run(capsys, "revoke", "--clear", "--socket", sock)
    assert code == 0 and "2 revocations lifted" in out


def test_reload(running: RunningGateway, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "reload", "--socket", str(running.socket))
    assert code == 0 and "2 enclaves remain, 0 disconnected" in out


def test_no_gateway_is_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "status", "--socket", str(tmp_path / "none.sock"))
    assert code == EXIT_UNREACHABLE == 3 and "no gateway is listening" in err


def test_socket_taken_from_the_configuration(
    running: RunningGateway, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(render_config("10.0.0.1:12345", ["r.pem"]).replace(
        "/run/seng-fw/control.sock", str(running.socket)))  # fmt: skip
    code, _, _ = run(capsys, "status", "--config", str(config))
    assert code == 0
    config.write_text("listen: {port: 0}\n")
    code, _, err = run(capsys, "status", "--config", str(config))
    assert code == 2 and "gateway.yaml:1: listen.port" in err


def test_table_helpers() -> None:
    assert table(["A", "NUM"], [["x", 5], ["long", 123]]) == "A     NUM\nx       5\nlong  123\n"
    assert table(["A", "B"], [["x", None]]) == "A  B\nx  -\n"
    assert [human_bytes(n) for n in (0, 1023, 1024, 5 * 2**20)] == [
        "0 B", "1023 B", "1.0 KiB", "5.0 MiB"
    ]  # fmt: skip
    assert [human_duration(s) for s in (5, 65, 3700, 90000)] == ["5s", "1m05s", "1h01m", "1d01h"]


# ----- init ----------------------------------------------------------------------------


def test_init_writes_a_loadable_commented_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root.pem"
    root.write_text("lab root\n")
    policy = REPO / "policies" / "lab" / "demo.yaml"
    etc = tmp_path / "etc"
    code, out, _ = run(
        capsys, "init", "--dir", str(etc), "--listen", "10.77.1.1:4000", "--root", str(root),
        "--policy", str(policy), "--metrics", "127.0.0.1:9108",
    )  # fmt: skip
    assert code == 0
    config = load_gateway_config(etc / "gateway.yaml")
    assert (str(config.listen.address), config.listen.port) == ("10.77.1.1", 4000)
    assert config.attestation.roots == [etc / "roots" / "root.pem"]
    assert config.policy == etc / "policies"
    assert (etc / "policies" / "demo.yaml").read_text() == policy.read_text()
    assert config.metrics.address == ("127.0.0.1", 9108)
    assert config.mode == "per_app" and config.control.mode == 0o660
    assert "# " in (etc / "gateway.yaml").read_text()  # commented for the administrator
    cert = (etc / "server.pem").read_bytes()
    assert f"(pin it in clients): {fingerprint(cert)}" in out
    key = load_pem_private_key((etc / "server.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert x509.load_pem_x509_certificate(cert).public_key() == key.public_key()
    assert (etc / "server.key").stat().st_mode & 0o077 in (0, 0o040)

    # Again: nothing is overwritten, the same fingerprint is printed.
    (etc / "gateway.yaml").write_text((etc / "gateway.yaml").read_text() + "# mine\n")
    code, out, _ = run(capsys, "init", "--dir", str(etc))
    assert code == 0 and "exists: kept" in out and fingerprint(cert) in out
    assert (etc / "gateway.yaml").read_text().endswith("# mine\n")
    assert (etc / "server.pem").read_bytes() == cert


def test_init_rsa_and_without_roots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "init", "--dir", str(tmp_path), "--key-type", "rsa-3072")
    assert code == 0 and "next: put the attestation root certificate" in out
    key = load_pem_private_key((tmp_path / "server.key").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 3072
    assert (tmp_path / "policies" / "00-apps.yaml").exists()
    config = load_gateway_config(tmp_path / "gateway.yaml")
    assert config.attestation.roots == [tmp_path / "roots" / "attestation-root.pem"]


@pytest.mark.parametrize("args", [["--listen", "host:1"], ["--root", "/nonexistent.pem"]])
def test_init_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    code, _, _ = run(capsys, "init", "--dir", str(tmp_path / "x"), *args)
    assert code == 2 and not (tmp_path / "x").exists()


# ----- install-units -------------------------------------------------------------------


def test_install_units_into_a_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    program = tmp_path / "opt" / "seng-fw" / "bin" / "seng-fw"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    code, _, _ = run(capsys, "install-units", "--prefix", str(tmp_path), "--bin", str(program))
    assert code == 0
    units = tmp_path / "etc" / "systemd" / "system"
    service = (units / "seng-fw.service").read_text()
    assert f"ExecStart={program} serve --config /etc/seng-fw/gateway.yaml" in service
    label = (units / "seng-fw-label.service").read_text()
    assert f"ExecStart={program} label-hook --socket /run/seng-fw/label.sock" in label
    assert "/usr/local/bin" not in service + label + (units / "seng-fw-policy.service").read_text()
    assert (tmp_path / "etc" / "sysusers.d" / "seng-fw.conf").read_text().count("u seng-fw") == 1
    assert "ip_forward = 1" in (tmp_path / "etc" / "sysctl.d" / "60-seng-fw.conf").read_text()
    assert (tmp_path / "etc" / "seng-fw" / "policies").is_dir()
    assert (tmp_path / "var" / "lib" / "seng-fw").is_dir()
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(
            ["systemd-analyze", "verify", "seng-fw.service", "seng-fw-policy.service",
             "seng-fw-label.service"],
            cwd=units, capture_output=True, text=True,
        )  # fmt: skip
        assert verify.returncode == 0 and not verify.stderr, verify.stderr


def test_install_units_needs_the_unit_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "install-units", "--root", str(tmp_path), "--source", str(tmp_path))
    assert code == 2 and "missing seng-fw.service" in err


def test_init_template_in_both_modes(tmp_path: Path) -> None:
    from seng_fw.gateway.config import load_gateway_config

    config = tmp_path / "gateway.yaml"
    config.write_text(render_config("10.0.0.1:12345", ["r.pem"]))
    loaded = load_gateway_config(config)
    assert loaded.mode == "per_app" and loaded.label.hook == "in_process"
    config.write_text(render_config("10.0.0.1:12345", ["r.pem"], mode="shared", hook="service"))
    loaded = load_gateway_config(config)
    assert loaded.mode == "shared" and loaded.label.hook == "service"
    assert loaded.label.socket == Path("/run/seng-fw/label.sock")
