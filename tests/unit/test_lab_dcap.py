"""The lab DCAP CA: dcap-qvl accepts its quotes and collateral and maps its TCB levels; the
formats (PCK SGX extension, quote v3, collateral, RA-TLS layouts) are Intel's, sgx-ra-tls's
and Gramine's; the CLI and the emulator's Gramine quote source."""

from __future__ import annotations

import argparse
import hashlib
import json
import stat
import struct
import urllib.parse
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import dcap_qvl
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pyasn1.codec.der import decoder as der_decoder

import seng_fw.cli
import seng_fw.lab.cli
from seng_fw.attest.ratls import report_data_for_key
from seng_fw.lab import dcap
from seng_fw.lab.ca import generate_client_key
from seng_fw.lab.dcap import TCB_LEVELS, LabDcapCA, Layout, TcbStatus
from seng_fw.lab.enclave import EnclaveError, GramineAttestation

Main = Callable[[Sequence[str]], int]
NOW = datetime.now(UTC)
MRENCLAVE = b"\x11" * 32
MRSIGNER = b"\x22" * 32
REPORT_DATA = b"\x33" * 32 + bytes(32)
_SGX = "1.2.840.113741.1.13.1"


@pytest.fixture(scope="module")
def ca() -> LabDcapCA:
    return LabDcapCA.generate(NOW)


@pytest.fixture(scope="module")
def collateral(ca: LabDcapCA) -> dcap_qvl.QuoteCollateralV3:
    return dcap_qvl.QuoteCollateralV3.from_json(ca.collateral_json(NOW))


def _verify(
    ca: LabDcapCA,
    quote: bytes,
    collateral: dcap_qvl.QuoteCollateralV3,
    at: datetime = NOW,
) -> dcap_qvl.VerifiedReport:
    return dcap_qvl.verify_with_root_ca(quote, collateral, ca.root_der, int(at.timestamp()))


def _sgx_report(quote: bytes) -> dcap_qvl.SgxEnclaveReport:
    report = dcap_qvl.parse_quote(quote).report
    assert isinstance(report, dcap_qvl.SgxEnclaveReport)
    return report


def _quote(platform: dcap.LabPlatform, **kwargs: Any) -> bytes:
    fields: dict[str, Any] = {"mrenclave": MRENCLAVE, "mrsigner": MRSIGNER}
    fields["report_data"] = REPORT_DATA
    fields.update(kwargs)
    return platform.quote(**fields)


# --- dcap-qvl accepts lab evidence and maps the TCB levels ---


def test_lab_quote_verifies_with_the_lab_root(
    ca: LabDcapCA, collateral: dcap_qvl.QuoteCollateralV3
) -> None:
    quote = _quote(ca.platform(now=NOW), isv_prod_id=7, isv_svn=3)
    report = _verify(ca, quote, collateral)
    assert report.status == "UpToDate"
    assert report.advisory_ids == []
    parsed = dcap_qvl.parse_quote(quote)
    assert parsed.is_sgx() and parsed.header.version == 3
    assert parsed.fmspc() == dcap.LAB_FMSPC.hex().upper()
    assert parsed.ca() == "platform"
    body = parsed.report
    assert isinstance(body, dcap_qvl.SgxEnclaveReport)
    assert (body.mr_enclave, body.mr_signer, body.report_data) == (MRENCLAVE, MRSIGNER, REPORT_DATA)
    assert body.attributes[0] & 0x02 == 0  # not DEBUG


@pytest.mark.parametrize("status", [s for s in TcbStatus if s is not TcbStatus.REVOKED])
def test_each_tcb_status_is_reported_as_configured(
    ca: LabDcapCA, collateral: dcap_qvl.QuoteCollateralV3, status: TcbStatus
) -> None:
    report = _verify(ca, _quote(ca.platform(status, now=NOW)), collateral)
    assert report.status == status.value
    assert report.advisory_ids == list(TCB_LEVELS[status].advisory_ids)


def test_revoked_tcb_level_is_refused(
    ca: LabDcapCA, collateral: dcap_qvl.QuoteCollateralV3
) -> None:
    with pytest.raises(ValueError, match="Revoked"):
        _verify(ca, _quote(ca.platform(TcbStatus.REVOKED, now=NOW)), collateral)


