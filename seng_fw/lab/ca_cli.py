"""`seng-fw lab ca init DIR` and `seng-fw lab enclave-cert ...`: the lab attestation CA."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from seng_fw.attest.ratls import EvidenceEncoding
from seng_fw.cli import EXIT_OK, UsageError
from seng_fw.lab.ca import QUOTE_STATUSES, ROOT_CERT_FILE, LabCA, write_file


def register(lab_sub: argparse._SubParsersAction[Any]) -> None:
    ca = lab_sub.add_parser("ca", help="lab attestation CA (stands in for Intel's IAS)")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="CA_COMMAND")
    init = ca_sub.add_parser(
        "init",
        help="create a lab CA: RSA-3072 root and RSA-2048 report-signing certificate",
    )
    init.add_argument("directory", type=Path, metavar="DIR", help="created if missing")
    init.set_defaults(func=_cmd_init)

    cert = lab_sub.add_parser(
        "enclave-cert",
        help="issue an RA-TLS client certificate (sgx-ra-tls format) signed by the lab CA",
    )
    cert.add_argument("--ca", type=Path, required=True, metavar="DIR", help="lab CA directory")
    cert.add_argument("--mrenclave", type=_hex32, required=True, metavar="HEX", help="32 bytes")
    cert.add_argument("--mrsigner", type=_hex32, required=True, metavar="HEX", help="32 bytes")
    cert.add_argument("--debug", action="store_true", help="set the DEBUG attribute")
    cert.add_argument("--isv-svn", type=_u16, default=0, metavar="N", help="default 0")
    cert.add_argument("--isv-prod-id", type=_u16, default=0, metavar="N", help="default 0")
    cert.add_argument(
        "--status",
        choices=QUOTE_STATUSES,
        default="OK",
        metavar="STATUS",
        help="isvEnclaveQuoteStatus (default OK): " + ", ".join(QUOTE_STATUSES),
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
        default="2019",
        help="sgx-ra-tls extension encoding (default 2019)",
    )
    cert.add_argument(
        "--timestamp",
        type=_iso_time,
        default=None,
        metavar="ISO-8601-TIME",
        help="report timestamp (UTC if no zone; default now)",
    )
    cert.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="writes cert.pem, cert.der, key.pem (0600), report.json, report.sig",
    )
    cert.set_defaults(func=_cmd_enclave_cert)


def _cmd_init(args: argparse.Namespace) -> int:
    try:
        LabCA.create(args.directory)
    except OSError as exc:
        raise UsageError(f"cannot create lab CA: {exc}") from None
    print(f"lab CA created in {args.directory}")
    print(f"trust anchor (lab only): {args.directory / ROOT_CERT_FILE}")
    return EXIT_OK


def _cmd_enclave_cert(args: argparse.Namespace) -> int:
    try:
        ca = LabCA.load(args.ca)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load lab CA from {args.ca}: {exc}") from None
    try:
        enclave = ca.issue_enclave_cert(
            mrenclave=args.mrenclave,
            mrsigner=args.mrsigner,
            debug=args.debug,
            isv_prod_id=args.isv_prod_id,
            isv_svn=args.isv_svn,
            status=args.status,
            key_type=args.key,
            key_size=args.key_size,
            encoding=args.encoding,
            timestamp=args.timestamp,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    out: Path = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_file(out / "key.pem", enclave.key_pem, 0o600)
        write_file(out / "cert.pem", enclave.cert_pem, 0o644)
        write_file(out / "cert.der", enclave.cert_der, 0o644)
        write_file(out / "report.json", enclave.report, 0o644)
        write_file(out / "report.sig", enclave.signature_b64, 0o644)
    except OSError as exc:
        raise UsageError(f"cannot write to {out}: {exc}") from None
    print(f"RA-TLS certificate ({args.encoding} encoding) in {out}: cert.pem cert.der key.pem")
    print(f"IAS-style report: {out / 'report.json'} (signature {out / 'report.sig'})")
    return EXIT_OK


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


def _iso_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
