"""IAS report verification: genuine Intel vectors, report parsing, policy and time."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from seng_fw.attest.ias import b64decode_strict, parse_report, parse_timestamp, verify_ias_report
from seng_fw.attest.identity import AttestationRejected, Check
from seng_fw.attest.policy import AttestationPolicy, load_root_certificates
from seng_fw.lab.ca import LabCA, make_quote, make_report

FIXTURES = Path(__file__).parent.parent / "fixtures" / "attest"
INTEL_ROOT = FIXTURES / "intel-ias-root-ca.pem"
INTEL_SIGNING = FIXTURES / "intel-ias-report-signing.pem"
V4_REPORT = FIXTURES / "ias-report-v4-sw-hardening-needed.json"
V4_SIG = FIXTURES / "ias-report-v4-sw-hardening-needed.sig"
V5_REPORT = FIXTURES / "ias-report-v5-sw-hardening-needed.json"
V5_SIG = FIXTURES / "ias-report-v5-sw-hardening-needed.sig"
V2_REPORT = FIXTURES / "ias-report-v2-group-out-of-date.json"
V2_SIG = FIXTURES / "ias-report-v2-group-out-of-date.sig"

# Inside the genuine signing certificate's validity (it expired 2026-11-20).
AS_OF_V4 = datetime(2020, 5, 11, 10, 0, tzinfo=UTC)
AS_OF_V5 = datetime(2023, 9, 28, tzinfo=UTC)
AS_OF_V2 = datetime(2018, 4, 1, tzinfo=UTC)


def _intel_policy(**overrides: object) -> AttestationPolicy:
    settings: dict[str, object] = {
        "roots": load_root_certificates([INTEL_ROOT.read_bytes()]),
        "allowed_statuses": frozenset({"OK", "SW_HARDENING_NEEDED"}),
        "allow_debug": True,  # the genuine enclave is a debug build
        "max_age": None,
    }
    settings.update(overrides)
    return AttestationPolicy(**settings)  # type: ignore[arg-type]


def _genuine(report: Path = V4_REPORT, sig: Path = V4_SIG) -> tuple[bytes, bytes, x509.Certificate]:
    signing = x509.load_pem_x509_certificate(INTEL_SIGNING.read_bytes())
    return report.read_bytes(), base64.b64decode(sig.read_bytes()), signing


def _rejected(check: str, *args: object, **kwargs: object) -> None:
    with pytest.raises(AttestationRejected) as exc:
        verify_ias_report(*args, **kwargs)  # type: ignore[arg-type]
    assert exc.value.check == check, exc.value


# --- genuine Intel vectors ---


def test_genuine_v4_report_verifies_as_of_2020() -> None:
    identity = verify_ias_report(*_genuine(), _intel_policy(), AS_OF_V4)
    assert identity.mrenclave.hex() == (
        "92143ea742e1628677b5a8e280173b7264470bfb0611d520c2474aab9846168e"
    )
    assert identity.mrsigner.hex() == (
        "9affcfae47b848ec2caf1c49b4b283531e1cc425f93582b36806e52a43d78d1a"
    )
    assert (identity.isv_prod_id, identity.isv_svn) == (0, 0)
    assert identity.debug is True
    assert identity.quote_status == "SW_HARDENING_NEEDED"
    assert identity.advisory_ids == ("INTEL-SA-00334",)
    assert identity.timestamp == datetime(2020, 5, 11, 9, 21, 15, 454051, tzinfo=UTC)
    assert len(identity.report_data) == 64


def test_genuine_v5_report_verifies_as_of_2023() -> None:
    identity = verify_ias_report(*_genuine(V5_REPORT, V5_SIG), _intel_policy(), AS_OF_V5)
    assert identity.advisory_ids == ("INTEL-SA-00334", "INTEL-SA-00615")
    assert identity.quote_status == "SW_HARDENING_NEEDED"


def test_genuine_v2_report_without_a_version_verifies_as_of_2018() -> None:
    """IAS API v2 (what the 2018 sgx-ra-tls of SENG clients requested): no "version"
    field, no advisories. Refused as malformed before ("report has no 'version'")."""
    assert b'"version"' not in V2_REPORT.read_bytes()
    policy = _intel_policy(allowed_statuses=frozenset({"OK", "GROUP_OUT_OF_DATE"}))
    identity = verify_ias_report(*_genuine(V2_REPORT, V2_SIG), policy, AS_OF_V2)
    assert identity.mrenclave.hex() == (
        "83d1607d933a8f1970fa30ac94cdb6921fd8ffb8414650af06fe63c008a4a9af"
    )
    assert identity.mrsigner.hex() == (
        "83d719e77deaca1470f6baf62a4d774303c899db69020f9c70ee1dfc08c7ce9e"
    )
    assert identity.quote_status == "GROUP_OUT_OF_DATE" and identity.advisory_ids == ()
    assert identity.timestamp == datetime(2018, 3, 30, 22, 2, 25, 579777, tzinfo=UTC)
    assert parse_report(V2_REPORT.read_bytes()).version == 2
    # The signature covers the body as sent: the same report with a version is not Intel's.
    tampered = V2_REPORT.read_bytes().replace(b'{"id"', b'{"version":3,"id"')
    _rejected("bad_signature", tampered, *_genuine(V2_REPORT, V2_SIG)[1:], policy, AS_OF_V2)


def test_v2_report_carries_only_v2_fields_and_statuses(lab: LabCA) -> None:
    for status, advisories in (("OK", ("INTEL-SA-00334",)), ("SW_HARDENING_NEEDED", ())):
        fields = json.loads(_lab_report(version=4, status=status, advisory_ids=advisories))
        del fields["version"]
        with pytest.raises(AttestationRejected) as exc:
            parse_report(json.dumps(fields).encode())
        assert exc.value.check == "malformed_report"
        assert "IAS API v2" in exc.value.message
    report = _lab_report(version=None, status="GROUP_OUT_OF_DATE")
    identity = verify_ias_report(
        report,
        lab.sign_report(report),
        lab.signing_cert,
        _lab_policy(lab, allowed_statuses=frozenset({"OK", "GROUP_OUT_OF_DATE"})),
    )
    assert identity.quote_status == "GROUP_OUT_OF_DATE"


def test_untrusted_signing_cert_message_names_subject_and_issuer(lab: LabCA) -> None:
    with pytest.raises(AttestationRejected) as exc:
        verify_ias_report(*_genuine(), _lab_policy(lab), AS_OF_V4)
    assert exc.value.check == "untrusted_root"
    assert "subject CN=Intel SGX Attestation Report Signing," in exc.value.message
    assert "issuer CN=Intel SGX Attestation Report Signing CA," in exc.value.message


def test_genuine_report_rejected_today_because_intel_signing_cert_expired() -> None:
    today = datetime(2026, 11, 22, tzinfo=UTC)
    _rejected("signing_cert_expired", *_genuine(), _intel_policy(), today)
    _rejected("signing_cert_expired", *_genuine(), _intel_policy())  # default: now


def test_genuine_report_before_signing_cert_was_issued() -> None:
    before = datetime(2016, 11, 20, tzinfo=UTC)
    _rejected("signing_cert_not_yet_valid", *_genuine(), _intel_policy(), before)


def test_genuine_report_before_the_root_existed() -> None:
    _rejected("root_not_yet_valid", *_genuine(), _intel_policy(), datetime(2016, 1, 1, tzinfo=UTC))


def test_genuine_report_default_policy_rejects_its_status() -> None:
    policy = _intel_policy(allowed_statuses=frozenset({"OK"}))
    _rejected("quote_status", *_genuine(), policy, AS_OF_V4)


def test_genuine_report_debug_enclave_rejected_unless_allowed() -> None:
    _rejected("debug_enclave", *_genuine(), _intel_policy(allow_debug=False), AS_OF_V4)


def test_genuine_report_age_is_checked() -> None:
    policy = _intel_policy(max_age=timedelta(hours=1))
    assert verify_ias_report(*_genuine(), policy, AS_OF_V4)  # 39 minutes old
    _rejected("report_too_old", *_genuine(), policy, AS_OF_V4 + timedelta(hours=1))


def test_genuine_report_with_one_byte_changed() -> None:
    report, signature, signing = _genuine()
    tampered = report.replace(b'"version":4', b'"version":5')
    _rejected("bad_signature", tampered, signature, signing, _intel_policy(), AS_OF_V4)


def test_genuine_report_with_trailing_newline_is_not_what_was_signed() -> None:
    report, signature, signing = _genuine()
    _rejected("bad_signature", report + b"\n", signature, signing, _intel_policy(), AS_OF_V4)


def test_genuine_report_with_tampered_signature() -> None:
    report, signature, signing = _genuine()
    flipped = bytes([signature[0] ^ 0x01]) + signature[1:]
    _rejected("bad_signature", report, flipped, signing, _intel_policy(), AS_OF_V4)
    _rejected("bad_signature", report, signature[:-1], signing, _intel_policy(), AS_OF_V4)


def test_genuine_report_against_a_lab_root() -> None:
    lab = LabCA.generate()
    policy = _intel_policy(roots=(lab.root_cert,))
    _rejected("untrusted_root", *_genuine(), policy, AS_OF_V4)


def test_intel_root_is_not_accepted_as_a_report_signing_cert() -> None:
    report, signature, _ = _genuine()
    root = x509.load_pem_x509_certificate(INTEL_ROOT.read_bytes())
    _rejected("malformed_signing_cert", report, signature, root, _intel_policy(), AS_OF_V4)


# --- reports made by the lab CA (same format, lab trust anchor) ---


@pytest.fixture(scope="module")
def lab() -> LabCA:
    return LabCA.generate()


def _lab_policy(lab: LabCA, **overrides: object) -> AttestationPolicy:
    settings: dict[str, object] = {"roots": (lab.root_cert,)}
    settings.update(overrides)
    return AttestationPolicy(**settings)  # type: ignore[arg-type]


def _lab_report(**kwargs: object) -> bytes:
    quote = make_quote(mrenclave=bytes(32), mrsigner=bytes(32), report_data=bytes(64))
    return make_report(quote, **kwargs)  # type: ignore[arg-type]


def test_lab_report_verifies(lab: LabCA) -> None:
    report = _lab_report()
    signature = lab.sign_report(report)
    identity = verify_ias_report(report, signature, lab.signing_cert, _lab_policy(lab))
    assert identity.quote_status == "OK"


@pytest.mark.parametrize("version", [3, 4, 5])
def test_supported_report_versions(lab: LabCA, version: int) -> None:
    report = _lab_report(version=version)
    verify_ias_report(report, lab.sign_report(report), lab.signing_cert, _lab_policy(lab))


@pytest.mark.parametrize("version", [1, 2, 6, 99])
def test_unsupported_report_versions(lab: LabCA, version: int) -> None:
    report = _lab_report(version=version)
    _rejected("report_version", report, lab.sign_report(report), lab.signing_cert, _lab_policy(lab))


def test_report_from_the_future(lab: LabCA) -> None:
    now = datetime.now(UTC)
    report = _lab_report(timestamp=now + timedelta(minutes=10))
    signed = (report, lab.sign_report(report), lab.signing_cert, _lab_policy(lab, max_age=None))
    _rejected("report_in_future", *signed, now)
    assert verify_ias_report(*signed, now + timedelta(minutes=6))  # within clock skew


def test_report_age_boundary() -> None:
    stamp = datetime.now(UTC) - timedelta(days=2)
    lab = LabCA.generate(now=stamp - timedelta(days=1))
    report = _lab_report(timestamp=stamp)
    policy = _lab_policy(lab, max_age=timedelta(hours=24))
    signed = (report, lab.sign_report(report), lab.signing_cert, policy)
    at = stamp + timedelta(hours=24)
    assert verify_ias_report(*signed, at)
    _rejected("report_too_old", *signed, at + timedelta(microseconds=1))


def test_naive_verification_time_is_a_programming_error(lab: LabCA) -> None:
    report = _lab_report()
    signed = (report, lab.sign_report(report), lab.signing_cert, _lab_policy(lab))
    with pytest.raises(ValueError):
        verify_ias_report(*signed, datetime(2030, 1, 1))


# --- strict report parsing ---


def _valid_fields() -> dict[str, object]:
    fields: dict[str, object] = json.loads(_lab_report(status="SW_HARDENING_NEEDED"))
    return fields


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("version", "4"),
        ("version", True),
        ("version", 4.0),
        ("id", 12345),
        ("timestamp", None),
        ("isvEnclaveQuoteStatus", ["OK"]),
        ("isvEnclaveQuoteBody", 1),
        ("advisoryIDs", "INTEL-SA-00334"),
        ("advisoryIDs", [334]),
        ("advisoryURL", False),
        ("platformInfoBlob", {}),
        ("revocationReason", "1"),
    ],
)
def test_report_field_of_the_wrong_type(field: str, value: object) -> None:
    fields = _valid_fields()
    fields[field] = value
    with pytest.raises(AttestationRejected) as exc:
        parse_report(json.dumps(fields).encode())
    assert exc.value.check == "malformed_report"


@pytest.mark.parametrize(
    "field", ["id", "timestamp", "isvEnclaveQuoteStatus", "isvEnclaveQuoteBody"]
)
def test_report_without_a_required_field(field: str) -> None:
    fields = _valid_fields()
    del fields[field]
    with pytest.raises(AttestationRejected) as exc:
        parse_report(json.dumps(fields).encode())
    assert exc.value.check == "malformed_report"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b'"report"',
        b"\xff\xfe{}",
        b'{"version": NaN}',
        b"[" * 100000 + b"]" * 100000,
        b'{"id":"1","id":"2","timestamp":"2020-05-11T09:21:15","version":4,'
        b'"isvEnclaveQuoteStatus":"OK","isvEnclaveQuoteBody":""}',
    ],
    ids=["empty", "truncated", "array", "string", "not-utf8", "nan", "deep", "duplicate-key"],
)
def test_report_that_is_not_a_plain_json_object(body: bytes) -> None:
    with pytest.raises(AttestationRejected) as exc:
        parse_report(body)
    assert exc.value.check == "malformed_report"


def test_unknown_report_fields_are_ignored() -> None:
    fields = _valid_fields()
    fields["someFutureField"] = {"x": 1}
    assert parse_report(json.dumps(fields).encode()).quote_status == "SW_HARDENING_NEEDED"


@pytest.mark.parametrize(
    "body",
    [b"AAAA", base64.b64encode(bytes(431)), base64.b64encode(bytes(433))],
    ids=["short", "truncated", "oversized"],
)
def test_report_with_a_quote_of_the_wrong_size(body: bytes) -> None:
    fields = _valid_fields()
    fields["isvEnclaveQuoteBody"] = body.decode()
    with pytest.raises(AttestationRejected) as exc:
        parse_report(json.dumps(fields).encode())
    assert exc.value.check == "malformed_quote"


def test_report_with_non_canonical_quote_base64() -> None:
    fields = _valid_fields()
    body = str(fields["isvEnclaveQuoteBody"])
    fields["isvEnclaveQuoteBody"] = body[:100] + "\n" + body[100:]
    with pytest.raises(AttestationRejected) as exc:
        parse_report(json.dumps(fields).encode())
    assert exc.value.check == "malformed_quote"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2018-08-03T12:43:18.123456", datetime(2018, 8, 3, 12, 43, 18, 123456, tzinfo=UTC)),
        ("2018-08-03T12:43:18.12345", datetime(2018, 8, 3, 12, 43, 18, 123450, tzinfo=UTC)),
        ("2018-08-03T12:43:18.1", datetime(2018, 8, 3, 12, 43, 18, 100000, tzinfo=UTC)),
        ("2018-08-03T12:43:18", datetime(2018, 8, 3, 12, 43, 18, tzinfo=UTC)),
        ("2018-08-03T12:43:18.000001Z", datetime(2018, 8, 3, 12, 43, 18, 1, tzinfo=UTC)),
    ],
)
def test_ias_timestamps_are_utc(text: str, expected: datetime) -> None:
    assert parse_timestamp(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2018-08-03",
        "2018-08-03 12:43:18.123456",
        "2018-08-03T12:43:18.1234567",
        "2018-08-03T12:43:18+02:00",
        "2018-13-03T12:43:18",
        "2018-02-30T12:43:18",
        "2018-08-03T24:00:00",
        "٢٠١٨-08-03T12:43:18",
        "2018-08-03T12:43:18.123456\n",
    ],
)
def test_bad_timestamps(text: str) -> None:
    with pytest.raises(AttestationRejected) as exc:
        parse_timestamp(text)
    assert exc.value.check == "malformed_report"


# --- strict base64 ---


def test_canonical_base64() -> None:
    assert b64decode_strict("QQ==", Check.MALFORMED_EXTENSION) == b"A"
    assert b64decode_strict(b"", Check.MALFORMED_EXTENSION) == b""


@pytest.mark.parametrize(
    "text", ["QR==", "QQ", "QQ=", "QQ===", "Q Q==", "QQ==\n", "QQ-_", "Ã", "QQ==QQ=="]
)
def test_non_canonical_base64(text: str) -> None:
    with pytest.raises(AttestationRejected) as exc:
        b64decode_strict(text, Check.MALFORMED_EXTENSION)
    assert exc.value.check == "malformed_extension"


# --- policy construction ---


def test_policy_needs_a_root() -> None:
    with pytest.raises(ValueError):
        AttestationPolicy(roots=())


@pytest.mark.parametrize("status", ["GROUP_REVOKED", "SIGNATURE_INVALID", "KEY_REVOKED", "ok"])
def test_policy_refuses_statuses_that_are_never_acceptable(lab: LabCA, status: str) -> None:
    with pytest.raises(ValueError):
        AttestationPolicy(roots=(lab.root_cert,), allowed_statuses=frozenset({"OK", status}))


def test_policy_refuses_a_non_ca_root(lab: LabCA) -> None:
    with pytest.raises(ValueError):
        AttestationPolicy(roots=(lab.signing_cert,))


def test_policy_refuses_a_non_positive_max_age(lab: LabCA) -> None:
    with pytest.raises(ValueError):
        AttestationPolicy(roots=(lab.root_cert,), max_age=timedelta(0))


def test_load_root_certificates_reads_several_pems(lab: LabCA) -> None:
    roots = load_root_certificates([INTEL_ROOT.read_bytes() + lab.root_pem, lab.root_pem])
    assert len(roots) == 3
    with pytest.raises(ValueError):
        load_root_certificates([b"not a certificate"])
