"""`seng-fw lab enclave | up | demo | down | services`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from seng_fw.system import eventloop
from seng_fw.system.cli_toolkit import EXIT_OK, Refused, UsageError, read_input

log = logging.getLogger("seng_fw.lab")


def register(lab_sub: argparse._SubParsersAction[Any]) -> None:
    enclave = lab_sub.add_parser(
        "enclave", help="run an emulated enclave: a SENG client with a TUN device"
    )
    enclave.add_argument("--server", required=True, metavar="HOST:PORT", help="gateway port P")
    enclave.add_argument(
        "--server-cert",
        type=Path,
        required=True,
        metavar="PEM",
        help="the gateway's certificate, pinned",
    )
    enclave.add_argument(
        "--cert",
        type=Path,
        metavar="CERT",
        help="RA-TLS client certificate (PEM or DER); with --quote-source file (the default)",
    )
    enclave.add_argument(
        "--key",
        type=Path,
        metavar="KEY",
        help="its private key; with --quote-source gramine, optional (default: a new P-384 key)",
    )
    enclave.add_argument(
        "--quote-source",
        choices=("file", "gramine"),
        default="file",
        help="file: --cert/--key as given; gramine: build a Gramine-layout DCAP RA-TLS "
        "certificate from Gramine's /dev/attestation (key hash to user_report_data, quote read "
        "back), as inside a real Gramine enclave",
    )
    enclave.add_argument(
        "--attestation-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="gramine: the attestation interface (default /dev/attestation; a directory "
        "imitating it in tests)",
    )
    enclave.add_argument(
        "--dice",
        action="store_true",
        help="gramine: add the TCG DICE evidence extension (a second quote)",
    )
    enclave.add_argument("--tun", default="seng0", metavar="NAME", help="TUN device name")
    enclave.add_argument(
        "--netns",
        metavar="NAME",
        help="put the TUN device (with a default route) in this namespace",
    )
    enclave.add_argument(
        "--state-file",
        type=Path,
        metavar="JSON",
        help="write the assigned address (or the failure) here",
    )
    enclave.add_argument(
        "--reconnect",
        action="store_true",
        help="when the tunnel is refused, ended or dead, tear the TUN device down and "
        "connect again with exponential backoff (until SIGTERM)",
    )
    enclave.add_argument(
        "--keepalive",
        type=float,
        metavar="SECONDS",
        help="probe the gateway after this long without a record and give the tunnel up "
        "if it does not answer within as long again (default 10 with --reconnect, else "
        "off; 0: off)",
    )
    enclave.add_argument(
        "--backoff-max",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="longest wait between reconnect attempts (from 0.5 s, doubling)",
    )
    enclave.set_defaults(func=_enclave)

    from seng_fw.lab import demo

    demo.register(lab_sub)


def _client_credentials(args: argparse.Namespace) -> tuple[bytes, bytes]:
    """The certificate and key the emulator presents, per --quote-source."""
    from cryptography.hazmat.primitives import serialization

    from seng_fw.lab.ca import generate_client_key
    from seng_fw.lab.enclave import GRAMINE_ATTESTATION_DIR, EnclaveError, GramineAttestation

    if args.quote_source == "file":
        if args.cert is None or args.key is None:
            raise UsageError("--cert and --key are required with --quote-source file")
        if args.attestation_dir is not None or args.dice:
            raise UsageError("--attestation-dir and --dice: only with --quote-source gramine")
        return read_input(args.cert), read_input(args.key)
    if args.cert is not None:
        raise UsageError("--cert: the certificate is built from the quote (--quote-source gramine)")
    if args.key is not None:
        key_pem = read_input(args.key)
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except ValueError as exc:
            raise UsageError(f"cannot load {args.key}: {exc}") from None
    else:
        key = generate_client_key("ecdsa", 384)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise UsageError(f"{args.key}: an RSA or ECDSA key is needed")
    attestation = GramineAttestation(args.attestation_dir or GRAMINE_ATTESTATION_DIR)
    try:
        cert_der = attestation.ratls_certificate(key, dice=args.dice)
    except EnclaveError as exc:
        raise UsageError(str(exc)) from None
    return cert_der, key_pem


def _enclave(args: argparse.Namespace) -> int:
    from seng_fw.lab.enclave import (
        Backoff,
        EnclaveClient,
        EnclaveError,
        parse_server,
        run_reconnecting,
    )
    from seng_fw.tunnel.dtls import make_client_config

    if args.verbose == 0:
        logging.getLogger("seng_fw").setLevel(logging.INFO)
    cert, key = _client_credentials(args)
    try:
        server = parse_server(args.server)
        config = make_client_config(cert, key, read_input(args.server_cert))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    keepalive = args.keepalive if args.keepalive is not None else (10.0 if args.reconnect else 0)
    if keepalive < 0 or args.backoff_max <= 0:
        raise UsageError("--keepalive and --backoff-max take a positive number of seconds")

    def new_client() -> EnclaveClient:
        return EnclaveClient(
            server, config, tun_name=args.tun, netns=args.netns, state_file=args.state_file,
            keepalive=keepalive or None,
        )  # fmt: skip

    if args.reconnect:
        eventloop.run(run_reconnecting(new_client, Backoff(maximum=args.backoff_max)))
        return EXIT_OK
    client = new_client()
    try:
        eventloop.run(client.run())
    except EnclaveError as exc:
        # "down": the tunnel was up and the gateway ended it; "refused": it never came up.
        client.write_state(status="down" if client.assignment else "refused", reason=str(exc))
        raise Refused(f"lab enclave: {exc}") from None
    return EXIT_OK
