"""`seng-fw serve --config gateway.yaml`: run the gateway."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from seng_fw.admission import Admission
from seng_fw.attest.policy import AttestationPolicy, load_root_certificates
from seng_fw.attest.verifier import IasVerifier
from seng_fw.cli import EXIT_OK, EXIT_USAGE, UsageError
from seng_fw.config import GatewayConfig, load_gateway_config
from seng_fw.conntrack import flush_address
from seng_fw.gateway.core import GatewayCore, Port
from seng_fw.gateway.server import GatewayServer, bind_udp
from seng_fw.policy.loader import load_policy
from seng_fw.tunnel.dtls import make_server_config
from seng_fw.tunnel.tun import TunDevice, TunError
from seng_fw.yamlfile import ConfigError

log = logging.getLogger("seng_fw.gateway")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    serve = sub.add_parser("serve", help="run the gateway (DTLS tunnels, TUN forwarding)")
    serve.add_argument("--config", type=Path, required=True, help="gateway.yaml")
    serve.set_defaults(func=_serve)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc


def build_verifier(config: GatewayConfig) -> IasVerifier:
    attestation = config.attestation
    try:
        roots = load_root_certificates(_read(path) for path in attestation.roots)
        policy = AttestationPolicy(
            roots=roots,
            allowed_statuses=frozenset(attestation.allow_status),
            # DEBUG is decided per app at admission (App.allow_debug, default refused).
            allow_debug=True,
            max_age=None
            if attestation.max_report_age is None
            else timedelta(seconds=attestation.max_report_age),
        )
    except ValueError as exc:
        raise UsageError(f"attestation roots: {exc}") from exc
    return IasVerifier(policy)


def build_server(config: GatewayConfig) -> GatewayServer:
    admission = Admission(load_policy(config.policy))
    try:
        dtls = make_server_config(_read(config.tls.certificate), _read(config.tls.key))
    except ValueError as exc:
        raise UsageError(f"server certificate/key: {exc}") from exc
    core = GatewayCore(
        admission,
        build_verifier(config),
        {Port.SETUP: dtls, Port.DOWNLINK: dtls},
        config.timeouts,
    )
    sockets = {
        Port.SETUP: bind_udp(config.listen.address, config.listen.port),
        Port.DOWNLINK: bind_udp(config.listen.address, config.listen.port + 1),
    }
    tun = TunDevice.create(config.tun.name, mtu=config.tun.mtu)

    def reload_admission() -> None:
        core.reload(Admission(load_policy(config.policy)), time.monotonic())

    server = GatewayServer(core, sockets, tun, flush_address, reload_admission)
    server.sync_tun_addresses()
    return server


def _serve(args: argparse.Namespace) -> int:
    if args.verbose == 0:
        logging.getLogger("seng_fw").setLevel(logging.INFO)
    try:
        config = load_gateway_config(args.config)
        server = build_server(config)
    except ConfigError as exc:
        print(f"seng-fw serve: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, TunError) as exc:
        print(f"seng-fw serve: cannot start: {exc}", file=sys.stderr)
        return EXIT_USAGE
    log.info(
        "listening on %s:%d/%d, TUN %s (MTU %d), %d apps",
        config.listen.address,
        config.listen.port,
        config.listen.port + 1,
        config.tun.name,
        config.tun.mtu,
        len(server.core.admission.policy.apps),
    )
    asyncio.run(server.run())
    return EXIT_OK
