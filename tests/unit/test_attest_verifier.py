"""`IasVerifier` on RA-TLS client certificates: lab CA round trips and one test per rejection.

Every rejection test asserts the name of the failed check, so removing that check makes the
test fail (the certificate would be accepted, or rejected by another check).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pyasn1.codec.der import decoder, encoder
from pyasn1.type import univ
from pyasn1_modules import rfc5280

from seng_fw.attest import AttestationPolicy, AttestationRejected, EvidenceVerifier, IasVerifier
from seng_fw.attest.policy import ACCEPTABLE_STATUSES
from seng_fw.attest.ratls import (
    EVIDENCE_OIDS,
    OID_IAS_CA_CERT,
    OID_IAS_REPORT,
    OID_IAS_SIGNATURE,
    OID_IAS_SIGNING_CERT,
    EvidenceEncoding,
    encode_evidence,
    parse_ratls_certificate,
    report_data_for_key,
)
from seng_fw.lab.ca import (
    QUOTE_STATUSES,
    ClientPrivateKey,
    EnclaveCert,
    LabCA,
    build_ratls_certificate,
    generate_client_key,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "attest"
MRENCLAVE = bytes.fromhex("5a" * 32)
MRSIGNER = bytes.fromhex("a5" * 32)
KEYS = [("ecdsa", 384), ("ecdsa", 256), ("rsa", 2048), ("rsa", 3072)]
ENCODINGS = [EvidenceEncoding.V2018, EvidenceEncoding.V2019]


@cache
def _key(key_type: str, size: int) -> ClientPrivateKey:
    return generate_client_key(key_type, size)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ca() -> LabCA:
    return LabCA.generate()


@pytest.fixture(scope="module")
def verifier(ca: LabCA) -> IasVerifier:
    return IasVerifier(AttestationPolicy(roots=(ca.root_cert,)))


def _issue(ca: LabCA, **kwargs: object) -> EnclaveCert:
    settings: dict[str, object] = {
        "mrenclave": MRENCLAVE,
        "mrsigner": MRSIGNER,
        "private_key": _key("ecdsa", 384),
    }
    settings.update(kwargs)
    return ca.issue_enclave_cert(**settings)  # type: ignore[arg-type]


def _rebuild(
    ca: LabCA,
    enclave: EnclaveCert,
    *,
    report: bytes | None = None,
    signature: bytes | None = None,
    signing_cert: x509.Certificate | None = None,
    ca_cert: x509.Certificate | None = None,
    replace: dict[x509.ObjectIdentifier, bytes | None] | None = None,
) -> bytes:
    """The certificate of `enclave` with some evidence swapped (same key, self-signed)."""
    report = enclave.report if report is None else report
    signature = enclave.signature if signature is None else signature
    evidence = encode_evidence(
        enclave.encoding,
        report,
        base64.b64encode(signature),
        signing_cert or ca.signing_cert,
        ca_cert or ca.root_cert,
    )
    for oid, value in (replace or {}).items():
        if value is None:
            del evidence[oid]
        else:
            evidence[oid] = value
    return build_ratls_certificate(enclave.private_key, evidence)


def _signed_report(ca: LabCA, enclave: EnclaveCert, report: bytes) -> bytes:
    """`enclave`'s certificate with `report` in it, properly signed by the lab CA."""
    return _rebuild(ca, enclave, report=report, signature=ca.sign_report(report))


def _check(verifier: IasVerifier, cert_der: bytes, at: datetime | None = None) -> str:
    with pytest.raises(AttestationRejected) as exc:
        verifier.verify_certificate(cert_der, at)
    return str(exc.value.check)