def test_out_of_date_quoting_enclave_makes_the_quote_out_of_date(
    ca: LabDcapCA, collateral: dcap_qvl.QuoteCollateralV3
) -> None:
    platform = ca.platform(now=NOW, qe_svn=dcap.QE_SVN_OUT_OF_DATE)
    report = _verify(ca, _quote(platform), collateral)
    assert report.status == "OutOfDate"
    assert "INTEL-SA-00615" in report.advisory_ids


def test_collateral_refused_after_next_update_and_before_issue(ca: LabDcapCA) -> None:
    quote = _quote(ca.platform(now=NOW))
    bundle = dcap_qvl.QuoteCollateralV3.from_json(ca.collateral_json(NOW, timedelta(days=2)))
    assert _verify(ca, quote, bundle, NOW + timedelta(days=1)).status == "UpToDate"
    with pytest.raises(ValueError, match=r"(?i)expired"):
        _verify(ca, quote, bundle, NOW + timedelta(days=3))
    with pytest.raises(ValueError):
        _verify(ca, quote, bundle, NOW - timedelta(days=1))


def test_tcb_info_past_next_update_is_refused_even_with_fresh_crls(ca: LabDcapCA) -> None:
    fields = ca.collateral(NOW)
    tcb_info = ca.tcb_info(NOW, timedelta(hours=1))
    fields.update(tcb_info=tcb_info, tcb_info_signature=ca.sign(tcb_info).hex())
    bundle = dcap_qvl.QuoteCollateralV3.from_json(json.dumps(fields))
    quote = _quote(ca.platform(now=NOW))
    assert _verify(ca, quote, bundle).status == "UpToDate"
    with pytest.raises(ValueError, match="TCBInfo expired"):
        _verify(ca, quote, bundle, NOW + timedelta(hours=2))


def test_revoked_pck_is_refused_through_the_crl() -> None:
    ca = LabDcapCA.generate(NOW)
    platform = ca.platform(now=NOW)
    quote = _quote(platform)
    before = dcap_qvl.QuoteCollateralV3.from_json(ca.collateral_json(NOW))
    ca.revoke(platform.pck_cert.serial_number)
    after = dcap_qvl.QuoteCollateralV3.from_json(ca.collateral_json(NOW))
    assert _verify(ca, quote, before).status == "UpToDate"
    with pytest.raises(ValueError, match="CertRevoked"):
        _verify(ca, quote, after)
    # Other platforms of the same CA are unaffected.
    assert _verify(ca, _quote(ca.platform(now=NOW)), after).status == "UpToDate"
    crl = x509.load_der_x509_crl(ca.pck_crl(NOW))
    assert crl.get_revoked_certificate_by_serial_number(platform.pck_cert.serial_number)


def test_platform_made_revoked_is_on_the_next_crl() -> None:
    ca = LabDcapCA.generate(NOW)
    platform = ca.platform(now=NOW, revoked=True)
    assert ca.revoked_serials == [platform.pck_cert.serial_number]
    bundle = dcap_qvl.QuoteCollateralV3.from_json(ca.collateral_json(NOW))
    with pytest.raises(ValueError, match="CertRevoked"):
        _verify(ca, _quote(platform), bundle)


# Offsets into the quote: header 48, report body 384, auth data size 4, then the ISV
# signature 64, attestation key 64, QE report 384, QE report signature 64.
_BODY, _AUTH = 48, 48 + 384 + 4
_TAMPER = {
    "header-qe-svn": 8,
    "mrenclave": _BODY + 64,
    "report-data": _BODY + 320,
    "isv-signature": _AUTH + 3,
    "attestation-key": _AUTH + 64 + 5,
    "qe-report": _AUTH + 128 + 300,
    "qe-report-signature": _AUTH + 512 + 7,
}


@pytest.mark.parametrize("offset", list(_TAMPER.values()), ids=list(_TAMPER))
def test_tampered_quote_is_refused(
    ca: LabDcapCA, collateral: dcap_qvl.QuoteCollateralV3, offset: int
) -> None:
    quote = bytearray(_quote(ca.platform(now=NOW)))
    assert _verify(ca, bytes(quote), collateral).status == "UpToDate"
    quote[offset] ^= 0x01
    with pytest.raises(ValueError):
        _verify(ca, bytes(quote), collateral)


