"""`seng-fw lab ca init|collateral|revoke-pck` and `seng-fw lab enclave-cert ...`: the lab
attestation CAs (EPID/IAS-style and DCAP)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from seng_fw.attest.ratls import EvidenceEncoding, report_data_for_key
from seng_fw.lab import dcap
from seng_fw.lab.ca import QUOTE_STATUSES, ROOT_CERT_FILE, LabCA, generate_client_key, write_file
from seng_fw.system.cli_toolkit import EXIT_OK, UsageError, error_text, iso_time, read_input

_DEFAULT_STATUS = "OK"
# What real SENG clients send: the 2018 base64 encoding of sgx-ra-tls (the original Go
# server refuses the 2019 raw/PEM one).
_DEFAULT_ENCODING = EvidenceEncoding.V2018.value


def register(lab_sub: argparse._SubParsersAction[Any]) -> None:
    ca = lab_sub.add_parser(
        "ca", help="lab attestation CAs (stand in for Intel's IAS and DCAP PKI)"
    )
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="CA_COMMAND")
    init = ca_sub.add_parser(
        "init",
        help="create a lab CA: both flavours unless --epid or --dcap",
        description=(
            "Create a lab attestation CA in DIR. EPID flavour: RSA-3072 root and RSA-2048 "
            "report-signing certificate (IAS-style reports). DCAP flavour: ECDSA P-256 lab SGX "
            "Root CA, PCK Platform CA and TCB signing certificate (quotes v3, TCB info, QE "
            "identity, CRLs). Both are made unless --epid or --dcap selects one (e.g. --dcap "
            "to add the DCAP flavour beside an existing EPID lab CA)."
        ),
    )
    init.add_argument("directory", type=Path, metavar="DIR", help="created if missing")
    flavour = init.add_mutually_exclusive_group()
    flavour.add_argument("--epid", action="store_true", help="only the EPID (IAS-style) CA")
    flavour.add_argument("--dcap", action="store_true", help="only the DCAP CA")
    init.set_defaults(func=_cmd_init)

    collateral = ca_sub.add_parser(
        "collateral",
        help="write the DCAP collateral bundle the gateway needs (dcap-qvl QuoteCollateralV3 JSON)",
        description=(
            "Sign fresh lab TCB info and QE identity and the root and PCK CRLs (with every "
            "revoked PCK certificate) and write them as one QuoteCollateralV3 JSON bundle for "
            "the lab FMSPC. Rewrite it after revoking a PCK certificate."
        ),
    )
    collateral.add_argument(
        "--ca", type=Path, required=True, metavar="DIR", help="lab CA directory"
    )
    collateral.add_argument(
        "--out", type=Path, required=True, metavar="FILE", help="the collateral bundle to write"
    )
    collateral.add_argument(
        "--valid-days",
        type=_positive_float,
        default=dcap.COLLATERAL_VALIDITY.days,
        metavar="DAYS",
        help="nextUpdate of TCB info, QE identity and CRLs, in days from the issue time "
        f"(default {dcap.COLLATERAL_VALIDITY.days})",
    )
    collateral.add_argument(
        "--at",
        type=iso_time,
        default=None,
        metavar="ISO-8601-TIME",
        help="issue time (UTC if no zone; default now), e.g. to make expired collateral",
    )
    collateral.set_defaults(func=_cmd_collateral)

    revoke = ca_sub.add_parser(
        "revoke-pck", help="put a lab PCK certificate on the PCK CRL (then rewrite the collateral)"
    )
    revoke.add_argument("--ca", type=Path, required=True, metavar="DIR", help="lab CA directory")
    revoke.add_argument(
        "pck", type=Path, metavar="PEM", help="PCK certificate or chain (its first certificate)"
    )
    revoke.set_defaults(func=_cmd_revoke_pck)

    cert = lab_sub.add_parser(
        "enclave-cert",
        help="issue an RA-TLS client certificate with lab EPID or DCAP evidence",
        description=(
            "Issue a self-signed RA-TLS client certificate. --evidence epid (default): an "
            "IAS-style report in the sgx-ra-tls layout. --evidence dcap: an SGX quote v3 from a "
            "new lab platform whose PCK certificate places it at --tcb-status, in the "
            "sgx-ra-tls ECDSA layout or Gramine's (--layout)."
        ),
    )
    cert.add_argument("--ca", type=Path, required=True, metavar="DIR", help="lab CA directory")
    cert.add_argument("--mrenclave", type=_hex32, required=True, metavar="HEX", help="32 bytes")
    cert.add_argument("--mrsigner", type=_hex32, required=True, metavar="HEX", help="32 bytes")
    cert.add_argument("--debug", action="store_true", help="set the DEBUG attribute")
    cert.add_argument("--isv-svn", type=_u16, default=0, metavar="N", help="default 0")
    cert.add_argument("--isv-prod-id", type=_u16, default=0, metavar="N", help="default 0")
    cert.add_argument("--evidence", choices=("epid", "dcap"), default="epid", help="default epid")
    cert.add_argument(
        "--status",
        choices=QUOTE_STATUSES,
        default=None,
        metavar="STATUS",
        help="epid: isvEnclaveQuoteStatus (default OK): " + ", ".join(QUOTE_STATUSES),
    )
    cert.add_argument(
        "--tcb-status",
        choices=dcap.TCB_STATUSES,
        default=None,
        metavar="STATUS",
        help="dcap: the platform's TCB status (default UpToDate): " + ", ".join(dcap.TCB_STATUSES),
    )
    cert.add_argument(
        "--layout",
        choices=[layout.value for layout in dcap.Layout],
        default=None,
        help="dcap: extension layout (default sgx-ra-tls)",
    )
    cert.add_argument(
        "--dice",
        action="store_true",
        help="dcap, gramine layout: add the TCG DICE evidence (2.23.133.5.4.9) too",
    )
    bad = cert.add_argument_group("deliberately bad evidence (for tests)")
    bad.add_argument(
        "--wrong-report-data",
        action="store_true",
        help="REPORTDATA binds another key, not the certificate's",
    )
    bad.add_argument(
        "--revoked-pck",
        action="store_true",
        help="dcap: revoke the platform's PCK certificate (rewrite the collateral after)",
    )
    cert.add_argument(
        "--key", choices=("ecdsa", "rsa"), default="ecdsa", help="key type (default ecdsa)"
    )
    cert.add_argument(
        "--key-size",
        type=int,
        choices=(256, 384, 2048, 3072),
        default=None,
        help="ecdsa: 384 (default, SENG's USE_ECDSA) or 256; rsa: 2048 (default) or 3072",
    )
    cert.add_argument(
        "--encoding",
        choices=[e.value for e in EvidenceEncoding],
        default=None,
        help="epid: sgx-ra-tls extension encoding: 2018 (base64, what SENG clients send; "
        "the default) or 2019 (raw report, PEM certificates)",
    )
    cert.add_argument(
        "--timestamp",
        type=iso_time,
        default=None,
        metavar="ISO-8601-TIME",
        help="epid: report timestamp (UTC if no zone; default now)",
    )
    cert.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="writes cert.pem, cert.der, key.pem (0600) and report.json, report.sig (epid) "
        "or quote.bin, pck-chain.pem (dcap)",
    )
    cert.set_defaults(func=_cmd_enclave_cert)


def _cmd_init(args: argparse.Namespace) -> int:
    directory: Path = args.directory
    try:
        if not args.dcap:
            LabCA.create(directory)
        if not args.epid:
            dcap.LabDcapCA.create(directory)
    except OSError as exc:
        raise UsageError(f"cannot create lab CA: {error_text(exc)}") from None
    print(f"lab CA created in {directory}")
    if not args.dcap:
        print(f"EPID trust anchor (lab only): {directory / ROOT_CERT_FILE}")
    if not args.epid:
        print(f"DCAP trust anchor (lab only): {directory / dcap.ROOT_CERT_FILE}")
        print(f"collateral for the gateway: seng-fw lab ca collateral --ca {directory} --out FILE")
    return EXIT_OK


def _load_dcap(directory: Path) -> dcap.LabDcapCA:
    try:
        return dcap.LabDcapCA.load(directory)
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"cannot load lab DCAP CA from {directory}: {error_text(exc)} "
            "(`seng-fw lab ca init --dcap DIR` adds one)"
        ) from None


def _cmd_collateral(args: argparse.Namespace) -> int:
    ca = _load_dcap(args.ca)
    now = args.at or datetime.now(UTC)
    validity = timedelta(days=args.valid_days)
    try:
        write_file(args.out, ca.collateral_json(now, validity).encode(), 0o644)
    except OSError as exc:
        raise UsageError(f"cannot write {args.out}: {error_text(exc)}") from None
    expires = (now + validity).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"DCAP collateral (lab FMSPC {dcap.LAB_FMSPC.hex().upper()}) in {args.out}")
    print(f"valid until {expires}; {len(ca.revoked_serials)} revoked PCK certificate(s)")
    return EXIT_OK


def _cmd_revoke_pck(args: argparse.Namespace) -> int:
    ca = _load_dcap(args.ca)
    try:
        pck = x509.load_pem_x509_certificates(read_input(args.pck))[0]
    except (OSError, ValueError, IndexError) as exc:
        raise UsageError(
            f"cannot read a PEM certificate from {args.pck}: {error_text(exc)}"
        ) from None
    if pck.issuer != ca.pck_ca_cert.subject:
        raise UsageError(f"{args.pck} was not issued by this lab's PCK Platform CA")
    try:
        ca.revoke(pck.serial_number)
    except OSError as exc:
        raise UsageError(f"cannot record the revocation in {args.ca}: {error_text(exc)}") from None
    print(f"PCK certificate {pck.serial_number:x} revoked; rewrite the collateral")
    return EXIT_OK


def _cmd_enclave_cert(args: argparse.Namespace) -> int:
    if args.evidence == "dcap":
        return _dcap_enclave_cert(args)
    dcap_only = [
        name
        for name, value in (
            ("--tcb-status", args.tcb_status),
            ("--layout", args.layout),
            ("--dice", args.dice),
            ("--revoked-pck", args.revoked_pck),
        )
        if value
    ]
    if dcap_only:
        raise UsageError(f"{', '.join(dcap_only)}: only with --evidence dcap")
    try:
        ca = LabCA.load(args.ca)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load lab CA from {args.ca}: {error_text(exc)}") from None
    encoding = args.encoding or _DEFAULT_ENCODING
    try:
        key = generate_client_key(args.key, args.key_size)
        enclave = ca.issue_enclave_cert(
            mrenclave=args.mrenclave,
            mrsigner=args.mrsigner,
            debug=args.debug,
            isv_prod_id=args.isv_prod_id,
            isv_svn=args.isv_svn,
            status=args.status or _DEFAULT_STATUS,
            private_key=key,
            encoding=encoding,
            timestamp=args.timestamp,
            report_data_override=_other_key_report_data() if args.wrong_report_data else None,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    out: Path = args.out
    _write_outputs(
        out,
        {
            "key.pem": (enclave.key_pem, 0o600),
            "cert.pem": (enclave.cert_pem, 0o644),
            "cert.der": (enclave.cert_der, 0o644),
            "report.json": (enclave.report, 0o644),
            "report.sig": (enclave.signature_b64, 0o644),
        },
    )
    print(f"RA-TLS certificate ({encoding} encoding) in {out}: cert.pem cert.der key.pem")
    print(f"IAS-style report: {out / 'report.json'} (signature {out / 'report.sig'})")
    return EXIT_OK


def _dcap_enclave_cert(args: argparse.Namespace) -> int:
    epid_only = [
        name
        for name, value in (
            ("--status", args.status),
            ("--encoding", args.encoding),
            ("--timestamp", args.timestamp),
        )
        if value
    ]
    if epid_only:
        raise UsageError(f"{', '.join(epid_only)}: only with --evidence epid")
    layout = dcap.Layout(args.layout or dcap.Layout.SGX_RA_TLS)
    if args.dice and layout is not dcap.Layout.GRAMINE:
        raise UsageError("--dice: only with --layout gramine")
    ca = _load_dcap(args.ca)
    tcb_status = args.tcb_status or dcap.TcbStatus.UP_TO_DATE.value
    try:
        key = generate_client_key(args.key, args.key_size)
        override = None
        if args.wrong_report_data:
            other = generate_client_key("ecdsa", 256).public_key()
            if layout is dcap.Layout.GRAMINE:
                override = dcap.gramine_report_data(other)
            else:
                override = report_data_for_key(other)
        enclave = ca.issue_enclave_cert(
            mrenclave=args.mrenclave,
            mrsigner=args.mrsigner,
            tcb_status=tcb_status,
            layout=layout,
            dice=args.dice,
            debug=args.debug,
            isv_prod_id=args.isv_prod_id,
            isv_svn=args.isv_svn,
            private_key=key,
            report_data_override=override,
            revoked_pck=args.revoked_pck,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:  # the revocation could not be recorded in the CA directory
        raise UsageError(f"cannot record the revocation in {args.ca}: {error_text(exc)}") from None
    out: Path = args.out
    _write_outputs(
        out,
        {
            "key.pem": (enclave.key_pem, 0o600),
            "cert.pem": (enclave.cert_pem, 0o644),
            "cert.der": (enclave.cert_der, 0o644),
            "quote.bin": (enclave.quote, 0o644),
            "pck-chain.pem": (enclave.platform.pck_chain_pem, 0o644),
        },
    )
    print(f"DCAP RA-TLS certificate ({layout.value} layout) in {out}: cert.pem cert.der key.pem")
    print(f"quote v3 ({tcb_status} platform): {out / 'quote.bin'}")
    if args.revoked_pck:
        print(
            f"PCK certificate {enclave.platform.pck_cert.serial_number:x} revoked: rewrite the "
            f"collateral (seng-fw lab ca collateral --ca {args.ca} --out FILE)"
        )
    return EXIT_OK


def _other_key_report_data() -> bytes:
    return report_data_for_key(generate_client_key("ecdsa", 256).public_key())


def _write_outputs(out: Path, files: dict[str, tuple[bytes, int]]) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, (data, mode) in files.items():
            write_file(out / name, data, mode)
    except OSError as exc:
        raise UsageError(f"cannot write to {out}: {error_text(exc)}") from None


def _hex32(text: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not hex: {text!r}") from None
    if len(value) != 32:
        raise argparse.ArgumentTypeError("must be 32 bytes (64 hex digits)")
    return value


def _u16(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 0xFFFF:
        raise argparse.ArgumentTypeError("must be 0..65535")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value
