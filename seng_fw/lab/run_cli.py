"""`seng-fw lab enclave | up | demo | down | services`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from seng_fw.cli import EXIT_OK, EXIT_REJECTED, UsageError

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
        required=True,
        metavar="CERT",
        help="RA-TLS client certificate (PEM or DER)",
    )
    enclave.add_argument("--key", type=Path, required=True, metavar="KEY")
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
    enclave.set_defaults(func=_enclave)

    from seng_fw.lab import demo

    demo.register(lab_sub)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc


def _enclave(args: argparse.Namespace) -> int:
    from seng_fw.lab.enclave import EnclaveClient, EnclaveError, parse_server
    from seng_fw.tunnel.dtls import make_client_config

    if args.verbose == 0:
        logging.getLogger("seng_fw").setLevel(logging.INFO)
    try:
        server = parse_server(args.server)
        config = make_client_config(_read(args.cert), _read(args.key), _read(args.server_cert))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    client = EnclaveClient(
        server, config, tun_name=args.tun, netns=args.netns, state_file=args.state_file
    )
    try:
        asyncio.run(client.run())
    except EnclaveError as exc:
        # "down": the tunnel was up and the gateway ended it; "refused": it never came up.
        client.write_state(status="down" if client.assignment else "refused", reason=str(exc))
        print(f"seng-fw lab enclave: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    return EXIT_OK