def test_debug_enclave_is_refused_by_dcap_qvl(
    ca: LabDcapCA, collateral: dcap_qvl.QuoteCollateralV3
) -> None:
    quote = _quote(ca.platform(now=NOW), debug=True)
    assert _sgx_report(quote).attributes[0] & 0x02
    with pytest.raises(ValueError, match=r"(?i)debug"):
        _verify(ca, quote, collateral)


def test_other_roots_refuse_lab_evidence(
    ca: LabDcapCA, collateral: dcap_qvl.QuoteCollateralV3
) -> None:
    quote = _quote(ca.platform(now=NOW))
    with pytest.raises(ValueError):  # Intel's root
        dcap_qvl.verify(quote, collateral, int(NOW.timestamp()))
    other = LabDcapCA.generate(NOW)
    with pytest.raises(ValueError):
        _verify(other, quote, collateral)
    # Collateral of another lab with this lab's root and quote: refused as well.
    foreign = dcap_qvl.QuoteCollateralV3.from_json(other.collateral_json(NOW))
    with pytest.raises(ValueError):
        _verify(ca, quote, foreign)


# --- formats ---


def test_quote_v3_layout(ca: LabDcapCA) -> None:
    platform = ca.platform(TcbStatus.OUT_OF_DATE, now=NOW)
    key = ec.generate_private_key(ec.SECP256R1())
    quote = _quote(platform, attestation_key=key)
    version, key_type, reserved, qe_svn, pce_svn, vendor, user = struct.unpack_from(
        "<HHIHH16s20s", quote
    )
    assert (version, key_type, reserved) == (3, 2, 0)
    assert (qe_svn, pce_svn) == (dcap.QE_SVN, TCB_LEVELS[TcbStatus.OUT_OF_DATE].pce_svn)
    assert vendor == dcap.INTEL_QE_VENDOR_ID
    assert user == platform.qe_id + bytes(4)
    assert quote[_BODY : _BODY + 16] == TCB_LEVELS[TcbStatus.OUT_OF_DATE].components  # CPUSVN
    (auth_size,) = struct.unpack_from("<I", quote, 432)
    assert auth_size == len(quote) - _AUTH
    signature, att_pub = quote[_AUTH : _AUTH + 64], quote[_AUTH + 64 : _AUTH + 128]
    assert (
        att_pub
        == key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )[1:]
    )
    der_sig = encode_dss_signature(int.from_bytes(signature[:32]), int.from_bytes(signature[32:]))
    key.public_key().verify(der_sig, quote[:432], ec.ECDSA(hashes.SHA256()))
    qe_report = quote[_AUTH + 128 : _AUTH + 512]
    qe_auth_size = struct.unpack_from("<H", quote, _AUTH + 576)[0]
    qe_auth = quote[_AUTH + 578 : _AUTH + 578 + qe_auth_size]
    assert qe_auth_size == 32
    assert qe_report[320:] == hashlib.sha256(att_pub + qe_auth).digest() + bytes(32)
    assert qe_report[128:160] == dcap.LAB_QE_MRSIGNER
    offset = _AUTH + 578 + qe_auth_size
    cert_type, cert_size = struct.unpack_from("<HI", quote, offset)
    assert cert_type == 5
    assert quote[offset + 6 :] == platform.pck_chain_pem + b"\0"
    assert offset + 6 + cert_size == len(quote)


def _sgx_extension_values(der: bytes) -> dict[str, Any]:
    decoded, rest = der_decoder.decode(der)
    assert rest == b""
    values: dict[str, Any] = {}

    def walk(sequence: Any) -> None:
        for pair in sequence:
            oid, value = str(pair[0]), pair[1]
            if value.tagSet == der_decoder.univ.Sequence.tagSet:
                walk(value)
            else:
                values[oid] = value

    walk(decoded)
    return values


