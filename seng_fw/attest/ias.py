"""IAS attestation verification reports: signing chain, signature, report fields, policy.

Pure functions: report bytes + signature + report-signing certificate + policy + time in,
`EnclaveIdentity` out (or `AttestationRejected`). Nothing here reads files or the clock
unless the caller leaves the time out.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtensionOID

from seng_fw.attest.identity import AttestationRejected, Check, EnclaveIdentity
from seng_fw.attest.policy import STATUS_OK, AttestationPolicy
from seng_fw.attest.quote import QuoteBody, parse_quote_body

# IAS API v3, v4 (2019 on) and v5 (2023) reports share these fields; v5 only adds
# tcbEvaluationDataNumber. Reports of API v2 (`/attestation/sgx/v2/report`, which the
# sgx-ra-tls code of 2018 that SENG clients build on requests) have no "version" field.
IAS_V2 = 2
SUPPORTED_REPORT_VERSIONS = frozenset({IAS_V2, 3, 4, 5})
# The body of an API v2 report (IAS API specification rev. 2, "Attestation Verification
# Report"): no version, no advisories (advisoryURL/advisoryIDs came with later versions),
# and the quote statuses of that version (SW_HARDENING_NEEDED came with v4).
_V2_FIELDS = frozenset(
    {
        "id",
        "timestamp",
        "isvEnclaveQuoteStatus",
        "isvEnclaveQuoteBody",
        "revocationReason",
        "pseManifestStatus",
        "pseManifestHash",
        "platformInfoBlob",
        "nonce",
        "epidPseudonym",
    }
)
_V2_QUOTE_STATUSES = frozenset(
    {
        "OK",
        "SIGNATURE_INVALID",
        "GROUP_REVOKED",
        "SIGNATURE_REVOKED",
        "KEY_REVOKED",
        "SIGRL_VERSION_MISMATCH",
        "GROUP_OUT_OF_DATE",
        "CONFIGURATION_NEEDED",
    }
)

# A report stamped later than the verification time is not plausible; allow for clock skew
# between IAS (or the lab CA) and this host.
CLOCK_SKEW = timedelta(minutes=5)

# Extensions of the report-signing certificate we understand well enough to accept as critical.
_SIGNING_CERT_CRITICAL_OK = frozenset(
    {ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE}
)
_MIN_SIGNING_KEY_BITS = 2048

# IAS timestamps: UTC without a zone, microseconds optional (e.g. 2018-08-03T12:43:18.123456).
_TIMESTAMP = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,6}))?Z?"
)  # [0-9], not \d: \d matches any Unicode digit

_REQUIRED_FIELDS: dict[str, type] = {
    "id": str,
    "timestamp": str,
    "isvEnclaveQuoteStatus": str,
    "isvEnclaveQuoteBody": str,
}
_OPTIONAL_FIELDS: dict[str, type] = {
    "version": int,  # absent: API v2
    "revocationReason": int,
    "pseManifestStatus": str,
    "pseManifestHash": str,
    "platformInfoBlob": str,
    "nonce": str,
    "epidPseudonym": str,
    "advisoryURL": str,
    "advisoryIDs": list,
    "tcbEvaluationDataNumber": int,
}


@dataclass(frozen=True)
class IasReport:
    """The fields of an attestation verification report that the gateway uses."""

    raw: bytes
    id: str
    timestamp: datetime
    version: int
    quote_status: str
    quote: QuoteBody
    advisory_ids: tuple[str, ...]
    advisory_url: str | None
    platform_info_blob: str | None

    def identity(self) -> EnclaveIdentity:
        return EnclaveIdentity(
            mrenclave=self.quote.mrenclave,
            mrsigner=self.quote.mrsigner,
            isv_prod_id=self.quote.isv_prod_id,
            isv_svn=self.quote.isv_svn,
            debug=self.quote.debug,
            quote_status=self.quote_status,
            timestamp=self.timestamp,
            report_data=self.quote.report_data,
            advisory_ids=self.advisory_ids,
        )


def verify_ias_report(
    report: bytes,
    signature: bytes,
    signing_cert: x509.Certificate,
    policy: AttestationPolicy,
    at: datetime | None = None,
) -> EnclaveIdentity:
    """Verify a report (exact body bytes) and its raw RSA signature against `policy` as of `at`.

    REPORTDATA is returned in the identity but not checked: binding it to a key is the
    caller's business (see `ratls.check_key_binding`).
    """
    at = resolve_time(at)
    verify_signing_cert(signing_cert, policy.roots, at)
    verify_report_signature(report, signature, signing_cert)
    parsed = parse_report(report)
    check_report_policy(parsed, policy, at)
    return parsed.identity()


def resolve_time(at: datetime | None) -> datetime:
    """The verification time: now when not given; it must be timezone-aware."""
    if at is None:
        return datetime.now(UTC)
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("verification time must be timezone-aware")
    return at


def verify_signing_cert(
    signing_cert: x509.Certificate, roots: Sequence[x509.Certificate], at: datetime
) -> x509.Certificate:
    """Check that a configured root directly issued `signing_cert`, both valid at `at`.

    Not cryptography's x509.verification.PolicyBuilder: its RFC 5280/Web PKI profile rejects
    Intel's root ("validity dates between 1950 and 2049 must be UtcTime": the root encodes
    2049-12-31 as GeneralizedTime) and insists on Web PKI extensions. Intel's chain has
    exactly one link (root -> report-signing certificate), so the checks are few: issuer
    name and signature by a configured root, validity of both, and a usable leaf.
    Returns the root that issued the certificate.
    """
    _check_signing_cert_profile(signing_cert)
    root = _find_issuing_root(signing_cert, roots)
    if root is None:
        raise AttestationRejected(
            Check.UNTRUSTED_ROOT,
            f"report-signing certificate (subject {signing_cert.subject.rfc4514_string()}, "
            f"issuer {signing_cert.issuer.rfc4514_string()}) is not issued by a configured "
            "trust anchor",
        )
    if at < root.not_valid_before_utc:
        raise AttestationRejected(
            Check.ROOT_NOT_YET_VALID, f"trust anchor is valid from {root.not_valid_before_utc}"
        )
    if at > root.not_valid_after_utc:
        raise AttestationRejected(
            Check.ROOT_EXPIRED, f"trust anchor expired on {root.not_valid_after_utc}"
        )
    if at < signing_cert.not_valid_before_utc:
        raise AttestationRejected(
            Check.SIGNING_CERT_NOT_YET_VALID,
            f"report-signing certificate is valid from {signing_cert.not_valid_before_utc} "
            f"(checked as of {at.isoformat()})",
        )
    if at > signing_cert.not_valid_after_utc:
        raise AttestationRejected(
            Check.SIGNING_CERT_EXPIRED,
            f"report-signing certificate expired on {signing_cert.not_valid_after_utc} "
            f"(checked as of {at.isoformat()})",
        )
    return root


def verify_report_signature(
    report: bytes, signature: bytes, signing_cert: x509.Certificate
) -> None:
    """RSA PKCS#1 v1.5 with SHA-256 over the exact report bytes, as IAS signs."""
    key = signing_cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):  # also checked by the profile; keeps mypy honest
        raise AttestationRejected(Check.MALFORMED_SIGNING_CERT, "signing key is not RSA")
    try:
        key.verify(signature, report, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise AttestationRejected(
            Check.BAD_SIGNATURE, "report signature does not verify with the signing certificate"
        ) from None


def parse_report(report: bytes) -> IasReport:
    """Parse the JSON body strictly: an object, no duplicate keys, fields of the right types."""
    try:
        fields = json.loads(
            report.decode("utf-8"),
            object_pairs_hook=_reject_duplicate_keys,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AttestationRejected(Check.MALFORMED_REPORT, f"report is not JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise AttestationRejected(Check.MALFORMED_REPORT, "report is not a JSON object")
    for name in _REQUIRED_FIELDS:
        if name not in fields:
            raise AttestationRejected(Check.MALFORMED_REPORT, f"report has no {name!r}")
    for name, kind in (_REQUIRED_FIELDS | _OPTIONAL_FIELDS).items():
        if name in fields and not _is_type(fields[name], kind):
            raise AttestationRejected(
                Check.MALFORMED_REPORT, f"report field {name!r} is not of type {kind.__name__}"
            )
    version = fields.get("version", IAS_V2)
    if "version" in fields and version == IAS_V2:
        raise AttestationRejected(
            Check.REPORT_VERSION, "IAS API v2 reports have no 'version' field; this one has 2"
        )
    if "version" not in fields:
        later = sorted(set(fields) & (set(_OPTIONAL_FIELDS) - _V2_FIELDS))
        if later:
            raise AttestationRejected(
                Check.MALFORMED_REPORT,
                f"report has no 'version' (IAS API v2) but has {later[0]!r} of a later version",
            )
        if fields["isvEnclaveQuoteStatus"] not in _V2_QUOTE_STATUSES:
            raise AttestationRejected(
                Check.MALFORMED_REPORT,
                f"isvEnclaveQuoteStatus {fields['isvEnclaveQuoteStatus']!r} is not one of "
                "IAS API v2 (the report has no 'version')",
            )
    advisory_ids = fields.get("advisoryIDs", [])
    if not all(isinstance(item, str) for item in advisory_ids):
        raise AttestationRejected(Check.MALFORMED_REPORT, "advisoryIDs must be strings")

    quote_bytes = b64decode_strict(fields["isvEnclaveQuoteBody"], Check.MALFORMED_QUOTE)
    return IasReport(
        raw=report,
        id=fields["id"],
        timestamp=parse_timestamp(fields["timestamp"]),
        version=version,
        quote_status=fields["isvEnclaveQuoteStatus"],
        quote=parse_quote_body(quote_bytes),
        advisory_ids=tuple(advisory_ids),
        advisory_url=fields.get("advisoryURL"),
        platform_info_blob=fields.get("platformInfoBlob"),
    )


def check_report_policy(report: IasReport, policy: AttestationPolicy, at: datetime) -> None:
    """The policy checks on a verified report: version, quote status, age, DEBUG."""
    if report.version not in SUPPORTED_REPORT_VERSIONS:
        raise AttestationRejected(
            Check.REPORT_VERSION, f"unsupported IAS report version {report.version}"
        )
    if report.quote_status not in policy.allowed_statuses:
        hint = "" if report.quote_status == STATUS_OK else " (not allowed by policy)"
        raise AttestationRejected(
            Check.QUOTE_STATUS, f"isvEnclaveQuoteStatus is {report.quote_status}{hint}"
        )
    if report.timestamp > at + CLOCK_SKEW:
        raise AttestationRejected(
            Check.REPORT_IN_FUTURE,
            f"report timestamp {report.timestamp.isoformat()} is after {at.isoformat()}",
        )
    if policy.max_age is not None and at - report.timestamp > policy.max_age:
        raise AttestationRejected(
            Check.REPORT_TOO_OLD,
            f"report from {report.timestamp.isoformat()} is older than {policy.max_age}",
        )
    if report.quote.debug and not policy.allow_debug:
        raise AttestationRejected(Check.DEBUG_ENCLAVE, "enclave runs in DEBUG mode")


def parse_timestamp(text: str) -> datetime:
    """An IAS timestamp (UTC, no zone, 0-6 fraction digits) as an aware UTC datetime."""
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        raise AttestationRejected(Check.MALFORMED_REPORT, f"bad report timestamp {text!r}")
    year, month, day, hour, minute, second, fraction = match.groups()
    try:
        microsecond = int((fraction or "0").ljust(6, "0"))
        return datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), microsecond, UTC
        )
    except ValueError:
        raise AttestationRejected(
            Check.MALFORMED_REPORT, f"bad report timestamp {text!r}"
        ) from None


def load_certificate(data: bytes, check: Check, *, pem: bool = False) -> x509.Certificate:
    """Parse one DER (or PEM) certificate completely, or reject it with `check`."""
    load = x509.load_pem_x509_certificate if pem else x509.load_der_x509_certificate
    try:
        with warnings.catch_warnings():
            # cryptography only warns about a serial number that is not positive
            # (RFC 5280 4.1.2.2 forbids it; a later release refuses it): refused now.
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            cert = load(data)  # DER: trailing bytes are refused too
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
        raise AttestationRejected(check, f"not a certificate: {exc}") from None
    except CryptographyDeprecationWarning as exc:
        raise AttestationRejected(check, f"not a valid certificate: {exc}") from None
    ensure_parsed(cert, check)
    return cert


def ensure_parsed(cert: x509.Certificate, check: Check) -> None:
    """Decode now every part of `cert` that verification uses.

    cryptography decodes names, extensions and keys lazily, on first access, and a
    malformed one then raises ValueError, or even KeyError (an unknown string tag in a
    name). Touching them here turns all of that into one rejection, up front.
    """
    try:
        _ = (cert.subject, cert.issuer, cert.not_valid_before_utc, cert.not_valid_after_utc)
        cert.public_key()
        cert.extensions  # noqa: B018 - decoding is the point
    except x509.DuplicateExtension as exc:
        raise AttestationRejected(
            Check.DUPLICATE_EXTENSION, f"extension {exc.oid.dotted_string} appears twice"
        ) from None
    except (ValueError, KeyError, TypeError, UnsupportedAlgorithm) as exc:
        raise AttestationRejected(check, f"malformed certificate: {exc!r}") from None


def b64decode_strict(data: str | bytes, check: Check, *, wrapped: bool = False) -> bytes:
    """Standard base64 with padding and nothing else: no whitespace, no non-zero pad bits.

    Accepting only the canonical form means one value has one encoding, so nothing can be
    smuggled in bits that a lenient decoder would drop. `wrapped` also accepts line breaks
    (LF or CRLF) between characters: some base64 encoders that RA-TLS attesters link
    (wolfSSL's Base64_Encode, OpenSSL's BIO filter) wrap lines at 64 or 76 characters.
    """
    try:
        text = data.encode("ascii") if isinstance(data, str) else bytes(data)
        if wrapped and b"\n" in text:
            text = _unwrap(text, check)
        decoded = base64.b64decode(text, validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise AttestationRejected(check, "value is not valid base64") from None
    if base64.b64encode(decoded) != text:
        raise AttestationRejected(check, "value is not canonical base64")
    return decoded


def _unwrap(text: bytes, check: Check) -> bytes:
    """Join base64 wrapped the way encoders wrap it: equal lines of 64 or 76 characters,
    a shorter last one, LF or CRLF, an optional final line break. Anything else (blank
    lines, ragged widths) is refused, so one value still has one accepted form per width."""
    lines = text.replace(b"\r\n", b"\n").split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    width = len(lines[0]) if lines else 0
    ragged = any(len(line) != width for line in lines[:-1])
    if len(lines) > 1 and (width not in (64, 76) or ragged or not 0 < len(lines[-1]) <= width):
        raise AttestationRejected(check, "value is not canonical base64 (bad line wrapping)")
    if len(lines) == 1 and not 0 < width <= 76:
        raise AttestationRejected(check, "value is not canonical base64 (bad line wrapping)")
    return b"".join(lines)


def _check_signing_cert_profile(cert: x509.Certificate) -> None:
    ensure_parsed(cert, Check.MALFORMED_SIGNING_CERT)
    extensions = cert.extensions
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < _MIN_SIGNING_KEY_BITS:
        raise AttestationRejected(
            Check.MALFORMED_SIGNING_CERT,
            f"report-signing key must be RSA of at least {_MIN_SIGNING_KEY_BITS} bits",
        )
    for ext in extensions:
        if ext.critical and ext.oid not in _SIGNING_CERT_CRITICAL_OK:
            raise AttestationRejected(
                Check.MALFORMED_SIGNING_CERT,
                f"report-signing certificate: unknown critical extension {ext.oid.dotted_string}",
            )
        if isinstance(ext.value, x509.BasicConstraints) and ext.value.ca:
            raise AttestationRejected(
                Check.MALFORMED_SIGNING_CERT, "report-signing certificate is a CA certificate"
            )
        if isinstance(ext.value, x509.KeyUsage) and not ext.value.digital_signature:
            raise AttestationRejected(
                Check.MALFORMED_SIGNING_CERT, "report-signing certificate may not sign (keyUsage)"
            )


def _find_issuing_root(
    cert: x509.Certificate, roots: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    for root in roots:
        if root.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue
        return root
    return None


def _is_type(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)  # bool is an int in Python
    return isinstance(value, kind)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