# --- round trips ---


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(("key_type", "key_size"), KEYS)
def test_round_trip(
    ca: LabCA, verifier: IasVerifier, encoding: EvidenceEncoding, key_type: str, key_size: int
) -> None:
    key = _key(key_type, key_size)
    enclave = _issue(ca, private_key=key, encoding=encoding, isv_prod_id=7, isv_svn=3)
    identity = verifier.verify_certificate(enclave.cert_der)
    assert identity.mrenclave == MRENCLAVE
    assert identity.mrsigner == MRSIGNER
    assert (identity.isv_prod_id, identity.isv_svn) == (7, 3)
    assert identity.debug is False
    assert identity.quote_status == "OK"
    assert identity.advisory_ids == ()
    assert identity.report_data == report_data_for_key(key.public_key())
    assert abs(identity.timestamp - datetime.now(UTC)) < timedelta(minutes=1)
    assert parse_ratls_certificate(enclave.cert_der).encoding is encoding


def test_report_data_is_computed_as_sgx_ra_tls_does() -> None:
    rsa_key = _key("rsa", 2048).public_key()
    assert isinstance(rsa_key, rsa.RSAPublicKey)
    pkcs1 = rsa_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    assert pkcs1[0] == 0x30  # RSAPublicKey SEQUENCE, not SubjectPublicKeyInfo
    assert report_data_for_key(rsa_key) == hashlib.sha256(pkcs1).digest() + bytes(32)

    ec_key = _key("ecdsa", 384).public_key()
    assert isinstance(ec_key, ec.EllipticCurvePublicKey)
    numbers = ec_key.public_numbers()
    point = b"\x04" + numbers.x.to_bytes(48, "big") + numbers.y.to_bytes(48, "big")
    assert report_data_for_key(ec_key) == hashlib.sha256(point).digest() + bytes(32)


def test_verifier_is_an_evidence_verifier(verifier: IasVerifier) -> None:
    checked: EvidenceVerifier = verifier
    assert checked is verifier


# --- trust anchor and signing certificate ---


def test_wrong_root(ca: LabCA) -> None:
    other = LabCA.generate()
    enclave = _issue(ca)
    assert _check(IasVerifier(AttestationPolicy(roots=(other.root_cert,))), enclave.cert_der) == (
        "untrusted_root"
    )


def test_intel_root_does_not_trust_the_lab(ca: LabCA) -> None:
    intel = x509.load_pem_x509_certificate((FIXTURES / "intel-ias-root-ca.pem").read_bytes())
    verifier = IasVerifier(AttestationPolicy(roots=(intel,)))
    assert _check(verifier, _issue(ca).cert_der) == "untrusted_root"


def test_ca_cert_in_the_certificate_is_not_a_trust_anchor(ca: LabCA) -> None:
    # The attacker's own CA sits in extension .3 and signed the report: still untrusted.
    rogue = LabCA.generate()
    enclave = _issue(rogue)
    verifier = IasVerifier(AttestationPolicy(roots=(ca.root_cert,)))
    assert _check(verifier, enclave.cert_der) == "untrusted_root"


def test_several_roots(ca: LabCA) -> None:
    other = LabCA.generate()
    verifier = IasVerifier(AttestationPolicy(roots=(other.root_cert, ca.root_cert)))
    assert verifier.verify_certificate(_issue(ca).cert_der).quote_status == "OK"
    assert verifier.verify_certificate(_issue(other).cert_der).quote_status == "OK"


def test_ca_cert_extension_must_be_a_configured_root(ca: LabCA, verifier: IasVerifier) -> None:
    other = LabCA.generate()
    enclave = _issue(ca)
    cert = _rebuild(ca, enclave, ca_cert=other.root_cert)
    assert _check(verifier, cert) == "ca_cert_mismatch"


def test_expired_signing_cert(ca: LabCA, verifier: IasVerifier) -> None:
    now = datetime.now(UTC)
    expired = ca.with_signing_validity(now - timedelta(days=400), now - timedelta(minutes=1))
    enclave = _issue(expired)
    assert _check(verifier, enclave.cert_der) == "signing_cert_expired"
    # The same certificate checked as of a time when the signing certificate was valid.
    assert verifier.verify_certificate(enclave.cert_der, now - timedelta(minutes=2))


def test_not_yet_valid_signing_cert(ca: LabCA, verifier: IasVerifier) -> None:
    now = datetime.now(UTC)
    future = ca.with_signing_validity(now + timedelta(days=1), now + timedelta(days=400))
    assert _check(verifier, _issue(future).cert_der) == "signing_cert_not_yet_valid"