def test_pck_certificate_carries_intels_sgx_extension(ca: LabDcapCA) -> None:
    platform = ca.platform(TcbStatus.SW_HARDENING_NEEDED, now=NOW)
    level = TCB_LEVELS[TcbStatus.SW_HARDENING_NEEDED]
    parsed = dcap_qvl.parse_pck_extension_from_pem(platform.pck_cert_pem)
    assert parsed.fmspc == dcap.LAB_FMSPC and parsed.pce_id == dcap.LAB_PCE_ID
    assert (parsed.cpu_svn, parsed.pce_svn) == (level.components, level.pce_svn)
    assert parsed.sgx_type == dcap.SGX_TYPE_SCALABLE
    assert parsed.platform_instance_id is not None and len(parsed.platform_instance_id) == 16
    assert len(parsed.ppid) == 16
    ext = platform.pck_cert.extensions.get_extension_for_oid(dcap.OID_SGX_EXTENSION)
    assert not ext.critical and isinstance(ext.value, x509.UnrecognizedExtension)
    values = _sgx_extension_values(ext.value.value)
    assert [int(values[f"{_SGX}.2.{i}"]) for i in range(1, 17)] == list(level.components)
    assert int(values[f"{_SGX}.2.17"]) == level.pce_svn
    assert bytes(values[f"{_SGX}.2.18"]) == level.components
    assert bytes(values[f"{_SGX}.4"]) == dcap.LAB_FMSPC
    assert [bool(values[f"{_SGX}.7.{i}"]) for i in (1, 2, 3)] == [False, False, False]
    # Shaped like Intel's PCK certificate: end entity, signature keys, issued by the PCK CA.
    usage = platform.pck_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    platform.pck_cert.verify_directly_issued_by(ca.pck_ca_cert)
    ca.pck_ca_cert.verify_directly_issued_by(ca.root_cert)
    assert ca.root_cert.issuer == ca.root_cert.subject
    assert isinstance(ca.root_cert.public_key(), ec.EllipticCurvePublicKey)


