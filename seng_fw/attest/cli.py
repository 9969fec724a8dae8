"""`seng-fw attest ...`: verify RA-TLS client certificates and IAS reports from files.

The only place in seng_fw.attest that reads files. Exit status: 0 trusted, 1 rejected (the
failed check on stderr), 2 usage error or unreadable input.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from seng_fw.attest.ias import b64decode_strict, resolve_time, verify_ias_report
from seng_fw.attest.identity import AttestationRejected, Check, EnclaveIdentity
from seng_fw.attest.policy import (
    ACCEPTABLE_STATUSES,
    DEFAULT_MAX_AGE,
    AttestationPolicy,
    load_root_certificates,
)
from seng_fw.attest.verifier import IasVerifier
from seng_fw.cli import EXIT_OK, EXIT_REJECTED, UsageError

_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    attest = sub.add_parser("attest", help="verify SGX attestation evidence (RA-TLS, IAS)")
    attest_sub = attest.add_subparsers(
        dest="attest_command", required=True, metavar="ATTEST_COMMAND"
    )

    verify = attest_sub.add_parser(
        "verify",
        help="verify an RA-TLS client certificate (sgx-ra-tls format)",
        description="Verify the attestation evidence in an RA-TLS client certificate "
        "(the leaf only; PEM or DER) and print the enclave identity.",
    )
    verify.add_argument("cert", type=Path, metavar="CERT", help="client certificate, PEM or DER")
    _add_policy_arguments(verify, default_max_age=DEFAULT_MAX_AGE)
    verify.set_defaults(func=_cmd_verify)

    report = attest_sub.add_parser(
        "verify-report",
        help="verify an IAS attestation report kept as separate files",
        description="Verify an IAS attestation verification report. REPORTDATA is printed, "
        "not checked; the report's age is checked only with --max-age.",
    )
    report.add_argument(
        "--report",
        type=Path,
        required=True,
        metavar="REPORT.json",
        help="the report body, exactly as IAS sent it",
    )
    report.add_argument(
        "--signature",
        type=Path,
        required=True,
        metavar="SIG",
        help="the X-IASReport-Signature header value (base64 text)",
    )
    report.add_argument(
        "--signing-cert",
        type=Path,
        required=True,
        metavar="CERT.pem",
        help="the report-signing certificate (PEM or DER)",
    )
    _add_policy_arguments(report, default_max_age=None)
    report.set_defaults(func=_cmd_verify_report)


def _add_policy_arguments(
    parser: argparse.ArgumentParser, default_max_age: timedelta | None
) -> None:
    parser.add_argument(
        "--root",
        type=Path,
        action="append",
        required=True,
        metavar="ROOT.pem",
        help="trust anchor (PEM; repeatable), e.g. Intel's SGX Attestation Report Signing CA",
    )
    parser.add_argument(
        "--allow-status",
        action="extend",
        nargs="+",
        default=[],
        metavar="S",
        choices=sorted(ACCEPTABLE_STATUSES),
        help="also accept this isvEnclaveQuoteStatus (OK is always accepted): "
        + ", ".join(sorted(ACCEPTABLE_STATUSES - {"OK"})),
    )
    parser.add_argument(
        "--allow-debug", action="store_true", help="accept enclaves running in DEBUG mode"
    )
    default_text = "default: unchecked"
    if default_max_age is not None:
        default_text = f"default {int(default_max_age.total_seconds())}"
    parser.add_argument(
        "--max-age",
        type=_positive_seconds,
        default=default_max_age,
        metavar="SECONDS",
        help=f"reject reports older than this ({default_text})",
    )
    parser.add_argument(
        "--at",
        type=_iso_time,
        default=None,
        metavar="ISO-8601-TIME",
        help="judge certificates and report age as of this time (UTC if no zone; default now)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _cmd_verify(args: argparse.Namespace) -> int:
    cert_der = _read_certificate_der(args.cert)
    verifier = IasVerifier(_policy(args))
    at = resolve_time(args.at)
    try:
        identity = verifier.verify_certificate(cert_der, at)
    except AttestationRejected as exc:
        return _rejected(exc, args.json)
    _print_identity(identity, at, report_data_checked=True, as_json=args.json)
    return EXIT_OK


def _cmd_verify_report(args: argparse.Namespace) -> int:
    report = _read(args.report)
    signature_text = _read(args.signature).strip()  # files usually end with a newline
    signing_cert_der = _read_certificate_der(args.signing_cert)
    policy = _policy(args)
    at = resolve_time(args.at)
    try:
        signature = b64decode_strict(signature_text, Check.BAD_SIGNATURE)
        try:
            signing_cert = x509.load_der_x509_certificate(signing_cert_der)
        except ValueError as exc:
            raise AttestationRejected(Check.MALFORMED_SIGNING_CERT, str(exc)) from None
        identity = verify_ias_report(report, signature, signing_cert, policy, at)
    except AttestationRejected as exc:
        return _rejected(exc, args.json)
    _print_identity(identity, at, report_data_checked=False, as_json=args.json)
    return EXIT_OK


def _policy(args: argparse.Namespace) -> AttestationPolicy:
    try:
        roots = load_root_certificates(_read(path) for path in args.root)
        return AttestationPolicy(
            roots=roots,
            allowed_statuses=frozenset({"OK", *args.allow_status}),
            allow_debug=args.allow_debug,
            max_age=args.max_age,
        )
    except ValueError as exc:
        raise UsageError(f"bad trust anchor or policy: {exc}") from None


def _rejected(exc: AttestationRejected, as_json: bool) -> int:
    print(f"seng-fw: attestation rejected ({exc.check}): {exc.message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"trusted": False, "check": str(exc.check), "message": exc.message}))
    return EXIT_REJECTED


def _print_identity(
    identity: EnclaveIdentity, at: datetime, *, report_data_checked: bool, as_json: bool
) -> None:
    if as_json:
        document = {"trusted": True, **identity.to_json()}
        document["report_data_checked"] = report_data_checked
        document["checked_at"] = at.isoformat()
        print(json.dumps(document, indent=2))
        return
    rows = [
        ("trusted", "yes"),
        ("mrenclave", identity.mrenclave.hex()),
        ("mrsigner", identity.mrsigner.hex()),
        ("isv_prod_id", str(identity.isv_prod_id)),
        ("isv_svn", str(identity.isv_svn)),
        ("debug", "yes" if identity.debug else "no"),
        ("quote_status", identity.quote_status),
        ("advisory_ids", ", ".join(identity.advisory_ids) or "-"),
        ("timestamp", identity.timestamp.isoformat()),
        ("checked_at", at.isoformat()),
        (
            "report_data",
            identity.report_data.hex() + ("" if report_data_checked else " (not checked)"),
        ),
    ]
    width = max(len(key) for key, _ in rows) + 1
    for key, value in rows:
        print(f"{key + ':':<{width}} {value}")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def _read_certificate_der(path: Path) -> bytes:
    """DER bytes of the one certificate in a PEM or DER file (content checks are the
    verifier's; only an unreadable file or broken PEM armour is a usage error)."""
    data = _read(path)
    if data.startswith(b"\x30"):  # a DER SEQUENCE (a DER RA-TLS cert may contain PEM text)
        return data
    blocks = _PEM_BLOCK.findall(data)
    if len(blocks) != 1:
        raise UsageError(f"{path}: expected exactly one PEM certificate, found {len(blocks)}")
    try:
        return base64.b64decode(b"".join(blocks[0].split()), validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{path}: broken PEM encoding") from None


def _positive_seconds(text: str) -> timedelta:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    try:
        if not seconds > 0:
            raise ValueError
        return timedelta(seconds=seconds)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError("must be a positive number of seconds") from None


def _iso_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
