"""`seng-fw serve --config gateway.yaml`: run the gateway."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from seng_fw.attest.collateral import CollateralStore
from seng_fw.attest.dcap import AnyEvidenceVerifier, DcapPolicy, DcapVerifier
from seng_fw.attest.identity import EvidenceVerifier
from seng_fw.attest.policy import AttestationPolicy, load_root_certificates
from seng_fw.attest.verifier import IasVerifier
from seng_fw.compile.compiler import TABLE
from seng_fw.compile.live import Nft, counters, live_digest, set_exposure_target
from seng_fw.gateway.config import GatewayConfig, load_gateway_config, mode_problem
from seng_fw.gateway.conntrack import flush_address
from seng_fw.gateway.core import (
    EnclaveAdmitted,
    EnclaveEnded,
    GatewayCore,
    GatewayEvent,
    HandshakeCompleted,
    Port,
)
from seng_fw.gateway.revocations import JsonFileRevocationStore, RevocationStoreError
from seng_fw.gateway.server import GatewayServer, bind_udp
from seng_fw.gateway.service import ControlError, FirewallState, GatewayService
from seng_fw.label.labelling import Labelling
from seng_fw.ops.control import ControlServer
from seng_fw.ops.metrics import GatewayMetrics, MetricsServer
from seng_fw.policy.admission import Admission
from seng_fw.policy.loader import load_policy
from seng_fw.policy.models import Policy
from seng_fw.policy.yamlfile import ConfigError, ConfigIssue
from seng_fw.system import eventloop
from seng_fw.system.cli_toolkit import (
    EXIT_FAULT,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    error_text,
    read_input,
)
from seng_fw.system.ipc import IpcError
from seng_fw.system.logs import flush_repeats, setup_logging
from seng_fw.tunnel.dtls import make_server_config
from seng_fw.tunnel.tun import TunDevice, TunError

log = logging.getLogger("seng_fw.gateway")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    serve = sub.add_parser("serve", help="run the gateway (DTLS tunnels, TUN forwarding)")
    serve.add_argument("--config", type=Path, required=True, help="gateway.yaml")
    serve.add_argument("--log-format", choices=("text", "json"), help="default: from config")
    serve.set_defaults(func=_serve)


def build_verifier(config: GatewayConfig) -> EvidenceVerifier:
    attestation = config.attestation
    try:
        roots = load_root_certificates(read_input(path) for path in attestation.roots)
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
        raise UsageError(f"attestation roots: {error_text(exc)}") from None
    if attestation.dcap is None:
        return IasVerifier(policy)
    dcap = attestation.dcap
    try:
        dcap_policy = DcapPolicy(
            roots=load_root_certificates(read_input(path) for path in dcap.roots),
            collateral=CollateralStore.load(dcap.collateral),
            allowed_statuses=frozenset(dcap.allow_status),
            refuse_advisories=frozenset(attestation.refuse_advisories),
            # dcap-qvl refuses DEBUG enclaves whatever we say; admission decides for EPID.
            allow_debug=True,
        )
    except ValueError as exc:  # CollateralError is a ValueError
        raise UsageError(f"attestation.dcap: {error_text(exc)}") from None
    return AnyEvidenceVerifier(IasVerifier(policy), DcapVerifier(dcap_policy))


def checked_policy(config: GatewayConfig, path: Path | None = None) -> Policy:
    """The policy (`path`, default the configured one), read for a reload, refused
    (ConfigError) if it cannot run in the configured mode."""
    path = config.policy if path is None else path
    policy = load_policy(path)
    problem = mode_problem(config.mode, policy)
    if problem is not None:
        raise ConfigError([ConfigIssue(str(path), 1, "", problem)])
    return policy


def build_server(config: GatewayConfig) -> GatewayServer:
    """Everything the gateway runs, set up but not started (sockets bound, TUN up)."""
    policy = load_policy(config.policy)
    problem = mode_problem(config.mode, policy)
    if problem is not None:  # before any socket or TUN device
        raise UsageError(f"{config.policy}: {problem}")
    try:
        dtls = make_server_config(read_input(config.tls.certificate), read_input(config.tls.key))
    except ValueError as exc:
        raise UsageError(f"server certificate/key: {error_text(exc)}") from None
    core = GatewayCore(
        Admission(policy),
        build_verifier(config),
        {Port.SETUP: dtls, Port.DOWNLINK: dtls},
        config.timeouts,
        config.limits,
    )
    labelling = None
    if config.mode == "shared":
        gateways = [subnet.gateway_address for subnet in policy.enclave_subnets()]
        # The same label ids as the compiled ruleset (seng_fw.compile.label_table).
        labelling = Labelling(
            config.label, policy, gateway_addresses=gateways, host_prefixes=policy.host_prefixes()
        )
    # Closed if a later step fails (a busy port, no TUN device, an unreadable revocation
    # store); from the end of this block on, the server owns them.
    with contextlib.ExitStack() as opened:
        sockets = {
            Port.SETUP: opened.enter_context(bind_udp(config.listen.address, config.listen.port)),
            Port.DOWNLINK: opened.enter_context(
                bind_udp(config.listen.address, config.listen.port + 1)
            ),
        }
        tun = TunDevice.create(config.tun.name, mtu=config.tun.mtu, offload=config.tun.offload)
        opened.callback(tun.close)
        server = GatewayServer(
            core, sockets, tun, flush_address, labelling=labelling, tun_coalesce=config.tun.coalesce
        )
        service = GatewayService(
            core,
            config,
            load_policy=lambda path: checked_policy(config, path),
            before_reload=server.prepare_subnets,
            after_change=server.after_change,
            queue_mode=lambda: _queue_mode(labelling),
            read_firewall=_read_firewall,
            labeller_counters=None if labelling is None else lambda: _labeller_counters(labelling),
            store=JsonFileRevocationStore(config.state.revocations),
        )
        # SIGHUP, `seng-fw reload` and `seng-fw apply` all go through the service, which
        # keeps operator revocations across policy reloads.
        server.set_reload(service.reload_on_signal)
        server.services.append(ControlServer.from_config(service, config.control))
        server.event_consumers.append(_ExposureFeed(server))
        if config.metrics.address is not None:
            metrics = GatewayMetrics(service.snapshot, refresh=service.refresh_firewall)
            server.event_consumers.append(_handshake_metrics(metrics))
            server.services.append(MetricsServer(metrics, *config.metrics.address))
        server.sync_tun_addresses()
        opened.pop_all()
    return server


def _queue_mode(labelling: Labelling | None) -> str:
    if labelling is None:
        return "none"  # per-app subnets: nothing to label
    # Not via status(): that reads the kernel's queue and rate-limit counters too.
    installed = labelling.installed
    return "starting" if installed is None else installed.mode.value


def _labeller_counters(labelling: Labelling) -> dict[str, int]:
    counters = labelling.status().get("counters", {})
    return {key: int(value) for key, value in counters.items()}


def _read_firewall() -> FirewallState:
    """The live ruleset's counters and policy digest (blocking: a worker thread)."""
    nft = Nft()
    return FirewallState(counters(nft, TABLE), live_digest(nft, TABLE), read=True)


