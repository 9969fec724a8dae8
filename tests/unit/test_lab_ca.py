"""The lab attestation CA: files, certificate shapes, IAS-like reports, sgx-ra-tls layout."""

from __future__ import annotations

import base64
import json
import stat
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import seng_fw.cli
import seng_fw.lab.cli
from seng_fw.attest import AttestationPolicy, IasVerifier
from seng_fw.attest.quote import QUOTE_BODY_SIZE, parse_quote_body
from seng_fw.attest.ratls import (
    EVIDENCE_OIDS,
    OID_IAS_CA_CERT,
    OID_IAS_REPORT,
    OID_IAS_SIGNATURE,
    OID_IAS_SIGNING_CERT,
    EvidenceEncoding,
)
from seng_fw.lab.ca import (
    README_FILE,
    ROOT_CERT_FILE,
    ROOT_KEY_FILE,
    SIGNING_CERT_FILE,
    SIGNING_KEY_FILE,
    EnclaveCert,
    LabCA,
    generate_client_key,
)

Main = Callable[[Sequence[str]], int]
MRENCLAVE = b"\x33" * 32
MRSIGNER = b"\x44" * 32


@pytest.fixture(scope="module")
def ca() -> LabCA:
    return LabCA.generate()


@pytest.fixture
def main(monkeypatch: pytest.MonkeyPatch) -> Main:
    # Only the command modules under test (see test_attest_cli.py).
    monkeypatch.setattr(seng_fw.cli, "_COMMAND_MODULES", ("seng_fw.attest.cli", "seng_fw.lab.cli"))
    monkeypatch.setattr(seng_fw.lab.cli, "_LAB_COMMAND_MODULES", ("seng_fw.lab.ca_cli",))
    return seng_fw.cli.main


def _issue(ca: LabCA, **kwargs: Any) -> EnclaveCert:
    return ca.issue_enclave_cert(mrenclave=MRENCLAVE, mrsigner=MRSIGNER, **kwargs)


def _extension_values(cert_der: bytes) -> dict[x509.ObjectIdentifier, bytes]:
    cert = x509.load_der_x509_certificate(cert_der)
    values = {}
    for ext in cert.extensions:
        if ext.oid in EVIDENCE_OIDS:
            assert ext.critical is False
            assert isinstance(ext.value, x509.UnrecognizedExtension)
            values[ext.oid] = ext.value.value
    return values


# --- the CA itself ---


def test_root_and_signing_certificates_look_like_intels(ca: LabCA) -> None:
    root, signing = ca.root_cert, ca.signing_cert
    root_key, signing_key = root.public_key(), signing.public_key()
    assert isinstance(root_key, rsa.RSAPublicKey) and root_key.key_size == 3072
    assert isinstance(signing_key, rsa.RSAPublicKey) and signing_key.key_size == 2048
    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)
    signing.verify_directly_issued_by(root)
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    constraints = signing.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.value.ca is False
    usage = signing.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and usage.value.content_commitment
    assert "not Intel" in root.subject.rfc4514_string()


