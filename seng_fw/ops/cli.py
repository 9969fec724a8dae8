"""Operating a gateway: `seng-fw status | enclaves | revoke | reload | init | install-units`.

`status`, `enclaves`, `revoke` and `reload` talk to the running gateway over its control
socket (`--socket`, else `control.socket` of `--config`, default
/etc/seng-fw/gateway.yaml, else /run/seng-fw/control.sock); root or the socket's group
only. They print aligned tables, or JSON with `--json`. Exit status:

  0  done
  1  the gateway refused the request (reload: invalid policy, the running one is kept;
     revoke: no such app or enclave)
  2  usage error, unreadable configuration, or no permission to connect to the socket
  3  no gateway answers on the socket

`init` writes a commented /etc/seng-fw/gateway.yaml, the gateway's DTLS key and
certificate (ECDSA P-384; `--key-type rsa-3072` as the original SENG server) and
prints the certificate's fingerprint for pinning in clients; existing files are kept.
`install-units` installs the systemd units, the service user and the directories.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from seng_fw.gateway.config import (
    DEFAULT_CONTROL_SOCKET,
    load_gateway_config,
    mode_problem,
    parse_host_port,
    shared_subnet_apps,
)
from seng_fw.gateway.revocations import Revocation
from seng_fw.ops.control import (
    ControlClient,
    ControlPermissionDenied,
    ControlRequestFailed,
    ControlUnavailable,
)
from seng_fw.ops.servercert import fingerprint, generate_server_certificate
from seng_fw.policy.loader import load_policy
from seng_fw.system.cli_toolkit import (
    EXIT_NO_GATEWAY,
    EXIT_OK,
    NoGateway,
    Refused,
    UsageError,
    add_json_arguments,
    emit_json,
    error_text,
)

EXIT_UNREACHABLE = EXIT_NO_GATEWAY

ETC = Path("/etc/seng-fw")
DEFAULT_CONFIG = ETC / "gateway.yaml"
SERVICE_USER = "seng-fw"
DEFAULT_BIN = Path("/usr/local/bin/seng-fw")
UNITS = ("seng-fw.service", "seng-fw-policy.service", "seng-fw-label.service")
# The systemd/ directory of the source tree this package runs from (a checkout, or an
# editable install); `make install` passes it explicitly.
REPO_SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"


def register(sub: argparse._SubParsersAction[Any]) -> None:
    status = sub.add_parser(
        "status", help="the running gateway: listeners, policy, apps, traffic, rejections"
    )
    _client_arguments(status)
    status.set_defaults(func=_cmd_status)

    enclaves = sub.add_parser("enclaves", help="every enclave tunnel of the running gateway")
    _client_arguments(enclaves)
    enclaves.set_defaults(func=_cmd_enclaves)

    revoke = sub.add_parser(
        "revoke",
        help="close the tunnels of an app, an enclave or a MRENCLAVE and refuse them",
        description="Close the matching tunnels now and refuse new ones until `revoke "
        "--clear` (revocations survive restarts and policy reloads: state.revocations in "
        "gateway.yaml). `--list` shows them with who revoked them, when and why.",
    )
    what = revoke.add_mutually_exclusive_group(required=True)
    what.add_argument("--app", metavar="NAME", help="every enclave of this app")
    what.add_argument("--enclave", metavar="ADDR", help="the enclave holding this address")
    what.add_argument("--mrenclave", metavar="HEX", help="every enclave of this build")
    what.add_argument("--clear", action="store_true", help="lift every revocation")
    what.add_argument("--list", action="store_true", help="show every revocation: who, when, why")
    revoke.add_argument("--reason", metavar="TEXT", help="why (kept with the revocation)")
    _client_arguments(revoke)
    revoke.set_defaults(func=_cmd_revoke)

    reload = sub.add_parser(
        "reload",
        help="make the running gateway reload its policy file",
        description="Reload the gateway's policy (what SIGHUP does), reporting errors; "
        "enclaves the new policy refuses are disconnected. `seng-fw apply` also loads "
        "the nftables ruleset.",
    )
    _client_arguments(reload)
    reload.set_defaults(func=_cmd_reload)

    init = sub.add_parser(
        "init",
        help="write a commented gateway.yaml and the gateway's DTLS key and certificate",
    )
    init.add_argument("--dir", type=Path, default=ETC, help=f"default {ETC}")
    init.add_argument(
        "--listen", default="127.0.0.1:12345", metavar="ADDR:PORT", help="tunnel #1 (#2: PORT+1)"
    )
    init.add_argument(
        "--key-type",
        choices=("ecdsa-p384", "ecdsa-p256", "rsa-3072"),
        default="ecdsa-p384",
        help="server key (default ecdsa-p384, what SENG clients built with USE_ECDSA use)",
    )
    init.add_argument(
        "--root",
        type=Path,
        action="append",
        default=[],
        metavar="PEM",
        help="attestation trust anchor to copy into DIR/roots/ (repeatable)",
    )
    init.add_argument(
        "--policy", type=Path, metavar="FILE", help="policy file to copy into DIR/policies/"
    )
    init.add_argument("--tun", default="tunFA", metavar="NAME", help="TUN device (tunFA)")
    init.add_argument("--metrics", metavar="ADDR:PORT", help="Prometheus listen address")
    init.add_argument(
        "--mode",
        choices=("per_app", "shared"),
        default=None,
        help="per_app: a subnet per app; shared: one subnet, connections labelled "
        "(default: what --policy needs, shared if an app has no subnet of its own)",
    )
    init.add_argument(
        "--label-hook",
        choices=("in_process", "service"),
        default="in_process",
        help="with --mode shared: who labels, the gateway or seng-fw-label.service",
    )
    init.set_defaults(func=_cmd_init)

    units = sub.add_parser(
        "install-units",
        help="install the systemd units, the seng-fw user and the directories",
    )
    units.add_argument(
        "--source", type=Path, default=REPO_SYSTEMD, help="the systemd/ directory of seng-fw"
    )
    units.add_argument(
        "--bin",
        type=Path,
        default=DEFAULT_BIN,
        help=f"the seng-fw program the units run (default {DEFAULT_BIN})",
    )
    units.add_argument(
        "--prefix",
        type=Path,
        default=Path("/"),
        metavar="DIR",
        help="install below this directory (packaging, tests); only / creates the user",
    )
    # The old name, which read like `init --root` (a trust anchor): hidden, still accepted.
    units.add_argument(
        "--root", dest="prefix", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    units.set_defaults(func=_cmd_install_units)


# ----- talking to the gateway ----------------------------------------------------------


def _client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, metavar="PATH", help="the control socket")
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help=f"take the socket from FILE ({DEFAULT_CONFIG})"
    )
    add_json_arguments(parser)


def socket_path(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    config = args.config
    if config is None:
        if not os.access(DEFAULT_CONFIG, os.R_OK):
            return DEFAULT_CONTROL_SOCKET
        config = DEFAULT_CONFIG
    return load_gateway_config(config).control.socket  # ConfigError: exit 2 (cli.run)


def _request(args: argparse.Namespace, command: str, **request: Any) -> Any:
    """The gateway's answer; every failure is raised as the CliError of its exit code."""
    try:
        return ControlClient(socket_path(args)).request(command, **request)
    except ControlPermissionDenied as exc:  # a gateway may be running: not exit 3
        raise UsageError(f"{command}: {exc}") from None
    except ControlUnavailable as exc:
        raise NoGateway(f"{command}: {exc}") from None
    except ControlRequestFailed as exc:
        raise Refused(f"{command}: {exc}") from None