def _check_signed(ca: LabDcapCA, text: str, signature_hex: str) -> None:
    raw = bytes.fromhex(signature_hex)
    der_sig = encode_dss_signature(int.from_bytes(raw[:32]), int.from_bytes(raw[32:]))
    public_key = ca.tcb_signing_cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(der_sig, text.encode(), ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public_key.verify(der_sig, text.encode() + b" ", ec.ECDSA(hashes.SHA256()))


def test_collateral_bundle_fields(ca: LabDcapCA) -> None:
    fields = ca.collateral(NOW)
    assert set(fields) == {
        "pck_crl_issuer_chain", "root_ca_crl", "pck_crl", "tcb_info_issuer_chain",
        "tcb_info", "tcb_info_signature", "qe_identity_issuer_chain", "qe_identity",
        "qe_identity_signature",
    }  # fmt: skip
    tcb_info = json.loads(fields["tcb_info"])
    assert (tcb_info["id"], tcb_info["version"], tcb_info["fmspc"]) == ("SGX", 3, "00A0655E0000")
    assert [level["tcbStatus"] for level in tcb_info["tcbLevels"]] == list(dcap.TCB_STATUSES)
    assert tcb_info["nextUpdate"] == (NOW + dcap.COLLATERAL_VALIDITY).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert json.loads(fields["qe_identity"])["id"] == "QE"
    _check_signed(ca, fields["tcb_info"], fields["tcb_info_signature"])
    _check_signed(ca, fields["qe_identity"], fields["qe_identity_signature"])
    chain = x509.load_pem_x509_certificates(fields["tcb_info_issuer_chain"].encode())
    assert chain == [ca.tcb_signing_cert, ca.root_cert]
    pck_chain = x509.load_pem_x509_certificates(fields["pck_crl_issuer_chain"].encode())
    assert pck_chain == [ca.pck_ca_cert, ca.root_cert]
    root_crl = x509.load_der_x509_crl(bytes.fromhex(fields["root_ca_crl"]))
    assert root_crl.issuer == ca.root_cert.subject and root_crl.is_signature_valid(
        ca.root_cert.public_key()  # type: ignore[arg-type]
    )
    collateral = dcap_qvl.QuoteCollateralV3.from_json(ca.collateral_json(NOW))
    assert collateral.tcb_info == fields["tcb_info"]


def test_pcs_bodies_embed_the_signed_bytes(ca: LabDcapCA) -> None:
    for body, name in (
        (ca.pcs_tcb_info_body(NOW), "tcbInfo"),
        (ca.pcs_qe_identity_body(NOW), "enclaveIdentity"),
    ):
        text = body.decode()
        document = json.loads(text)
        assert set(document) == {name, "signature"}
        prefix = f'{{"{name}":'
        signed = text[len(prefix) : text.rindex(',"signature":')]
        assert json.loads(signed) == document[name]
        _check_signed(ca, signed, document["signature"])


# --- RA-TLS certificates ---


def _extension(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes:
    ext = cert.extensions.get_extension_for_oid(oid)
    assert not ext.critical and isinstance(ext.value, x509.UnrecognizedExtension)
    return ext.value.value


def test_sgx_ra_tls_layout_and_key_binding(
    ca: LabDcapCA, collateral: dcap_qvl.QuoteCollateralV3
) -> None:
    enclave = ca.issue_enclave_cert(
        mrenclave=MRENCLAVE, mrsigner=MRSIGNER, tcb_status="ConfigurationNeeded", now=NOW
    )
    cert = x509.load_der_x509_certificate(enclave.cert_der)
    cert.verify_directly_issued_by(cert)
    quote = _extension(cert, dcap.OID_DCAP_QUOTE)
    assert quote == enclave.quote
    assert _verify(ca, quote, collateral).status == "ConfigurationNeeded"
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp384r1"  # SENG's USE_ECDSA key
    assert _sgx_report(quote).report_data == report_data_for_key(public_key)
    pck = x509.load_pem_x509_certificate(_extension(cert, dcap.OID_DCAP_PCK_CERT))
    assert pck == enclave.platform.pck_cert
    pck_chain = urllib.parse.unquote(_extension(cert, dcap.OID_DCAP_PCK_CHAIN).decode())
    assert x509.load_pem_x509_certificates(pck_chain.encode()) == [ca.pck_ca_cert, ca.root_cert]
    assert "%0A" in _extension(cert, dcap.OID_DCAP_PCK_CHAIN).decode()  # as in PCS headers
    tcb_body = json.loads(_extension(cert, dcap.OID_DCAP_TCB_INFO))
    assert tcb_body["tcbInfo"]["fmspc"] == dcap.LAB_FMSPC.hex().upper()
    tcb_chain = urllib.parse.unquote(_extension(cert, dcap.OID_DCAP_TCB_CHAIN).decode())
    assert x509.load_pem_x509_certificates(tcb_chain.encode()) == [
        ca.tcb_signing_cert,
        ca.root_cert,
    ]


def _spki_hash(cert: x509.Certificate) -> bytes:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def test_gramine_layout_legacy_oid_bytes_and_key_binding(
    ca: LabDcapCA, collateral: dcap_qvl.QuoteCollateralV3
) -> None:
    enclave = ca.issue_enclave_cert(
        mrenclave=MRENCLAVE, mrsigner=MRSIGNER, layout=Layout.GRAMINE, now=NOW
    )
    # The extension's OID TLV: 06 0b, then Gramine's eleven raw bytes.
    assert b"\x06\x0b" + dcap.GRAMINE_LEGACY_QUOTE_OID_BYTES in enclave.cert_der
    cert = x509.load_der_x509_certificate(enclave.cert_der)
    assert dcap.OID_GRAMINE_LEGACY_QUOTE.dotted_string == "0.6.9.42.840.113741.1337.6"
    quote = _extension(cert, dcap.OID_GRAMINE_LEGACY_QUOTE)
    assert _sgx_report(quote).report_data == _spki_hash(cert) + bytes(32)
    assert _verify(ca, quote, collateral).status == "UpToDate"
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_oid(dcap.OID_TCG_DICE_TAGGED_EVIDENCE)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_oid(dcap.OID_DCAP_QUOTE)


def test_gramine_dice_evidence(ca: LabDcapCA, collateral: dcap_qvl.QuoteCollateralV3) -> None:
    enclave = ca.issue_enclave_cert(
        mrenclave=MRENCLAVE, mrsigner=MRSIGNER, layout="gramine", dice=True, now=NOW
    )
    cert = x509.load_der_x509_certificate(enclave.cert_der)
    tagged = cbor2.loads(_extension(cert, dcap.OID_TCG_DICE_TAGGED_EVIDENCE))
    assert isinstance(tagged, cbor2.CBORTag) and tagged.tag == 60000
    dice_quote, claims = tagged.value
    assert isinstance(dice_quote, bytes) and isinstance(claims, bytes)
    hash_entry = cbor2.loads(cbor2.loads(claims)["pubkey-hash"])
    assert hash_entry == [1, _spki_hash(cert)]
    report_data = _sgx_report(dice_quote).report_data
    assert report_data == hashlib.sha256(claims).digest() + bytes(32)
    assert _verify(ca, dice_quote, collateral).status == "UpToDate"
    legacy = _extension(cert, dcap.OID_GRAMINE_LEGACY_QUOTE)
    assert _sgx_report(legacy).report_data == _spki_hash(cert) + bytes(32)


def test_bad_evidence_options(ca: LabDcapCA) -> None:
    other = generate_client_key("ecdsa", 256).public_key()
    enclave = ca.issue_enclave_cert(
        mrenclave=MRENCLAVE,
        mrsigner=MRSIGNER,
        report_data_override=report_data_for_key(other),
        debug=True,
        now=NOW,
    )
    report = _sgx_report(enclave.quote)
    key = enclave.private_key.public_key()
    assert report.report_data != report_data_for_key(key)
    assert report.attributes[0] & 0x02
    with pytest.raises(ValueError, match="DICE"):
        ca.issue_enclave_cert(mrenclave=MRENCLAVE, mrsigner=MRSIGNER, dice=True)
    with pytest.raises(ValueError):
        ca.issue_enclave_cert(mrenclave=MRENCLAVE[:31], mrsigner=MRSIGNER)
    with pytest.raises(ValueError):
        ca.platform("Fine")


# --- storage ---


def test_save_load_and_revocations_persist(tmp_path: Path) -> None:
    created = LabDcapCA.create(tmp_path, NOW)
    for name in (dcap.ROOT_KEY_FILE, dcap.PCK_CA_KEY_FILE, dcap.TCB_SIGNING_KEY_FILE):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert "LAB" in (tmp_path / dcap.README_FILE).read_text()
    with pytest.raises(FileExistsError):
        LabDcapCA.create(tmp_path, NOW)
    platform = created.platform(now=NOW, revoked=True)
    loaded = LabDcapCA.load(tmp_path)
    assert loaded.root_der == created.root_der
    assert loaded.revoked_serials == [platform.pck_cert.serial_number]
    bundle = dcap_qvl.QuoteCollateralV3.from_json(loaded.collateral_json(NOW))
    with pytest.raises(ValueError, match="CertRevoked"):
        _verify(loaded, _quote(platform), bundle)
    (tmp_path / dcap.REVOKED_FILE).write_text("not-hex\n")
    with pytest.raises(ValueError, match="hex serial"):
        LabDcapCA.load(tmp_path)


# --- CLI ---


@pytest.fixture
def main(monkeypatch: pytest.MonkeyPatch) -> Main:
    monkeypatch.setattr(seng_fw.cli, "_COMMAND_MODULES", ("seng_fw.lab.cli",))
    monkeypatch.setattr(seng_fw.lab.cli, "_LAB_COMMAND_MODULES", ("seng_fw.lab.ca_cli",))
    return seng_fw.cli.main


def _enclave_argv(ca_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "lab", "enclave-cert", "--ca", str(ca_dir), "--evidence", "dcap",
        "--mrenclave", MRENCLAVE.hex(), "--mrsigner", MRSIGNER.hex(), "--out", str(out), *extra,
    ]  # fmt: skip


def _load_collateral(path: Path) -> dcap_qvl.QuoteCollateralV3:
    return dcap_qvl.QuoteCollateralV3.from_json(path.read_text())


def test_cli_init_collateral_and_dcap_enclave_certs(main: Main, tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    assert main(["lab", "ca", "init", str(ca_dir)]) == 0
    assert (ca_dir / "lab-attestation-root.pem").exists()  # the EPID flavour too
    ca = LabDcapCA.load(ca_dir)
    out = tmp_path / "ood"
    assert main(_enclave_argv(ca_dir, out, "--tcb-status", "OutOfDate")) == 0
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    quote = _extension(cert, dcap.OID_DCAP_QUOTE)
    assert quote == (out / "quote.bin").read_bytes()
    bundle_path = tmp_path / "collateral.json"
    assert main(["lab", "ca", "collateral", "--ca", str(ca_dir), "--out", str(bundle_path)]) == 0
    assert _verify(ca, quote, _load_collateral(bundle_path)).status == "OutOfDate"

    gramine = tmp_path / "gramine"
    assert main(_enclave_argv(ca_dir, gramine, "--layout", "gramine", "--dice")) == 0
    cert = x509.load_der_x509_certificate((gramine / "cert.der").read_bytes())
    _extension(cert, dcap.OID_TCG_DICE_TAGGED_EVIDENCE)
    legacy = _extension(cert, dcap.OID_GRAMINE_LEGACY_QUOTE)
    assert _verify(ca, legacy, _load_collateral(bundle_path)).status == "UpToDate"

    # A revoked PCK: refused once the collateral is rewritten.
    revoked = tmp_path / "revoked"
    assert main(_enclave_argv(ca_dir, revoked, "--revoked-pck")) == 0
    quote = (revoked / "quote.bin").read_bytes()
    assert _verify(ca, quote, _load_collateral(bundle_path)).status == "UpToDate"
    assert main(["lab", "ca", "collateral", "--ca", str(ca_dir), "--out", str(bundle_path)]) == 0
    with pytest.raises(ValueError, match="CertRevoked"):
        _verify(ca, quote, _load_collateral(bundle_path))

    # revoke-pck does the same for an existing platform.
    chain = out / "pck-chain.pem"
    assert main(["lab", "ca", "revoke-pck", "--ca", str(ca_dir), str(chain)]) == 0
    assert main(["lab", "ca", "collateral", "--ca", str(ca_dir), "--out", str(bundle_path)]) == 0
    with pytest.raises(ValueError, match="CertRevoked"):
        _verify(ca, (out / "quote.bin").read_bytes(), _load_collateral(bundle_path))


def test_cli_wrong_report_data_and_expired_collateral(main: Main, tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    assert main(["lab", "ca", "init", "--dcap", str(ca_dir)]) == 0
    assert not (ca_dir / "lab-attestation-root.pem").exists()
    out = tmp_path / "wrong"
    assert main(_enclave_argv(ca_dir, out, "--wrong-report-data")) == 0
    cert = x509.load_der_x509_certificate((out / "cert.der").read_bytes())
    report = dcap_qvl.parse_quote((out / "quote.bin").read_bytes()).report
    assert report.report_data != report_data_for_key(cert.public_key())  # type: ignore[arg-type]
    old = tmp_path / "old.json"
    argv = ["lab", "ca", "collateral", "--ca", str(ca_dir), "--out", str(old)]
    at = (NOW - timedelta(days=10)).isoformat()
    assert main([*argv, "--at", at, "--valid-days", "5"]) == 0
    quote = (out / "quote.bin").read_bytes()
    with pytest.raises(ValueError, match=r"(?i)expired"):
        _verify(LabDcapCA.load(ca_dir), quote, _load_collateral(old))


@pytest.mark.parametrize(
    "extra",
    [
        ["--status", "OK"],
        ["--encoding", "2018"],
        ["--layout", "sgx-ra-tls", "--dice"],
    ],
    ids=["epid-status", "epid-encoding", "dice-needs-gramine"],
)
def test_cli_dcap_usage_errors(main: Main, tmp_path: Path, extra: list[str]) -> None:
    LabDcapCA.create(tmp_path / "ca", NOW)
    assert main(_enclave_argv(tmp_path / "ca", tmp_path / "out", *extra)) == 2
    assert not (tmp_path / "out").exists()


def test_cli_dcap_needs_a_dcap_ca(main: Main, tmp_path: Path) -> None:
    assert main(["lab", "ca", "init", "--epid", str(tmp_path / "ca")]) == 0
    assert main(_enclave_argv(tmp_path / "ca", tmp_path / "out")) == 2
    argv = ["lab", "ca", "collateral", "--ca", str(tmp_path / "ca"), "--out", "x"]
    assert main(argv) == 2
    epid = ["lab", "enclave-cert", "--ca", str(tmp_path / "ca"), "--tcb-status", "UpToDate"]
    epid += ["--mrenclave", MRENCLAVE.hex(), "--mrsigner", MRSIGNER.hex(), "--out", "y"]
    assert main(epid) == 2  # DCAP options without --evidence dcap


# --- the emulator's Gramine quote source ---


def _fake_attestation(
    directory: Path, quote: bytes, attestation_type: str | None = "dcap"
) -> GramineAttestation:
    """A directory shaped like Gramine's /dev/attestation, with the quote its QE would give."""
    directory.mkdir(exist_ok=True)
    (directory / "user_report_data").write_bytes(bytes(64))
    (directory / "quote").write_bytes(quote)
    if attestation_type is not None:
        (directory / "attestation_type").write_text(attestation_type + "\n")
    return GramineAttestation(directory)


def test_gramine_quote_source_builds_a_verifiable_certificate(
    ca: LabDcapCA, collateral: dcap_qvl.QuoteCollateralV3, tmp_path: Path
) -> None:
    key = generate_client_key("ecdsa", 384)
    report_data = dcap.gramine_report_data(key.public_key())
    quote = _quote(ca.platform(now=NOW), report_data=report_data)
    attestation = _fake_attestation(tmp_path, quote)
    cert = x509.load_der_x509_certificate(attestation.ratls_certificate(key))
    assert (tmp_path / "user_report_data").read_bytes() == report_data  # what Gramine was told
    assert _extension(cert, dcap.OID_GRAMINE_LEGACY_QUOTE) == quote
    assert cert.public_key() == key.public_key()
    assert _verify(ca, quote, collateral).status == "UpToDate"
    assert _sgx_report(quote).report_data == _spki_hash(cert) + bytes(32)


@pytest.mark.parametrize("problem", ["epid", "no-user-report-data", "no-quote", "empty-quote"])
def test_gramine_quote_source_failures(tmp_path: Path, problem: str) -> None:
    attestation = _fake_attestation(
        tmp_path,
        b"" if problem == "empty-quote" else b"quote",
        "epid" if problem == "epid" else None,
    )
    if problem == "no-user-report-data":
        (tmp_path / "user_report_data").unlink()
    if problem == "no-quote":
        (tmp_path / "quote").unlink()
    with pytest.raises(EnclaveError, match="gramine attestation"):
        attestation.ratls_certificate(generate_client_key("ecdsa", 384))


def test_enclave_cli_gramine_credentials(ca: LabDcapCA, tmp_path: Path) -> None:
    from seng_fw.cli import UsageError
    from seng_fw.lab.run_cli import _client_credentials

    key = generate_client_key("ecdsa", 256)
    key_path = tmp_path / "key.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    quote = _quote(ca.platform(now=NOW), report_data=dcap.gramine_report_data(key.public_key()))
    _fake_attestation(tmp_path / "att", quote)
    args = argparse.Namespace(
        quote_source="gramine", cert=None, key=key_path, attestation_dir=tmp_path / "att",
        dice=False,
    )  # fmt: skip
    cert_der, key_pem = _client_credentials(args)
    assert key_pem == key_path.read_bytes()
    cert = x509.load_der_x509_certificate(cert_der)
    assert _extension(cert, dcap.OID_GRAMINE_LEGACY_QUOTE) == quote
    with pytest.raises(UsageError):
        _client_credentials(argparse.Namespace(**{**vars(args), "cert": key_path}))
    with pytest.raises(UsageError):
        _client_credentials(
            argparse.Namespace(**{**vars(args), "quote_source": "file", "cert": None})
        )


@pytest.mark.parametrize("encoding", ["der", "pem"])
def test_dtls_client_loads_a_dcap_certificate(ca: LabDcapCA, encoding: str) -> None:
    """A DER DCAP certificate contains PEM text (the PCK chain inside the quote): the DTLS
    client must still read it as DER, with its own key."""
    from seng_fw.ops.servercert import generate_server_certificate
    from seng_fw.tunnel.dtls import make_client_config

    enclave = ca.issue_enclave_cert(mrenclave=MRENCLAVE, mrsigner=MRSIGNER, now=NOW)
    assert b"-----BEGIN CERTIFICATE-----" in enclave.cert_der
    cert = enclave.cert_der if encoding == "der" else enclave.cert_pem
    server_cert, _ = generate_server_certificate("test gateway")
    make_client_config(cert, enclave.key_pem, server_cert)


def test_processor_ca_style_extension_parses_without_platform_fields() -> None:
    level = TCB_LEVELS[TcbStatus.UP_TO_DATE]
    der = dcap.sgx_extension(
        ppid=bytes(16),
        components=level.components,
        pce_svn=level.pce_svn,
        cpu_svn=level.components,
        pce_id=dcap.LAB_PCE_ID,
        fmspc=dcap.LAB_FMSPC,
        sgx_type=0,
        platform_instance_id=None,
    )
    values = _sgx_extension_values(der)
    assert f"{_SGX}.6" not in values and f"{_SGX}.7.1" not in values
    assert int(values[f"{_SGX}.5"]) == 0
    with pytest.raises(ValueError):
        dcap.sgx_extension(
            ppid=bytes(15), components=level.components, pce_svn=1,
            cpu_svn=level.components, pce_id=b"\0\0", fmspc=bytes(6),
        )  # fmt: skip