def test_expired_root(ca: LabCA, verifier: IasVerifier) -> None:
    at = ca.root_cert.not_valid_after_utc + timedelta(seconds=1)
    assert _check(verifier, _issue(ca).cert_der, at) == "root_expired"


def test_signing_cert_issued_by_another_key_with_the_same_name(
    ca: LabCA, verifier: IasVerifier
) -> None:
    # Same issuer name as the trusted root, but signed by an impostor key.
    impostor_root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = (
        x509.CertificateBuilder()
        .subject_name(ca.signing_cert.subject)
        .issuer_name(ca.root_cert.subject)
        .public_key(ca.signing_key.public_key())
        .serial_number(1)
        .not_valid_before(ca.signing_cert.not_valid_before_utc)
        .not_valid_after(ca.signing_cert.not_valid_after_utc)
        .sign(impostor_root_key, hashes.SHA256())
    )
    cert = _rebuild(ca, _issue(ca), signing_cert=forged)
    assert _check(verifier, cert) == "untrusted_root"


def _signing_cert(
    ca: LabCA,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    """A report-signing certificate for `key`, properly issued by the lab root."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(ca.signing_cert.subject)
        .issuer_name(ca.root_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ca.signing_cert.not_valid_before_utc)
        .not_valid_after(ca.signing_cert.not_valid_after_utc)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    return builder.sign(ca.root_key, hashes.SHA256())


def _usage(**flags: bool) -> x509.KeyUsage:
    names = [
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    ]
    return x509.KeyUsage(**{name: flags.get(name, False) for name in names})


@pytest.mark.parametrize(
    "extensions",
    [
        [(x509.BasicConstraints(ca=True, path_length=None), True)],
        [(_usage(key_encipherment=True), True)],
        [(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.2"), b"\0"), True)],
    ],
    ids=["is-a-ca", "may-not-sign", "unknown-critical-extension"],
)
def test_unusable_report_signing_certificate(
    ca: LabCA, verifier: IasVerifier, extensions: list[tuple[x509.ExtensionType, bool]]
) -> None:
    signing = _signing_cert(ca, ca.signing_key, extensions)
    cert = _rebuild(ca, _issue(ca), signing_cert=signing)
    assert _check(verifier, cert) == "malformed_signing_cert"


def test_custom_signing_certificate_shape_is_accepted(ca: LabCA, verifier: IasVerifier) -> None:
    # Guards the test above: the same construction without the defect verifies.
    signing = _signing_cert(ca, ca.signing_key, [(_usage(digital_signature=True), True)])
    assert verifier.verify_certificate(_rebuild(ca, _issue(ca), signing_cert=signing))


@pytest.mark.parametrize(
    "key",
    [
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
        lambda: ec.generate_private_key(ec.SECP256R1()),
    ],
    ids=["rsa-1024", "ecdsa"],
)
def test_weak_or_non_rsa_report_signing_key(
    ca: LabCA, verifier: IasVerifier, key: Callable[[], rsa.RSAPrivateKey]
) -> None:
    signing = _signing_cert(ca, key(), [])
    cert = _rebuild(ca, _issue(ca), signing_cert=signing)
    assert _check(verifier, cert) == "malformed_signing_cert"


# --- report and signature ---


def test_tampered_report_byte(ca: LabCA, verifier: IasVerifier) -> None:
    enclave = _issue(ca)
    index = enclave.report.index(b'"isvEnclaveQuoteBody":"') + 40
    tampered = bytearray(enclave.report)
    tampered[index] = ord("B") if tampered[index] != ord("B") else ord("C")
    assert _check(verifier, _rebuild(ca, enclave, report=bytes(tampered))) == "bad_signature"


def test_tampered_signature(ca: LabCA, verifier: IasVerifier) -> None:
    enclave = _issue(ca)
    signature = bytearray(enclave.signature)
    signature[-1] ^= 0x80
    assert _check(verifier, _rebuild(ca, enclave, signature=bytes(signature))) == "bad_signature"


def test_report_signed_by_the_root_instead_of_the_signing_key(
    ca: LabCA, verifier: IasVerifier
) -> None:
    enclave = _issue(ca)
    signature = ca.root_key.sign(enclave.report, padding.PKCS1v15(), hashes.SHA256())
    assert _check(verifier, _rebuild(ca, enclave, signature=signature)) == "bad_signature"


def test_report_data_of_another_key(ca: LabCA, verifier: IasVerifier) -> None:
    other = _key("ecdsa", 256).public_key()
    enclave = _issue(ca, report_data_override=report_data_for_key(other))
    assert _check(verifier, enclave.cert_der) == "report_data_mismatch"


def test_report_data_with_a_non_zero_tail(ca: LabCA, verifier: IasVerifier) -> None:
    key = _key("ecdsa", 384)
    report_data = report_data_for_key(key.public_key())[:32] + b"\x01" * 32
    enclave = _issue(ca, private_key=key, report_data_override=report_data)
    assert _check(verifier, enclave.cert_der) == "report_data_mismatch"


def test_quote_of_one_certificate_replayed_with_another_key(
    ca: LabCA, verifier: IasVerifier
) -> None:
    # Evidence copied from a genuine client certificate into one with the attacker's key.
    victim = _issue(ca, private_key=_key("rsa", 2048))
    attacker_key = _key("ecdsa", 384)
    stolen = {
        ext.oid: ext.value.value  # type: ignore[attr-defined]
        for ext in _extensions(victim.cert_der, EVIDENCE_OIDS)
    }
    assert _check(verifier, build_ratls_certificate(attacker_key, stolen)) == (
        "report_data_mismatch"
    )


def test_debug_enclave_rejected_unless_allowed(ca: LabCA, verifier: IasVerifier) -> None:
    enclave = _issue(ca, debug=True)
    assert _check(verifier, enclave.cert_der) == "debug_enclave"
    permissive = IasVerifier(AttestationPolicy(roots=(ca.root_cert,), allow_debug=True))
    assert permissive.verify_certificate(enclave.cert_der).debug is True


@pytest.mark.parametrize("status", sorted(ACCEPTABLE_STATUSES - {"OK"}))
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_non_ok_status_rejected_by_default_accepted_when_configured(
    ca: LabCA, verifier: IasVerifier, status: str, encoding: EvidenceEncoding
) -> None:
    enclave = _issue(ca, status=status, encoding=encoding)
    assert _check(verifier, enclave.cert_der) == "quote_status"
    allowing = IasVerifier(
        AttestationPolicy(roots=(ca.root_cert,), allowed_statuses=frozenset({"OK", status}))
    )
    identity = allowing.verify_certificate(enclave.cert_der)
    assert identity.quote_status == status
    if encoding is EvidenceEncoding.V2019:  # API v4 reports carry the advisories
        assert identity.advisory_ids
        assert identity.to_json()["advisory_ids"] == list(identity.advisory_ids)


@pytest.mark.parametrize("status", sorted(set(QUOTE_STATUSES) - ACCEPTABLE_STATUSES))
def test_statuses_that_are_never_acceptable(ca: LabCA, status: str) -> None:
    lenient = IasVerifier(
        AttestationPolicy(roots=(ca.root_cert,), allowed_statuses=ACCEPTABLE_STATUSES)
    )
    assert _check(lenient, _issue(ca, status=status).cert_der) == "quote_status"


def test_one_allowed_status_does_not_allow_another(ca: LabCA) -> None:
    allowing = IasVerifier(
        AttestationPolicy(
            roots=(ca.root_cert,), allowed_statuses=frozenset({"OK", "SW_HARDENING_NEEDED"})
        )
    )
    assert _check(allowing, _issue(ca, status="GROUP_OUT_OF_DATE").cert_der) == "quote_status"


def test_stale_report(ca: LabCA, verifier: IasVerifier) -> None:
    old = _issue(ca, timestamp=datetime.now(UTC) - timedelta(hours=25))
    assert _check(verifier, old.cert_der) == "report_too_old"
    unlimited = IasVerifier(AttestationPolicy(roots=(ca.root_cert,), max_age=None))
    assert unlimited.verify_certificate(old.cert_der)
    hourly = IasVerifier(AttestationPolicy(roots=(ca.root_cert,), max_age=timedelta(hours=1)))
    fresh = _issue(ca, timestamp=datetime.now(UTC) - timedelta(minutes=30))
    assert hourly.verify_certificate(fresh.cert_der)
    assert _check(hourly, fresh.cert_der, datetime.now(UTC) + timedelta(minutes=31)) == (
        "report_too_old"
    )


def test_report_from_the_future(ca: LabCA, verifier: IasVerifier) -> None:
    future = _issue(ca, timestamp=datetime.now(UTC) + timedelta(hours=1))
    assert _check(verifier, future.cert_der) == "report_in_future"


def test_unsupported_report_version(ca: LabCA, verifier: IasVerifier) -> None:
    assert _check(verifier, _issue(ca, report_version=2).cert_der) == "report_version"


# --- malformed evidence ---


def _report_with(enclave: EnclaveCert, **changes: object) -> bytes:
    fields = json.loads(enclave.report)
    fields.update(changes)
    return json.dumps(fields, separators=(",", ":")).encode()


@pytest.mark.parametrize("size", [431, 433, 0])
def test_truncated_or_oversized_quote(ca: LabCA, verifier: IasVerifier, size: int) -> None:
    enclave = _issue(ca)
    quote = enclave.quote.to_bytes()
    body = quote[:size] if size <= len(quote) else quote + bytes(size - len(quote))
    report = _report_with(enclave, isvEnclaveQuoteBody=base64.b64encode(body).decode())
    assert _check(verifier, _signed_report(ca, enclave, report)) == "malformed_quote"


def test_non_canonical_quote_base64(ca: LabCA, verifier: IasVerifier) -> None:
    enclave = _issue(ca)
    body = base64.b64encode(enclave.quote.to_bytes()).decode()
    report = _report_with(enclave, isvEnclaveQuoteBody=body[:64] + "\n" + body[64:])
    assert _check(verifier, _signed_report(ca, enclave, report)) == "malformed_quote"


@pytest.mark.parametrize(
    "report",
    [b'{"id":"1",', b"not json", b"[]", b'{"version":4}'],
    ids=["truncated", "text", "array", "missing-fields"],
)
def test_signed_but_malformed_report_json(ca: LabCA, verifier: IasVerifier, report: bytes) -> None:
    # The 2019 encoding tells raw JSON by its "{"; 2018 (base64) carries any bytes.
    enclave = _issue(ca, encoding=EvidenceEncoding.V2018)
    assert _check(verifier, _signed_report(ca, enclave, report)) == "malformed_report"


def test_report_json_with_wrong_types(ca: LabCA, verifier: IasVerifier) -> None:
    enclave = _issue(ca)
    report = _report_with(enclave, version="4")
    assert _check(verifier, _signed_report(ca, enclave, report)) == "malformed_report"


@pytest.mark.parametrize("oid", EVIDENCE_OIDS, ids=lambda oid: oid.dotted_string)
def test_missing_extension(ca: LabCA, verifier: IasVerifier, oid: x509.ObjectIdentifier) -> None:
    enclave = _issue(ca)
    assert _check(verifier, _rebuild(ca, enclave, replace={oid: None})) == "missing_extension"


def test_certificate_without_any_evidence(verifier: IasVerifier) -> None:
    assert _check(verifier, build_ratls_certificate(_key("ecdsa", 384), {})) == (
        "missing_extension"
    )


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(
    ("oid", "mangle"),
    [
        (OID_IAS_SIGNATURE, lambda v: v[:64] + b"\n" + v[64:]),
        (OID_IAS_SIGNATURE, lambda v: v + b"\n"),
        (OID_IAS_SIGNATURE, lambda v: v.rstrip(b"=")),
        (OID_IAS_SIGNATURE, lambda v: v[:-1]),
        (OID_IAS_SIGNING_CERT, lambda v: v + b"\n\n"),
        (OID_IAS_SIGNING_CERT, lambda v: b"junk" + v),
        (OID_IAS_CA_CERT, lambda v: v[:-8]),
        (OID_IAS_CA_CERT, lambda v: v.replace(b"A", b"*", 1)),
    ],
    ids=[
        "sig-newline",
        "sig-trailing-newline",
        "sig-no-padding",
        "sig-truncated",
        "signing-cert-trailing",
        "signing-cert-leading-junk",
        "ca-truncated",
        "ca-bad-char",
    ],
)
def test_malformed_extension_values(
    ca: LabCA,
    verifier: IasVerifier,
    encoding: EvidenceEncoding,
    oid: x509.ObjectIdentifier,
    mangle: Callable[[bytes], bytes],
) -> None:
    enclave = _issue(ca, encoding=encoding)
    value = _evidence(enclave, encoding)[oid]
    cert = _rebuild(ca, enclave, replace={oid: mangle(value)})
    assert _check(verifier, cert) == "malformed_extension"


def test_malformed_2018_report_base64(ca: LabCA, verifier: IasVerifier) -> None:
    enclave = _issue(ca, encoding=EvidenceEncoding.V2018)
    value = _evidence(enclave, EvidenceEncoding.V2018)[OID_IAS_REPORT]
    cert = _rebuild(ca, enclave, replace={OID_IAS_REPORT: value + b"\n"})
    assert _check(verifier, cert) == "malformed_extension"


@pytest.mark.parametrize(("width", "newline"), [(64, b"\n"), (76, b"\r\n")])
def test_2018_values_wrapped_by_the_encoder_are_accepted(
    ca: LabCA, verifier: IasVerifier, width: int, newline: bytes
) -> None:
    # wolfSSL's Base64_Encode (and OpenSSL's BIO) wrap lines and end with a line break.
    enclave = _issue(ca, encoding=EvidenceEncoding.V2018)
    values = _evidence(enclave, EvidenceEncoding.V2018)

    def wrap(value: bytes) -> bytes:
        lines = [value[i : i + width] for i in range(0, len(value), width)]
        return newline.join(lines) + newline

    wrapped = {oid: wrap(values[oid]) for oid in (OID_IAS_REPORT, OID_IAS_SIGNING_CERT)}
    identity = verifier.verify_certificate(_rebuild(ca, enclave, replace=wrapped))
    assert identity.mrenclave == enclave.quote.mrenclave
    # Ragged wrapping is still refused.
    ragged = values[OID_IAS_REPORT][:50] + b"\n" + values[OID_IAS_REPORT][50:]
    cert = _rebuild(ca, enclave, replace={OID_IAS_REPORT: ragged})
    assert _check(verifier, cert) == "malformed_extension"


def test_mixed_encodings_are_refused(ca: LabCA, verifier: IasVerifier) -> None:
    # 2019 body (raw JSON) with 2018 certificates (base64 DER), and the reverse.
    enclave = _issue(ca, encoding=EvidenceEncoding.V2019)
    old = _evidence(enclave, EvidenceEncoding.V2018)
    cert = _rebuild(ca, enclave, replace={OID_IAS_SIGNING_CERT: old[OID_IAS_SIGNING_CERT]})
    assert _check(verifier, cert) == "malformed_extension"
    enclave18 = _issue(ca, encoding=EvidenceEncoding.V2018)
    new = _evidence(enclave18, EvidenceEncoding.V2019)
    cert = _rebuild(ca, enclave18, replace={OID_IAS_CA_CERT: new[OID_IAS_CA_CERT]})
    assert _check(verifier, cert) == "malformed_extension"


def test_two_pem_certificates_in_one_extension(ca: LabCA, verifier: IasVerifier) -> None:
    enclave = _issue(ca)
    pem = _evidence(enclave, EvidenceEncoding.V2019)[OID_IAS_SIGNING_CERT]
    cert = _rebuild(ca, enclave, replace={OID_IAS_SIGNING_CERT: pem + b"\n" + pem})
    assert _check(verifier, cert) == "malformed_extension"


def test_duplicate_extension(ca: LabCA, verifier: IasVerifier) -> None:
    enclave = _issue(ca)
    cert = _duplicate_extension(enclave.cert_der, enclave.private_key, OID_IAS_REPORT)
    assert _check(verifier, cert) == "duplicate_extension"


def test_unknown_critical_extension(ca: LabCA, verifier: IasVerifier) -> None:
    enclave = _issue(ca)
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    cert = build_ratls_certificate(
        enclave.private_key,
        _evidence(enclave, enclave.encoding),
        critical_extensions=(unknown,),
    )
    assert _check(verifier, cert) == "unknown_critical_extension"


def test_critical_evidence_extensions_are_understood(ca: LabCA, verifier: IasVerifier) -> None:
    enclave = _issue(ca)
    evidence = _evidence(enclave, enclave.encoding)
    signature = evidence.pop(OID_IAS_SIGNATURE)
    cert = build_ratls_certificate(
        enclave.private_key,
        evidence,
        critical_extensions=(x509.UnrecognizedExtension(OID_IAS_SIGNATURE, signature),),
    )
    assert verifier.verify_certificate(cert)


# --- the leaf certificate itself ---


def test_evidence_in_the_issuer_certificate_is_not_used(ca: LabCA, verifier: IasVerifier) -> None:
    # The Go server searched every certificate of the chain. Here the issuer holds valid
    # evidence for its own key, and the leaf (a key without evidence) is what is verified.
    issuer = _issue(ca)
    assert verifier.verify_certificate(issuer.cert_der)
    issuer_cert = x509.load_der_x509_certificate(issuer.cert_der)
    leaf_key = _key("ecdsa", 256)
    now = datetime.now(UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "leaf")]))
        .issuer_name(issuer_cert.subject)
        .public_key(leaf_key.public_key())
        .serial_number(2)
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(issuer.private_key, hashes.SHA256())
    )
    assert _check(verifier, leaf.public_bytes(serialization.Encoding.DER)) == "missing_extension"


def test_certificate_not_signed_by_its_own_key(ca: LabCA, verifier: IasVerifier) -> None:
    enclave = _issue(ca)
    source = x509.load_der_x509_certificate(enclave.cert_der)
    builder = (
        x509.CertificateBuilder()
        .subject_name(source.subject)
        .issuer_name(source.issuer)
        .public_key(enclave.private_key.public_key())
        .serial_number(3)
        .not_valid_before(source.not_valid_before_utc)
        .not_valid_after(source.not_valid_after_utc)
    )
    for ext in source.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    forged = builder.sign(_key("ecdsa", 256), hashes.SHA256())
    assert _check(verifier, forged.public_bytes(serialization.Encoding.DER)) == "cert_signature"


@pytest.mark.parametrize(
    "key",
    [
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=4096),
        lambda: ec.generate_private_key(ec.SECP521R1()),
        lambda: ec.generate_private_key(ec.SECP256K1()),
    ],
    ids=["rsa-1024", "rsa-4096", "p-521", "secp256k1"],
)
def test_unsupported_client_keys(ca: LabCA, verifier: IasVerifier, key: object) -> None:
    private_key = key()  # type: ignore[operator]
    enclave = _issue(ca, private_key=private_key)
    assert _check(verifier, enclave.cert_der) == "unsupported_key"


@pytest.mark.parametrize(
    "data", [b"", b"\x30", b"\x30\x03\x02\x01\x01", b"not a certificate"], ids=repr
)
def test_not_a_certificate(verifier: IasVerifier, data: bytes) -> None:
    assert _check(verifier, data) == "malformed_certificate"


def test_unknown_certificate_version(ca: LabCA, verifier: IasVerifier) -> None:
    cert = bytearray(_issue(ca).cert_der)
    version_at = cert.index(b"\xa0\x03\x02\x01\x02") + 4  # [0] EXPLICIT INTEGER 2 (v3)
    cert[version_at] = 3
    assert _check(verifier, bytes(cert)) == "malformed_certificate"


def test_trailing_bytes_after_the_certificate(ca: LabCA, verifier: IasVerifier) -> None:
    assert _check(verifier, _issue(ca).cert_der + b"\x00") == "malformed_certificate"


def test_pem_is_not_accepted_where_der_is_expected(ca: LabCA, verifier: IasVerifier) -> None:
    assert _check(verifier, _issue(ca).cert_pem) == "malformed_certificate"


# --- genuine Intel evidence in an RA-TLS certificate ---


def test_genuine_ias_evidence_in_a_certificate_with_another_key() -> None:
    root = x509.load_pem_x509_certificate((FIXTURES / "intel-ias-root-ca.pem").read_bytes())
    signing = x509.load_pem_x509_certificate(
        (FIXTURES / "intel-ias-report-signing.pem").read_bytes()
    )
    report = (FIXTURES / "ias-report-v4-sw-hardening-needed.json").read_bytes()
    signature_b64 = (FIXTURES / "ias-report-v4-sw-hardening-needed.sig").read_bytes()
    verifier = IasVerifier(
        AttestationPolicy(
            roots=(root,),
            allowed_statuses=frozenset({"OK", "SW_HARDENING_NEEDED"}),
            allow_debug=True,
            max_age=None,
        )
    )
    at = datetime(2020, 5, 11, 10, tzinfo=UTC)
    for encoding in ENCODINGS:
        evidence = encode_evidence(encoding, report, signature_b64, signing, root)
        cert = build_ratls_certificate(_key("ecdsa", 384), evidence, now=at)
        # Every check passes up to the key binding: this report binds another key.
        assert _check(verifier, cert, at) == "report_data_mismatch"
        assert _check(verifier, cert) == "signing_cert_expired"


# --- helpers ---


def _extensions(
    cert_der: bytes, oids: tuple[x509.ObjectIdentifier, ...]
) -> list[x509.Extension[x509.ExtensionType]]:
    cert = x509.load_der_x509_certificate(cert_der)
    return [ext for ext in cert.extensions if ext.oid in oids]


def _evidence(
    enclave: EnclaveCert, encoding: EvidenceEncoding
) -> dict[x509.ObjectIdentifier, bytes]:
    """The evidence of `enclave` re-encoded in `encoding`."""
    cert = x509.load_der_x509_certificate(enclave.cert_der)
    ca_cert = x509.load_pem_x509_certificate(
        _pem_from_extension_or_der(cert, OID_IAS_CA_CERT, enclave.encoding)
    )
    signing_cert = x509.load_pem_x509_certificate(
        _pem_from_extension_or_der(cert, OID_IAS_SIGNING_CERT, enclave.encoding)
    )
    return encode_evidence(encoding, enclave.report, enclave.signature_b64, signing_cert, ca_cert)


def _pem_from_extension_or_der(
    cert: x509.Certificate, oid: x509.ObjectIdentifier, encoding: EvidenceEncoding
) -> bytes:
    extension = cert.extensions.get_extension_for_oid(oid).value
    assert isinstance(extension, x509.UnrecognizedExtension)
    value = extension.value
    if encoding is EvidenceEncoding.V2019:
        return value
    der = x509.load_der_x509_certificate(base64.b64decode(value))
    return der.public_bytes(serialization.Encoding.PEM)


def _duplicate_extension(
    cert_der: bytes, key: ClientPrivateKey, oid: x509.ObjectIdentifier
) -> bytes:
    """The certificate with extension `oid` twice, re-signed so that only the duplicate is
    wrong (cryptography's builder refuses duplicates, hence pyasn1)."""
    cert, _ = decoder.decode(cert_der, asn1Spec=rfc5280.Certificate())
    extensions = cert["tbsCertificate"]["extensions"]
    duplicate = next(ext for ext in extensions if str(ext["extnID"]) == oid.dotted_string)
    extensions.append(duplicate)
    tbs = encoder.encode(cert["tbsCertificate"])
    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    else:
        signature = key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
    cert["signature"] = univ.BitString.fromOctetString(signature)
    return bytes(encoder.encode(cert))