def _cmd_status(args: argparse.Namespace) -> int:
    status = _request(args, "status")
    emit_json(args, status) if args.json else print(format_status(status), end="")
    if not args.json:
        for warning in status.get("warnings", []):
            print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


def _cmd_enclaves(args: argparse.Namespace) -> int:
    enclaves = _request(args, "enclaves")
    if args.json:
        emit_json(args, {"enclaves": enclaves})
    else:
        print(format_enclaves(enclaves), end="")
    return EXIT_OK


def _cmd_revoke(args: argparse.Namespace) -> int:
    if args.list:
        return _list_revocations(args)
    result = _request(
        args,
        "revoke",
        app=args.app,
        address=args.enclave,
        mrenclave=args.mrenclave,
        clear=True if args.clear else None,
        reason=args.reason,
    )
    if result.get("warning"):
        print(f"seng-fw revoke: warning: {result['warning']}", file=sys.stderr)
    if args.json:
        emit_json(args, result)
    elif args.clear:
        print(f"{result['cleared']} revocations lifted; those enclaves may connect again")
    else:
        ended = result["ended"]
        print(f"revoked {result['revoked']}: {len(ended)} enclaves disconnected")
        if ended:
            print(format_enclaves(ended), end="")
        print(
            "new tunnels are refused until `seng-fw revoke --clear`, across restarts; "
            "to make it permanent, change the policy and apply it"
        )
    return EXIT_OK


