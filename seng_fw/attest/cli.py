"""`seng-fw attest ...`: verify RA-TLS client certificates, IAS reports and DCAP quotes from
files; fetch DCAP collateral.

The only place in seng_fw.attest that reads files (or, for fetch-collateral, the network).
Exit status: 0 trusted, 1 rejected (the failed check on stderr), 2 usage error or unreadable
input.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import re
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from seng_fw.attest.collateral import CollateralError, CollateralStore, parse_bundle
from seng_fw.attest.dcap import (
    ACCEPTABLE_TCB_STATUSES,
    TCB_UP_TO_DATE,
    AnyEvidenceVerifier,
    DcapPolicy,
    DcapVerifier,
    verify_dcap_quote,
)
from seng_fw.attest.ias import b64decode_strict, resolve_time, verify_ias_report
from seng_fw.attest.identity import AttestationRejected, Check, EnclaveIdentity
from seng_fw.attest.policy import (
    ACCEPTABLE_STATUSES,
    DEFAULT_MAX_AGE,
    AttestationPolicy,
    load_root_certificates,
)
from seng_fw.attest.verifier import IasVerifier
from seng_fw.system.cli_toolkit import (
    EXIT_OK,
    Refused,
    UsageError,
    add_json_arguments,
    emit_json,
    iso_time,
    read_input,
    write_output,
)

_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    attest = sub.add_parser("attest", help="verify SGX attestation evidence (RA-TLS, IAS)")
    attest_sub = attest.add_subparsers(
        dest="attest_command", required=True, metavar="ATTEST_COMMAND"
    )

    verify = attest_sub.add_parser(
        "verify",
        help="verify an RA-TLS client certificate (EPID/IAS or DCAP evidence)",
        description="Verify the attestation evidence in an RA-TLS client certificate "
        "(the leaf only; PEM or DER): sgx-ra-tls EPID/IAS, sgx-ra-tls ECDSA (DCAP) or Gramine "
        "(DCAP), and print the enclave identity. DCAP evidence needs --collateral.",
    )
    verify.add_argument("cert", type=Path, metavar="CERT", help="client certificate, PEM or DER")
    _add_policy_arguments(verify, default_max_age=DEFAULT_MAX_AGE)
    _add_collateral_argument(verify, required=False)
    verify.set_defaults(func=_cmd_verify)

    quote = attest_sub.add_parser(
        "verify-quote",
        help="verify a bare DCAP (ECDSA) SGX quote with its collateral",
        description="Verify a binary SGX quote (version 3) against the trust anchor and "
        "collateral. There is no key to bind: REPORTDATA is printed, not checked.",
    )
    quote.add_argument("quote", type=Path, metavar="QUOTE", help="the raw quote (binary file)")
    _add_policy_arguments(quote, default_max_age=None, epid=False)
    _add_collateral_argument(quote, required=True)
    quote.set_defaults(func=_cmd_verify_quote)

    fetch = attest_sub.add_parser(
        "fetch-collateral",
        help="fetch DCAP collateral from a PCCS or Intel's PCS into a bundle file",
        description="Fetch the collateral for a quote's platform (TCB info, QE identity, CRLs) "
        "and write it as a QuoteCollateralV3 JSON bundle for attestation.dcap.collateral. "
        "The only command that uses the network.",
    )
    fetch.add_argument(
        "--pccs",
        required=True,
        metavar="URL",
        help="PCCS or PCS base URL, e.g. https://api.trustedservices.intel.com",
    )
    source = fetch.add_mutually_exclusive_group(required=True)
    source.add_argument("--quote", type=Path, metavar="QUOTE", help="a quote of the platform")
    source.add_argument("--fmspc", type=_fmspc, metavar="HEX", help="the platform's FMSPC")
    fetch.add_argument(
        "--ca",
        choices=("processor", "platform"),
        default="processor",
        help="PCK CA of the platform, with --fmspc (default processor)",
    )
    fetch.add_argument("--out", type=Path, required=True, metavar="FILE", help="bundle to write")
    fetch.set_defaults(func=_cmd_fetch_collateral)

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
    parser: argparse.ArgumentParser, default_max_age: timedelta | None, *, epid: bool = True
) -> None:
    parser.add_argument(
        "--root",
        type=Path,
        action="append",
        required=True,
        metavar="ROOT.pem",
        help="trust anchor (PEM; repeatable): Intel's SGX Attestation Report Signing CA (EPID), "
        "Intel SGX Root CA (DCAP), or a lab root",
    )
    statuses = set(ACCEPTABLE_TCB_STATUSES - {TCB_UP_TO_DATE})
    if epid:
        statuses |= ACCEPTABLE_STATUSES - {"OK"}
    # One value per option (action="append"): with nargs="+" the option would swallow the
    # positional argument that follows it (`--allow-status S CERT`).
    parser.add_argument(
        "--allow-status",
        action="append",
        default=[],
        metavar="S",
        choices=sorted(statuses | {"OK", TCB_UP_TO_DATE}),
        help="also accept this quote status (repeatable; OK and UpToDate always are): "
        + ", ".join(sorted(statuses)),
    )
    parser.add_argument(
        "--refuse-advisory",
        action="append",
        default=[],
        metavar="ID",
        help="refuse DCAP platforms affected by this advisory, e.g. INTEL-SA-00615 (repeatable)",
    )
    parser.add_argument(
        "--allow-debug", action="store_true", help="accept enclaves running in DEBUG mode"
    )
    if not epid:
        parser.set_defaults(max_age=None)
        _add_time_and_json(parser)
        return
    default_text = "default: unchecked"
    if default_max_age is not None:
        default_text = f"default {int(default_max_age.total_seconds())}"
    parser.add_argument(
        "--max-age",
        type=_positive_seconds,
        default=default_max_age,
        metavar="SECONDS",
        help=f"reject IAS reports older than this ({default_text})",
    )
    _add_time_and_json(parser)


def _add_time_and_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--at",
        type=iso_time,
        default=None,
        metavar="ISO-8601-TIME",
        help="judge certificates, collateral and report age as of this time "
        "(UTC if no zone; default now)",
    )
    add_json_arguments(parser)


def _add_collateral_argument(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "--collateral",
        type=Path,
        action="append",
        required=required,
        default=None,
        metavar="FILE|DIR",
        help="DCAP collateral bundle (QuoteCollateralV3 JSON), or a directory of them (repeatable)",
    )


def _cmd_verify(args: argparse.Namespace) -> int:
    cert_der = _read_certificate_der(args.cert)
    verifier = AnyEvidenceVerifier(IasVerifier(_policy(args)), DcapVerifier(_dcap_policy(args)))
    at = resolve_time(args.at)
    try:
        identity = verifier.verify_certificate(cert_der, at)
    except AttestationRejected as exc:
        raise _rejected(exc) from None
    _print_identity(args, identity, at, report_data_checked=True)
    return EXIT_OK


def _cmd_verify_report(args: argparse.Namespace) -> int:
    report = read_input(args.report)
    signature_text = read_input(args.signature).strip()  # files usually end with a newline
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
        raise _rejected(exc) from None
    _print_identity(args, identity, at, report_data_checked=False)
    return EXIT_OK


def _cmd_verify_quote(args: argparse.Namespace) -> int:
    quote = read_input(args.quote)
    policy = _dcap_policy(args)
    at = resolve_time(args.at)
    try:
        identity = verify_dcap_quote(quote, policy, at).identity
    except AttestationRejected as exc:
        raise _rejected(exc) from None
    _print_identity(args, identity, at, report_data_checked=False)
    return EXIT_OK


def _cmd_fetch_collateral(args: argparse.Namespace) -> int:
    from seng_fw.attest import pcs  # the network client only for this command

    try:
        if args.quote is not None:
            text = pcs.fetch_for_quote(args.pccs, read_input(args.quote))
        else:
            text = pcs.fetch_for_fmspc(args.pccs, args.fmspc, args.ca)
        bundle = parse_bundle(text, args.pccs)
    except (pcs.FetchError, CollateralError) as exc:
        raise UsageError(f"cannot fetch collateral: {exc}") from None
    write_output(args.out, text)
    print(
        f"wrote {args.out}: FMSPC {bundle.fmspc}, valid until {bundle.expires.isoformat()}",
        file=sys.stderr,
    )
    return EXIT_OK


def _dcap_policy(args: argparse.Namespace) -> DcapPolicy:
    try:
        roots = load_root_certificates(read_input(path) for path in args.root)
        store = CollateralStore.load(args.collateral or [])
        return DcapPolicy(
            roots=roots,
            collateral=store,
            allowed_statuses=frozenset(
                {TCB_UP_TO_DATE, *(s for s in args.allow_status if s in ACCEPTABLE_TCB_STATUSES)}
            ),
            refuse_advisories=frozenset(args.refuse_advisory),
            allow_debug=args.allow_debug,
        )
    except ValueError as exc:  # CollateralError is a ValueError
        raise UsageError(f"bad trust anchor, collateral or policy: {exc}") from None


def _policy(args: argparse.Namespace) -> AttestationPolicy:
    try:
        roots = load_root_certificates(read_input(path) for path in args.root)
        return AttestationPolicy(
            roots=roots,
            allowed_statuses=frozenset(
                {"OK", *(s for s in args.allow_status if s in ACCEPTABLE_STATUSES)}
            ),
            allow_debug=args.allow_debug,
            max_age=args.max_age,
        )
    except ValueError as exc:
        raise UsageError(f"bad trust anchor or policy: {exc}") from None


def _rejected(exc: AttestationRejected) -> Refused:
    """Exit 1 with the failed check; under --json its name is `error.code`."""
    return Refused(f"attestation rejected ({exc.check}): {exc.message}", kind=str(exc.check))


def _print_identity(
    args: argparse.Namespace, identity: EnclaveIdentity, at: datetime, *, report_data_checked: bool
) -> None:
    if args.json:
        document = {"trusted": True, **identity.to_json()}
        document["report_data_checked"] = report_data_checked
        document["checked_at"] = at.isoformat()
        emit_json(args, document)
        return
    rows = [
        ("trusted", "yes"),
        ("mrenclave", identity.mrenclave.hex()),
        ("mrsigner", identity.mrsigner.hex()),
        ("isv_prod_id", str(identity.isv_prod_id)),
        ("isv_svn", str(identity.isv_svn)),
        ("debug", "yes" if identity.debug else "no"),
        ("evidence", identity.evidence),
        ("quote_status", identity.quote_status),
        ("advisory_ids", ", ".join(identity.advisory_ids) or "-"),
        ("timestamp", identity.timestamp.isoformat()),
        ("checked_at", at.isoformat()),
        (
            "report_data",
            identity.report_data.hex() + ("" if report_data_checked else " (not checked)"),
        ),
    ]
    if identity.evidence == "dcap":
        rows[9:9] = [
            ("fmspc", identity.fmspc or "-"),
            (
                "collateral_expires",
                "-"
                if identity.collateral_expires is None
                else identity.collateral_expires.isoformat(),
            ),
        ]
    width = max(len(key) for key, _ in rows) + 1
    for key, value in rows:
        print(f"{key + ':':<{width}} {value}")


def _read_certificate_der(path: Path) -> bytes:
    """DER bytes of the one certificate in a PEM or DER file (content checks are the
    verifier's; only an unreadable file or broken PEM armour is a usage error)."""
    data = read_input(path)
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


def _fmspc(text: str) -> str:
    if re.fullmatch(r"[0-9A-Fa-f]{12}", text) is None:
        raise argparse.ArgumentTypeError(f"an FMSPC is 12 hex digits, not {text!r}")
    return text.upper()
