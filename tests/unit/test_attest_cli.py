"""`seng-fw attest verify` and `verify-report`: exit codes 0/1/2, text and --json output."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import seng_fw.cli
import seng_fw.lab.cli
from seng_fw.lab.ca import LabCA

FIXTURES = Path(__file__).parent.parent / "fixtures" / "attest"
REQUIRED_JSON_KEYS = {
    "mrenclave",
    "mrsigner",
    "isv_prod_id",
    "isv_svn",
    "debug",
    "quote_status",
    "report_data",
    "timestamp",
}

Main = Callable[[Sequence[str]], int]


@pytest.fixture
def main(monkeypatch: pytest.MonkeyPatch) -> Main:
    # Only the command modules under test: the CLI tests of one area must not depend on
    # every other area's module being importable.
    monkeypatch.setattr(seng_fw.cli, "_COMMAND_MODULES", ("seng_fw.attest.cli", "seng_fw.lab.cli"))
    monkeypatch.setattr(seng_fw.lab.cli, "_LAB_COMMAND_MODULES", ("seng_fw.lab.ca_cli",))
    return seng_fw.cli.main


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[LabCA, Path]:
    directory = tmp_path_factory.mktemp("lab-ca")
    return LabCA.create(directory), directory


@pytest.fixture
def files(tmp_path: Path, lab: tuple[LabCA, Path]) -> Callable[..., dict[str, Path]]:
    ca, directory = lab

    def write(**kwargs: object) -> dict[str, Path]:
        settings: dict[str, object] = {"mrenclave": b"\x01" * 32, "mrsigner": b"\x02" * 32}
        settings.update(kwargs)
        enclave = ca.issue_enclave_cert(**settings)  # type: ignore[arg-type]
        paths = {
            "pem": tmp_path / "cert.pem",
            "der": tmp_path / "cert.der",
            "report": tmp_path / "report.json",
            "sig": tmp_path / "report.sig",
        }
        paths["pem"].write_bytes(enclave.cert_pem)
        paths["der"].write_bytes(enclave.cert_der)
        paths["report"].write_bytes(enclave.report)
        paths["sig"].write_bytes(enclave.signature_b64 + b"\n")
        paths["root"] = directory / "lab-attestation-root.pem"
        paths["signing"] = directory / "lab-report-signing.pem"
        return paths

    return write


def test_verify_pem_and_der(main: Main, files: Callable[..., dict[str, Path]]) -> None:
    paths = files()
    for cert in (paths["pem"], paths["der"]):
        assert main(["attest", "verify", str(cert), "--root", str(paths["root"])]) == 0


def test_verify_text_output(
    main: Main, files: Callable[..., dict[str, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    paths = files(isv_svn=9)
    assert main(["attest", "verify", str(paths["pem"]), "--root", str(paths["root"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    values = dict(line.split(":", 1) for line in lines)
    assert values["mrenclave"].strip() == "01" * 32
    assert values["isv_svn"].strip() == "9"
    assert values["quote_status"].strip() == "OK"
    # Values are aligned in one column.
    assert len({line.index(line.split(":", 1)[1].strip()) for line in lines}) == 1


def test_verify_json_output(
    main: Main, files: Callable[..., dict[str, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    paths = files(debug=True, isv_prod_id=4)
    argv = ["attest", "verify", str(paths["der"]), "--root", str(paths["root"])]
    assert main([*argv, "--allow-debug", "--json"]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1  # one compact line per document
    outer = json.loads(line)
    assert outer.keys() == {"schema", "command", "ok", "error", "result"}
    assert outer["schema"] == 1 and outer["command"] == "attest verify"
    assert outer["ok"] is True and outer["error"] is None
    document = outer["result"]
    assert document.keys() >= REQUIRED_JSON_KEYS
    assert document["trusted"] is True
    assert document["debug"] is True
    assert document["isv_prod_id"] == 4
    assert document["mrsigner"] == "02" * 32
    assert document["report_data_checked"] is True


def test_verify_rejected(
    main: Main, files: Callable[..., dict[str, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    paths = files(status="GROUP_OUT_OF_DATE")
    argv = ["attest", "verify", str(paths["pem"]), "--root", str(paths["root"])]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "quote_status" in captured.err
    assert captured.out == ""
    assert main([*argv, "--json"]) == 1
    message = (
        "attestation rejected (quote_status): "
        "isvEnclaveQuoteStatus is GROUP_OUT_OF_DATE (not allowed by policy)"
    )
    # The same keys as on success; the failure on stdout too, the check as error.code.
    assert json.loads(capsys.readouterr().out) == {
        "schema": 1,
        "command": "attest verify",
        "ok": False,
        "error": {"code": "quote_status", "message": message, "details": []},
        "result": None,
    }
    assert main([*argv, "--allow-status", "GROUP_OUT_OF_DATE", "--json", "--pretty"]) == 0
    pretty = capsys.readouterr().out
    assert pretty.count("\n") > 10
    assert json.loads(pretty)["result"]["quote_status"] == "GROUP_OUT_OF_DATE"


def test_verify_debug_needs_allow_debug(main: Main, files: Callable[..., dict[str, Path]]) -> None:
    paths = files(debug=True)
    assert main(["attest", "verify", str(paths["pem"]), "--root", str(paths["root"])]) == 1


def test_verify_max_age_and_at(main: Main, files: Callable[..., dict[str, Path]]) -> None:
    paths = files(timestamp=datetime.now(UTC) - timedelta(hours=2))
    argv = ["attest", "verify", str(paths["pem"]), "--root", str(paths["root"])]
    assert main(argv) == 0  # default max age 24 h
    assert main([*argv, "--max-age", "3600"]) == 1
    later = (datetime.now(UTC) + timedelta(hours=23)).isoformat()
    assert main([*argv, "--at", later]) == 1
    assert main([*argv, "--at", (datetime.now(UTC) - timedelta(hours=1)).isoformat()]) == 0


def test_verify_with_the_wrong_root(
    main: Main, files: Callable[..., dict[str, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    paths = files()
    intel = FIXTURES / "intel-ias-root-ca.pem"
    assert main(["attest", "verify", str(paths["pem"]), "--root", str(intel)]) == 1
    assert "untrusted_root" in capsys.readouterr().err
    both = ["--root", str(intel), "--root", str(paths["root"])]
    assert main(["attest", "verify", str(paths["pem"]), *both]) == 0


def test_verify_malformed_certificate_is_a_rejection(main: Main, tmp_path: Path) -> None:
    cert = tmp_path / "garbage.der"
    cert.write_bytes(b"\x30\x03\x02\x01\x01")
    root = FIXTURES / "intel-ias-root-ca.pem"
    assert main(["attest", "verify", str(cert), "--root", str(root)]) == 1


@pytest.mark.parametrize("problem", ["missing-cert", "missing-root", "bad-root", "chain", "pem"])
def test_verify_usage_errors(
    main: Main,
    files: Callable[..., dict[str, Path]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    problem: str,
) -> None:
    paths = files()
    cert, root = paths["pem"], paths["root"]
    if problem == "missing-cert":
        cert = tmp_path / "nope.pem"
    elif problem == "missing-root":
        root = tmp_path / "nope-root.pem"
    elif problem == "bad-root":
        root = paths["signing"]  # not a CA
    elif problem == "chain":
        # Evidence is taken from the leaf only; a file with a chain is refused, not searched.
        cert = tmp_path / "chain.pem"
        cert.write_bytes(paths["pem"].read_bytes() + root.read_bytes())
    else:
        cert = tmp_path / "broken.pem"
        cert.write_bytes(b"-----BEGIN CERTIFICATE-----\n%%%\n-----END CERTIFICATE-----\n")
    assert main(["attest", "verify", str(cert), "--root", str(root)]) == 2
    assert capsys.readouterr().err.startswith("seng-fw: ")


@pytest.mark.parametrize(
    "extra",
    [["--at", "yesterday"], ["--max-age", "-5"], ["--allow-status", "GROUP_REVOKED"], []],
    ids=["bad-at", "bad-max-age", "never-acceptable-status", "no-root"],
)
def test_verify_bad_arguments(
    main: Main, files: Callable[..., dict[str, Path]], extra: list[str]
) -> None:
    paths = files()
    argv = ["attest", "verify", str(paths["pem"]), *extra]
    if extra:
        argv += ["--root", str(paths["root"])]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


# --- verify-report ---


def _genuine_argv(tmp_path: Path) -> list[str]:
    sig = tmp_path / "report.sig"
    sig.write_bytes((FIXTURES / "ias-report-v4-sw-hardening-needed.sig").read_bytes() + b"\n")
    return [
        "attest", "verify-report",
        "--report", str(FIXTURES / "ias-report-v4-sw-hardening-needed.json"),
        "--signature", str(sig),
        "--signing-cert", str(FIXTURES / "intel-ias-report-signing.pem"),
        "--root", str(FIXTURES / "intel-ias-root-ca.pem"),
        "--allow-status", "SW_HARDENING_NEEDED", "--allow-debug",
    ]


def test_verify_report_genuine_intel_vector(
    main: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _genuine_argv(tmp_path)
    assert main([*argv, "--at", "2020-05-11T10:00:00", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)["result"]
    assert document.keys() >= REQUIRED_JSON_KEYS
    assert document["quote_status"] == "SW_HARDENING_NEEDED"
    assert document["report_data_checked"] is False
    assert document["timestamp"] == "2020-05-11T09:21:15.454051+00:00"
    # Age is not checked unless asked for; then the 2020 report is stale by 2021.
    assert main([*argv, "--at", "2021-01-01T00:00:00Z"]) == 0
    assert "(not checked)" in capsys.readouterr().out
    assert main([*argv, "--at", "2021-01-01T00:00:00Z", "--max-age", "86400"]) == 1
    assert "report_too_old" in capsys.readouterr().err


def test_verify_report_genuine_vector_today(
    main: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_genuine_argv(tmp_path)) == 1
    assert "signing_cert_expired" in capsys.readouterr().err


def test_verify_report_lab(
    main: Main, files: Callable[..., dict[str, Path]], tmp_path: Path
) -> None:
    paths = files()
    argv = [
        "attest", "verify-report", "--report", str(paths["report"]),
        "--signature", str(paths["sig"]), "--signing-cert", str(paths["signing"]),
        "--root", str(paths["root"]),
    ]
    assert main(argv) == 0
    tampered = tmp_path / "tampered.json"
    tampered.write_bytes(paths["report"].read_bytes().replace(b'"OK"', b'"OK" '))
    assert main([*argv, "--report", str(tampered)]) == 1
    paths["sig"].write_bytes(b"not base64!")
    assert main(argv) == 1


def test_verify_report_unreadable_files(main: Main, tmp_path: Path) -> None:
    argv = _genuine_argv(tmp_path)
    missing = tmp_path / "missing.json"
    assert main([*argv[:3], str(missing), *argv[4:]]) == 2
    copy = tmp_path / "root-copy.pem"
    shutil.copy(FIXTURES / "ias-report-v4-sw-hardening-needed.json", copy)
    assert main([*argv, "--root", str(copy)]) == 2  # a root file without a certificate