def _list_revocations(args: argparse.Namespace) -> int:
    revocations = _request(args, "revocations")
    if args.json:
        emit_json(args, {"revocations": revocations})
    elif not revocations:
        print("no revocations")
    else:
        rows = [
            [r["kind"], r["target"] + (f" (app {r['app']}, host {r['host']})" if r.get("host")
                                       else ""), r["by"], r["at"], r.get("reason") or "-"]
            for r in revocations
        ]  # fmt: skip
        print(table(["KIND", "WHAT", "WHO", "WHEN", "WHY"], rows), end="")
    return EXIT_OK


def _cmd_reload(args: argparse.Namespace) -> int:
    result = _request(args, "reload")
    if args.json:
        emit_json(args, result)
    else:
        print(
            f"policy {result['policy']} reloaded ({result['apps']} apps, digest "
            f"{result['digest'][:16]}): {result['enclaves']} enclaves remain, "
            f"{result['closed']} disconnected"
        )
    return EXIT_OK


# ----- tables ----------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [[str(c) for c in headers], *([_cell(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [bool(rows) and all(_is_number(row[i]) for row in rows) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            cell.rjust(width) if numeric[i] else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_status(status: dict[str, Any]) -> str:
    policy = status["policy"]
    fields = [
        ("gateway", f"pid {status['pid']}, up {human_duration(status['uptime_seconds'])} "
                    f"(since {status['started_at']})"),
        ("listen", f"{status['listen'][0]} (tunnel #1), {status['listen'][1]} (tunnel #2)"),
        ("mode", f"{status['mode']}, queue: {status['queue_mode']}"),
        ("tun", f"{status['tun']['name']} (mtu {status['tun']['mtu']})"),
        ("policy", f"{policy['file']} ({policy['apps']} apps)"),
        ("digest", f"{policy['digest'][:16]}, applied {policy['applied_at']}"),
        ("ruleset", _ruleset_line(policy)),
        ("control", status["control_socket"]),
        ("metrics", status["metrics"] or "off"),
        ("enclaves", str(status["enclaves"])),
        ("admitted", str(status["admitted"])),
    ]  # fmt: skip
    handshakes = status.get("handshakes")
    if handshakes is not None:
        fields.append(("pending", (
            f"{handshakes['half_open']} handshakes half-open from "
            f"{handshakes['half_open_sources']} sources; {handshakes['started']} started, "
            f"{handshakes['certificate_timeouts']} without a certificate in time"
        )))  # fmt: skip
    if status.get("labeller"):
        labeller = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in status["labeller"].items())
        fields.append(("labeller", labeller))
    if status["revocations"]:
        revoked = [Revocation.from_json(item).describe() for item in status["revocations"]]
        fields.append(("revoked", "; ".join(revoked)))
    width = max(len(name) for name, _ in fields)
    out = "".join(f"{name.ljust(width)}  {value}\n" for name, value in fields)
    rows = []
    for app in status["apps"]:
        firewall = app["firewall_tx"], app["firewall_rx"]
        rows.append([
            app["name"] + (" (revoked)" if app["revoked"] else ""),
            app["subnet"],
            app["enclaves"],
            app["packets_in"], human_bytes(app["bytes_in"]),
            app["packets_out"], human_bytes(app["bytes_out"]),
            app["dropped_spoofed"],
            *(None if fw is None else fw["packets"] for fw in firewall),
        ])  # fmt: skip
    out += "\n" + table(
        ["APP", "SUBNET", "ENCLAVES", "PKTS FROM", "BYTES FROM", "PKTS TO", "BYTES TO",
         "SPOOFED", "FW TX", "FW RX"],
        rows,
    )  # fmt: skip
    for title, key in (("REJECTED (check)", "rejected"), ("ENDED (reason)", "ended"),
                       ("DROPPED (reason)", "dropped"), ("LIMIT HIT", "limits")):  # fmt: skip
        if status.get(key):
            out += "\n" + table([title, "COUNT"], sorted(status[key].items()))
    return out


def _ruleset_line(policy: dict[str, Any]) -> str:
    """The live ruleset's policy digest, against the admission policy's."""
    digest = policy.get("ruleset_digest")
    if digest is None:
        return "digest unknown"
    same = "same policy" if digest == policy["digest"] else "ANOTHER POLICY (see warning)"
    return f"digest {digest[:16]} ({same})"