class _ExposureFeed:
    """Points an app's declared exposures (DNAT on a gateway address) at one of its live
    enclaves, and withdraws them when the last one leaves. The nft transactions run in a
    worker thread, one at a time and in event order, each against the enclaves alive
    when it runs."""

    def __init__(self, server: GatewayServer) -> None:
        self.server = server
        self._lock = asyncio.Lock()  # FIFO: updates apply in the order of the events

    def __call__(self, event: GatewayEvent) -> None:
        if isinstance(event, EnclaveAdmitted | EnclaveEnded) and event.enclave.app.expose:
            self.server.spawn(self._update(event.enclave.app.name))

    async def _update(self, app: str) -> None:
        async with self._lock:
            policy = self.server.core.admission.policy
            live = [e.address for e in self.server.core.enclaves if e.app.name == app]
            target = live[0] if live else None
            try:
                await asyncio.to_thread(set_exposure_target, Nft(), policy, app, target)
            except Exception as exc:  # no ruleset applied yet, or the app left the policy
                log.warning("exposure of app %s not updated: %s", app, exc)


def _handshake_metrics(metrics: GatewayMetrics) -> Callable[[GatewayEvent], None]:
    def consume(event: GatewayEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            metrics.observe_handshake(event.seconds)

    return consume


def _serve(args: argparse.Namespace) -> int:
    config = load_gateway_config(args.config)  # a ConfigError: every issue, exit 2 (cli.run)
    level = logging.DEBUG if args.verbose else logging.INFO
    setup_logging(args.log_format or config.log_format, level)
    try:
        server = build_server(config)
    except ConfigError as exc:
        print(f"seng-fw serve: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, TunError, RevocationStoreError) as exc:
        print(f"seng-fw serve: cannot start: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        eventloop.run(server.run())  # uvloop where installed: fewer µs per wakeup
    except (ControlError, IpcError) as exc:
        print(f"seng-fw serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:
        # A fault at run time (a bind that fails at boot, an error while stopping) is not
        # a usage error: exit 4, which the unit restarts (it does not restart on 2).
        log.exception("the gateway stopped on an internal error")
        return EXIT_FAULT
    finally:
        flush_repeats()
    if server.failure is not None:
        print(f"seng-fw serve: {server.failure}", file=sys.stderr)
        return EXIT_FAULT
    return EXIT_OK