def test_create_load_and_refuse_to_overwrite(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    created = LabCA.create(directory)
    for name in (ROOT_KEY_FILE, SIGNING_KEY_FILE):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600
        assert "lab" in name
    assert (directory / README_FILE).read_text().count("LAB") >= 1
    loaded = LabCA.load(directory)
    assert loaded.root_pem == created.root_pem
    assert loaded.signing_cert_pem == created.signing_cert_pem
    assert (directory / ROOT_CERT_FILE).read_bytes() == created.root_pem
    assert (directory / SIGNING_CERT_FILE).read_bytes() == created.signing_cert_pem
    before = (directory / ROOT_KEY_FILE).read_bytes()
    with pytest.raises(FileExistsError):
        LabCA.create(directory)
    assert (directory / ROOT_KEY_FILE).read_bytes() == before


def test_load_refuses_mismatched_keys(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    LabCA.create(first)
    LabCA.create(second)
    (first / SIGNING_KEY_FILE).write_bytes((second / SIGNING_KEY_FILE).read_bytes())
    with pytest.raises(ValueError):
        LabCA.load(first)


# --- enclave certificates in the sgx-ra-tls format ---


@pytest.mark.parametrize("encoding", list(EvidenceEncoding))
def test_enclave_certificate_layout(ca: LabCA, encoding: EvidenceEncoding) -> None:
    enclave = _issue(ca, encoding=encoding)
    cert = x509.load_der_x509_certificate(enclave.cert_der)
    assert cert.subject == cert.issuer
    cert.verify_directly_issued_by(cert)  # self-signed
    values = _extension_values(enclave.cert_der)
    assert set(values) == set(EVIDENCE_OIDS)
    assert values[OID_IAS_SIGNATURE] == base64.b64encode(enclave.signature)
    if encoding is EvidenceEncoding.V2018:
        assert base64.b64decode(values[OID_IAS_REPORT], validate=True) == enclave.report
        signing_der = base64.b64decode(values[OID_IAS_SIGNING_CERT], validate=True)
        assert x509.load_der_x509_certificate(signing_der) == ca.signing_cert
        ca_der = base64.b64decode(values[OID_IAS_CA_CERT], validate=True)
        assert x509.load_der_x509_certificate(ca_der) == ca.root_cert
    else:
        assert values[OID_IAS_REPORT] == enclave.report
        # As sgx-ra-tls copies them out of the IAS header: PEM without a final newline.
        assert values[OID_IAS_SIGNING_CERT] == ca.signing_cert_pem.rstrip(b"\n")
        assert values[OID_IAS_CA_CERT] == ca.root_pem.rstrip(b"\n")
    assert enclave.cert_pem.startswith(b"-----BEGIN CERTIFICATE-----")


def test_quote_body(ca: LabCA) -> None:
    enclave = _issue(ca, debug=True, isv_svn=5, isv_prod_id=6)
    body = base64.b64decode(json.loads(enclave.report)["isvEnclaveQuoteBody"])
    assert len(body) == QUOTE_BODY_SIZE
    quote = parse_quote_body(body)
    assert quote == enclave.quote
    assert (quote.version, quote.sign_type) == (2, 0)
    assert quote.mrenclave == MRENCLAVE
    assert quote.mrsigner == MRSIGNER
    assert (quote.isv_svn, quote.isv_prod_id, quote.debug) == (5, 6, True)


def test_report_like_ias_v4(ca: LabCA) -> None:
    stamp = datetime(2026, 11, 1, 12, 30, 5, 123456, tzinfo=UTC)
    ok = _issue(ca, timestamp=stamp, encoding=EvidenceEncoding.V2019)
    assert ok.report.startswith(b'{"id":"')
    fields = json.loads(ok.report)
    assert list(fields) == ["id", "timestamp", "version", "isvEnclaveQuoteStatus",
                            "isvEnclaveQuoteBody"]
    assert fields["timestamp"] == "2026-11-01T12:30:05.123456"
    assert fields["version"] == 4
    assert fields["id"].isdigit()

    outdated = json.loads(_issue(ca, status="GROUP_OUT_OF_DATE", report_version=4).report)
    assert list(outdated) == ["id", "timestamp", "version", "advisoryURL", "advisoryIDs",
                              "isvEnclaveQuoteStatus", "platformInfoBlob",
                              "isvEnclaveQuoteBody"]
    assert outdated["advisoryIDs"]
    blob = bytes.fromhex(outdated["platformInfoBlob"])
    assert blob[:4] == bytes.fromhex("15020065") and len(blob) == 4 + 0x65

    hardening = json.loads(_issue(ca, status="SW_HARDENING_NEEDED", report_version=4).report)
    assert hardening["advisoryIDs"] == ["INTEL-SA-00334"]
    assert "platformInfoBlob" not in hardening  # as in genuine IAS reports


def test_report_like_ias_v3_for_the_2018_encoding(ca: LabCA) -> None:
    enclave = _issue(ca, status="GROUP_OUT_OF_DATE", encoding=EvidenceEncoding.V2018)
    fields = json.loads(enclave.report)
    assert fields["version"] == 3
    assert "advisoryIDs" not in fields  # API v3 sent advisories in HTTP headers
    assert "platformInfoBlob" in fields


def test_linkable_quote_has_a_pseudonym(ca: LabCA) -> None:
    enclave = _issue(ca, linkable=True)
    assert enclave.quote.sign_type == 1
    assert "epidPseudonym" in json.loads(enclave.report)


@pytest.mark.parametrize(
    ("key_type", "key_size", "expected"),
    [
        ("ecdsa", None, ("secp384r1", None)),
        ("ecdsa", 256, ("secp256r1", None)),
        ("rsa", None, (None, 2048)),
        ("rsa", 3072, (None, 3072)),
    ],
)
def test_client_keys(
    ca: LabCA, key_type: str, key_size: int | None, expected: tuple[str | None, int | None]
) -> None:
    enclave = _issue(ca, key_type=key_type, key_size=key_size)
    key = serialization.load_pem_private_key(enclave.key_pem, password=None)
    cert = x509.load_der_x509_certificate(enclave.cert_der)
    assert key.public_key() == cert.public_key()
    curve, bits = expected
    if curve:
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == curve
    else:
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == bits


@pytest.mark.parametrize(("key_type", "key_size"), [("ecdsa", 521), ("rsa", 1024), ("dsa", None)])
def test_unsupported_client_key_requests(key_type: str, key_size: int | None) -> None:
    with pytest.raises(ValueError):
        generate_client_key(key_type, key_size)  # type: ignore[arg-type]


def test_issue_checks_identity_lengths(ca: LabCA) -> None:
    with pytest.raises(ValueError):
        ca.issue_enclave_cert(mrenclave=b"\x00" * 31, mrsigner=b"\x00" * 32)
    with pytest.raises(ValueError):
        _issue(ca, report_data_override=b"\x00" * 63)


# --- CLI ---


def test_cli_init_and_enclave_cert(main: Main, tmp_path: Path) -> None:
    ca_dir, out = tmp_path / "ca", tmp_path / "enclave"
    assert main(["lab", "ca", "init", str(ca_dir)]) == 0
    assert stat.S_IMODE((ca_dir / ROOT_KEY_FILE).stat().st_mode) == 0o600
    assert main(["lab", "ca", "init", str(ca_dir)]) == 2  # never overwrites a CA
    argv = [
        "lab", "enclave-cert", "--ca", str(ca_dir), "--mrenclave", "ab" * 32,
        "--mrsigner", "cd" * 32, "--isv-svn", "2", "--isv-prod-id", "0x10",
        "--key", "rsa", "--key-size", "3072", "--encoding", "2018", "--out", str(out),
    ]
    assert main(argv) == 0
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    for name in ("cert.pem", "cert.der", "report.json", "report.sig"):
        assert (out / name).stat().st_size > 0
    ca = LabCA.load(ca_dir)
    identity = IasVerifier(AttestationPolicy(roots=(ca.root_cert,))).verify_certificate(
        (out / "cert.der").read_bytes()
    )
    assert identity.mrenclave == bytes.fromhex("ab" * 32)
    assert (identity.isv_svn, identity.isv_prod_id) == (2, 16)
    root = str(ca_dir / ROOT_CERT_FILE)
    assert main(["attest", "verify", str(out / "cert.pem"), "--root", root]) == 0


@pytest.mark.parametrize(
    "change",
    [
        ["--mrenclave", "zz" * 32],
        ["--mrenclave", "ab" * 31],
        ["--isv-svn", "70000"],
        ["--status", "MAYBE"],
        ["--key-size", "1024"],
    ],
    ids=["not-hex", "short", "svn-range", "status", "key-size"],
)
def test_cli_enclave_cert_bad_arguments(main: Main, tmp_path: Path, change: list[str]) -> None:
    argv = [
        "lab", "enclave-cert", "--ca", str(tmp_path), "--mrenclave", "ab" * 32,
        "--mrsigner", "cd" * 32, "--out", str(tmp_path / "out"), *change,
    ]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_cli_enclave_cert_usage_errors(main: Main, tmp_path: Path) -> None:
    base = ["lab", "enclave-cert", "--mrenclave", "ab" * 32, "--mrsigner", "cd" * 32]
    out = ["--out", str(tmp_path / "out")]
    assert main([*base, "--ca", str(tmp_path / "no-ca"), *out]) == 2
    LabCA.create(tmp_path / "ca")
    ca = ["--ca", str(tmp_path / "ca")]
    assert main([*base, *ca, "--key", "ecdsa", "--key-size", "2048", *out]) == 2


@pytest.mark.parametrize(("argv", "expected"), [([], "2018"), (["--encoding", "2019"], "2019")])
def test_enclave_cert_defaults_to_the_2018_encoding_seng_clients_send(
    main: Main, tmp_path: Path, argv: list[str], expected: str
) -> None:
    """Issue 13 defect 7: real SENG clients send the 2018 base64 encoding (the original Go
    server refuses the 2019 one); the lab CA, the lab and the emulator default to it."""
    from seng_fw.attest.ratls import parse_ratls_certificate

    ca_dir, out = tmp_path / "ca", tmp_path / "enclave"
    assert main(["lab", "ca", "init", "--epid", str(ca_dir)]) == 0
    base = ["lab", "enclave-cert", "--ca", str(ca_dir), "--mrenclave", "ab" * 32]
    assert main([*base, "--mrsigner", "cd" * 32, *argv, "--out", str(out)]) == 0
    evidence = parse_ratls_certificate((out / "cert.der").read_bytes())
    assert evidence.encoding == expected
    default = LabCA.load(ca_dir).issue_enclave_cert(mrenclave=bytes(32), mrsigner=bytes(32))
    assert parse_ratls_certificate(default.cert_der).encoding == "2018"