def format_enclaves(enclaves: list[dict[str, Any]]) -> str:
    if not enclaves:
        return "no enclaves\n"
    rows = [
        [e["address"], e["app"], e["mrenclave"][:16], e["host"], e["since"],
         human_bytes(e["bytes_in"]), human_bytes(e["bytes_out"]),
         "yes" if e["paired"] else "no"]
        for e in enclaves
    ]  # fmt: skip
    return table(
        ["ADDRESS", "APP", "MRENCLAVE", "HOST", "SINCE", "FROM ENCLAVE", "TO ENCLAVE", "PAIRED"],
        rows,
    )


# ----- init ----------------------------------------------------------------------------

CONFIG_TEMPLATE = """\
# seng-fw gateway configuration, written by `seng-fw init`.
# Errors name file, line and field. Relative paths are relative to this directory.

listen:                     # facing the client hosts; tunnel #1 on port, #2 on port + 1
  address: {address}
  port: {port}

tls:                        # the gateway's DTLS certificate; clients pin its fingerprint
  certificate: server.pem
  key: server.key           # readable by root and the seng-fw group only

attestation:
  roots:                    # who signs attestation reports: Intel's IAS root CA (or a lab CA)
{roots}
  allow_status: [OK]        # accepted quote statuses; also GROUP_OUT_OF_DATE, ...
  max_report_age: 86400     # seconds; SENG clients attest when the enclave starts

tun:                        # `seng-fw apply --tun` must name the same device
  name: {tun}
  mtu: 1432

# per_app: every app its own enclave subnet; shared: one subnet, apps told apart by
# the labeller's conntrack marks.
mode: {mode}

label:                      # mode shared: the NFQUEUE labeller
  hook: {hook}     # in_process: the gateway labels; service: seng-fw-label.service
  socket: /run/seng-fw/label.sock   # where the gateway serves seng-fw-label.service
  first_queue: 0            # NFQUEUE numbers first_queue .. first_queue + queues - 1
  queues: 1                 # (seng-fw-label.service --queues must name the same)
  queue_mode: auto          # nft queue statement where the kernel has it, else iptables-nft
  new_connections_per_source: 2000  # per second and source address; the excess is
  new_connections_burst: 500        # dropped (status: rate_limited); 0 turns it off

timeouts:                   # seconds
  idle: 600                 # close a tunnel idle this long
  pairing: 30               # wait this long for tunnel #2 after tunnel #1
  assignment_resend: 1.0    # resend IpAssignment until it is acknowledged...
  assignment_attempts: 8    # ...this many times

limits:                     # what clients may cost; each hit: `seng-fw status` LIMIT HIT
  max_tunnels: 4096         # enclaves (tunnel pairs) at once...
  max_tunnels_per_host: 1024  # ...and per client host
  max_half_open: 512        # handshakes past the cookie check, not completed...
  max_half_open_per_source: 16  # ...and per source address (the oldest is evicted)
  certificate_timeout: 5    # seconds a half-open handshake has to send its certificate
  handshake_rate_per_host: 20   # new handshakes per second per client address...
  handshake_burst_per_host: 5
  handshake_rate: 100       # ...and from everyone together
  handshake_burst: 10
  max_datagram: 18445       # bytes; larger datagrams are dropped unread
  ip_options: drop          # IPv4 options from enclaves: drop (or forward)

policy: policies            # a policy file, or a directory of *.yaml parts

control:                    # `seng-fw status | enclaves | revoke | reload`
  socket: /run/seng-fw/control.sock
  mode: 0660                # octal: the gateway's user, `group` and root may connect
  group: null               # e.g. seng-fw-admin (add SupplementaryGroups= to the unit)

metrics:                    # e.g. listen: 127.0.0.1:9108 (Prometheus scrapes /metrics)
  listen: {metrics}

state:                      # kept across restarts (the unit's StateDirectory)
  revocations: /var/lib/seng-fw/revocations.json   # `seng-fw revoke`, who/when/why

log_format: text            # or json; one event per line on stderr (the journal)
"""

POLICY_TEMPLATE = """\
# seng-fw policy: every *.yaml file in this directory is part of it.
# See policies/example.yaml in the seng-fw sources; check with `seng-fw check DIR`,
# load with `seng-fw apply DIR` (or `systemctl restart seng-fw-policy`).
apps: []
"""

ROOT_PLACEHOLDER = "roots/attestation-root.pem"


def render_config(
    listen: str,
    roots: Sequence[str],
    tun: str = "tunFA",
    metrics: str | None = None,
    mode: str = "per_app",
    hook: str = "in_process",
) -> str:
    address, port = parse_host_port(listen, example="10.0.0.1:12345")
    return CONFIG_TEMPLATE.format(
        address=address,
        port=port,
        roots="\n".join(f"    - {root}" for root in roots),
        tun=tun,
        metrics=metrics or "null",
        mode=mode,
        hook=hook.ljust(10),
    )


def _service_gid() -> int | None:
    try:
        return grp.getgrnam(SERVICE_USER).gr_gid
    except KeyError:
        return None


def _write_new(path: Path, data: bytes, mode: int) -> bool:
    """Write `path` unless it exists; True if written."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(path, mode)  # whatever the umask
    return True


def secure_key(key: Path) -> None:
    """The key readable by root and the service group only (when that group exists)."""
    gid = _service_gid()
    if gid is not None and os.geteuid() == 0:
        os.chown(key, 0, gid)
        os.chmod(key, 0o640)


def _cmd_init(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    try:
        parse_host_port(args.listen, example="10.0.0.1:12345")
    except ValueError as exc:
        raise UsageError(f"--listen (the tunnel address): {exc}") from None
    try:
        if args.metrics:
            parse_host_port(args.metrics)
    except ValueError as exc:
        raise UsageError(f"--metrics: {exc}") from None
    for root in args.root:
        if not root.is_file():
            raise UsageError(f"{root}: no such file")
    if args.policy is not None and not args.policy.is_file():
        raise UsageError(f"{args.policy}: no such file")
    args.mode, why = _init_mode(args.mode, args.policy)
    try:
        for sub in ("", "policies", "roots"):
            (directory / sub).mkdir(mode=0o755, parents=True, exist_ok=True)
        report = _init_files(args, directory)
    except OSError as exc:
        raise UsageError(f"cannot write {error_text(exc)}") from None
    print("\n".join([*report, *why]))
    return EXIT_OK


def _init_mode(requested: str | None, policy_file: Path | None) -> tuple[str, list[str]]:
    """The mode the policy needs (shared if an app has no subnet of its own), and why;
    refuses per_app for such a policy (its enclaves would be cut off)."""
    if policy_file is None:
        return requested or "per_app", []
    policy = load_policy(policy_file)  # a ConfigError: every issue, exit 2 (cli.run)
    problem = mode_problem(requested or "per_app", policy)
    if problem is None:
        return requested or "per_app", []
    if requested == "per_app":
        raise UsageError(f"{policy_file}: {problem}")
    shared = ", ".join(shared_subnet_apps(policy))
    return "shared", [f"mode shared: {shared} share {policy.shared_subnet.subnet} (labeller)"]


def _init_files(args: argparse.Namespace, directory: Path) -> list[str]:
    report = []
    roots = []
    for root in args.root:
        target = directory / "roots" / root.name
        if not target.exists():
            shutil.copyfile(root, target)
            os.chmod(target, 0o644)
            report.append(f"trust anchor {target}")
        roots.append(f"roots/{root.name}")
    if args.policy is not None:
        target = directory / "policies" / args.policy.name
        if not target.exists():
            shutil.copyfile(args.policy, target)
            os.chmod(target, 0o644)
            report.append(f"policy {target}")
    elif not any((directory / "policies").glob("*.yaml")):
        _write_new(directory / "policies" / "00-apps.yaml", POLICY_TEMPLATE.encode(), 0o644)
        report.append(f"empty policy {directory / 'policies' / '00-apps.yaml'} (no apps)")

    config = directory / "gateway.yaml"
    text = render_config(
        args.listen, roots or [ROOT_PLACEHOLDER], args.tun, args.metrics, args.mode, args.label_hook
    )
    if _write_new(config, text.encode(), 0o644):
        report.append(f"configuration {config}")
    else:
        report.append(f"configuration {config} exists: kept")
    if not roots and not (directory / ROOT_PLACEHOLDER).exists():
        report.append(
            f"next: put the attestation root certificate at {directory / ROOT_PLACEHOLDER} "
            "(or run init again with --root PEM)"
        )

    cert_path, key_path = directory / "server.pem", directory / "server.key"
    if key_path.exists() and cert_path.exists():
        report.append(f"server key and certificate exist: kept ({cert_path})")
    else:
        cert, key = generate_server_certificate("seng-fw gateway", key_type=args.key_type)
        key_path.unlink(missing_ok=True)
        _write_new(key_path, key, 0o600)
        cert_path.unlink(missing_ok=True)
        _write_new(cert_path, cert, 0o644)
        report.append(f"server key ({args.key_type}) {key_path}, certificate {cert_path}")
    secure_key(key_path)
    report.append(f"certificate SHA-256 fingerprint (pin it in clients): "
                  f"{fingerprint(cert_path.read_bytes())}")  # fmt: skip
    return report


# ----- install-units -------------------------------------------------------------------

SYSCTL_FILE = "60-seng-fw.conf"
SYSCTL_TEXT = "# seng-fw: the gateway routes between enclave tunnels and the network\n" \
              "net.ipv4.ip_forward = 1\n"  # fmt: skip


def _cmd_install_units(args: argparse.Namespace) -> int:
    source: Path = args.source
    root: Path = args.prefix
    live = root == Path("/")
    missing = [name for name in (*UNITS, "seng-fw.sysusers") if not (source / name).is_file()]
    if missing:
        raise UsageError(f"{source}: missing {', '.join(missing)} (use --source DIR)")
    try:
        done = install_units(source, root, args.bin)
    except OSError as exc:
        raise UsageError(f"cannot install: {error_text(exc)}") from None
    print("\n".join(done))
    if live:
        for warning in _check_program(args.bin):
            print(f"warning: {warning}", file=sys.stderr)
        print("next: seng-fw init (if not done), then: systemctl enable --now seng-fw.service")
    return EXIT_OK


def install_units(source: Path, root: Path, program: Path) -> list[str]:
    """Copy units, sysusers and sysctl files below `root`; on the live system (root
    "/") also create the user, apply the sysctl and reload systemd."""
    live = root == Path("/")

    def at(path: str) -> Path:
        return root / path.lstrip("/")

    done = []
    unit_dir = at("/etc/systemd/system")
    unit_dir.mkdir(parents=True, exist_ok=True)
    for name in UNITS:
        text = (source / name).read_text()
        text = text.replace(str(DEFAULT_BIN), str(program))
        (unit_dir / name).write_text(text)
        os.chmod(unit_dir / name, 0o644)
        done.append(f"unit {unit_dir / name}")
    sysusers = at("/etc/sysusers.d/seng-fw.conf")
    sysusers.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "seng-fw.sysusers", sysusers)
    sysctl = at(f"/etc/sysctl.d/{SYSCTL_FILE}")
    sysctl.parent.mkdir(parents=True, exist_ok=True)
    sysctl.write_text(SYSCTL_TEXT)
    done += [f"service user {sysusers}", f"IPv4 forwarding {sysctl}"]
    for path, mode in (("/etc/seng-fw", 0o755), ("/etc/seng-fw/policies", 0o755)):
        at(path).mkdir(mode=mode, parents=True, exist_ok=True)
    at("/var/lib/seng-fw").mkdir(mode=0o750, parents=True, exist_ok=True)
    if not live:
        return done
    _run(["systemd-sysusers", str(sysusers)], fallback=_useradd)
    user_gid = _service_gid()
    if user_gid is not None:
        os.chown("/var/lib/seng-fw", _uid(SERVICE_USER), user_gid)
    if Path("/etc/seng-fw/server.key").exists():
        secure_key(Path("/etc/seng-fw/server.key"))
    _run(["sysctl", "-q", "-p", str(sysctl)])
    if Path("/run/systemd/system").is_dir():  # systemd is the init system
        _run(["systemctl", "daemon-reload"])
    return done


def _uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def _useradd() -> None:
    if _service_gid() is None:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--home-dir", "/var/lib/seng-fw",
             "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
            check=True,
        )  # fmt: skip


def _run(argv: list[str], fallback: Callable[[], None] | None = None) -> None:
    if shutil.which(argv[0]) is None:
        if fallback is None:
            raise OSError(f"{argv[0]} not found")
        fallback()
        return
    subprocess.run(argv, check=True)


def _check_program(program: Path) -> list[str]:
    """Why the service user could not run `program`, if it could not."""
    if not os.access(program, os.X_OK):
        return [f"{program} does not exist or is not executable: run `make install`"]
    problems = []
    for parent in Path(os.path.realpath(program)).parents:
        if not os.stat(parent).st_mode & 0o001:
            problems.append(
                f"{program} lies under {parent}, which other users cannot enter: the "
                "seng-fw user could not run it; install with `make install` (/opt/seng-fw)"
            )
            break
    return problems
