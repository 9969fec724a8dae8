"""`seng-fw lab up | demo | down`: the demo enclaves, the flows tried, the result table."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TextIO

from seng_fw.cli import EXIT_OK, EXIT_REJECTED
from seng_fw.lab.lab import (
    DEFAULT_PREFIX,
    DEMO_ENCLAVES,
    DEMO_POLICY,
    ECHO_PORT,
    Lab,
    LabError,
    RunningEnclave,
)
from seng_fw.lab.services import probe_icmp, probe_tcp, probe_udp
from seng_fw.netns import EXTERNAL


@dataclass(frozen=True)
class Outcome:
    enclave: str
    address: str
    flow: str
    passed: bool
    why: str


def register(lab_sub: argparse._SubParsersAction[Any]) -> None:
    for name, help_text, func in (
        ("up", "build the namespace lab, start the gateway and the demo enclaves", _up),
        ("demo", "run the lab demo: allowed and refused traffic, as a table", _demo),
        ("down", "remove everything the lab created", _down),
    ):
        parser = lab_sub.add_parser(name, help=help_text)
        parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="namespace name prefix")
        parser.add_argument("--state-dir", type=Path, help="default /run/seng-fw-lab/PREFIX")
        if name != "down":
            parser.add_argument("--policy", type=Path, default=DEMO_POLICY, help="policy file")
        if name == "demo":
            parser.add_argument("--keep", action="store_true", help="leave the lab running")
        parser.set_defaults(func=func)


def _lab(args: argparse.Namespace) -> Lab:
    return Lab(args.prefix, args.state_dir, getattr(args, "policy", DEMO_POLICY))


def start_demo_enclaves(lab: Lab) -> list[RunningEnclave]:
    enclaves = [lab.start_enclave(spec) for spec in DEMO_ENCLAVES]
    for enclave in enclaves:
        enclave.wait_settled()
    return enclaves


def refusal(lab: Lab, enclave: RunningEnclave) -> str:
    """Why the gateway refused the enclave, from its log (it may lag a moment)."""
    deadline = time.monotonic() + 2.0
    while (reason := lab.rejection_reason(enclave)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return reason or str(enclave.state.get("reason", "no tunnel"))


# What policies/lab/demo.yaml allows, per app and flow (the demo checks it holds).
DEMO_EXPECTED = {
    "webapp": {"tcp": True, "udp": False, "icmp": True, "ingress icmp": True},
    "nginx": {"tcp": False, "udp": True, "icmp": False, "ingress icmp": False},
}


def _why(passed: bool, expected: bool | None) -> str:
    if expected is None:
        return "answered" if passed else "no answer"
    if passed != expected:
        return "UNEXPECTED: the policy says " + ("allow" if expected else "refuse")
    return "policy allows it" if passed else "policy refuses it: dropped at the gateway"


def try_flows(lab: Lab, enclaves: list[RunningEnclave]) -> list[Outcome]:
    ext = str(lab.external)
    expected = DEMO_EXPECTED if lab.policy == DEMO_POLICY else {}
    outcomes = []
    first_of_app: dict[str, RunningEnclave] = {}
    for enclave in enclaves:
        name = enclave.spec.name
        if enclave.state.get("status") != "up" or enclave.address is None:
            outcomes.append(Outcome(name, "-", "tunnel setup", False, refusal(lab, enclave)))
            continue
        app = str(enclave.state.get("app") or name.split("@")[0])
        first_of_app.setdefault(app, enclave)
        ns, source = lab.ns(enclave.spec.host), enclave.address
        for kind, flow, passed in (
            ("tcp", f"tcp {ext}:{ECHO_PORT}", probe_tcp(ns, source, ext, ECHO_PORT)),
            ("udp", f"udp {ext}:{ECHO_PORT}", probe_udp(ns, source, ext, ECHO_PORT)),
            ("icmp", f"icmp {ext}", probe_icmp(ns, source, ext)),
        ):
            why = _why(passed, expected.get(app, {}).get(kind))
            outcomes.append(Outcome(name, str(source), flow, passed, why))
    for app, enclave in first_of_app.items():
        passed = probe_icmp(lab.ns(EXTERNAL), None, str(enclave.address))
        why = _why(passed, expected.get(app, {}).get("ingress icmp"))
        outcomes.append(Outcome("ext host", ext, f"icmp {enclave.address} ({app})", passed, why))
    leased = {e.address for e in enclaves if e.address is not None}
    if leased:
        unleased = _unleased_neighbour(min(leased), leased)
        passed = probe_icmp(lab.ns(EXTERNAL), None, str(unleased))
        why = "unexpected answer" if passed else "no enclave holds it: dropped"
        outcomes.append(Outcome("ext host", ext, f"icmp {unleased}", passed, why))
    return outcomes


def _unleased_neighbour(address: IPv4Address, leased: set[IPv4Address]) -> IPv4Address:
    candidate = address + 100
    while candidate in leased:
        candidate += 1
    return candidate


def print_table(outcomes: list[Outcome], out: TextIO = sys.stdout) -> None:
    header = ("ENCLAVE", "ADDRESS", "FLOW", "RESULT", "WHY")
    rows = [
        (o.enclave, o.address, o.flow, "PASSED" if o.passed else "REFUSED", o.why) for o in outcomes
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]), file=out)


def _up(args: argparse.Namespace) -> int:
    lab = _lab(args)
    try:
        lab.up()
        enclaves = start_demo_enclaves(lab)
    except LabError as exc:
        print(f"seng-fw lab up: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    for enclave in enclaves:
        state = enclave.state
        detail = state.get("address") or refusal(lab, enclave)
        print(f"{enclave.spec.name:24} {state.get('status', '?'):8} {detail}")
    print(f"lab {lab.prefix} is up; state in {lab.state_dir}; `seng-fw lab down` removes it")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    lab = _lab(args)
    try:
        lab.up()
        print(f"lab up: namespaces {lab.prefix}*, gateway on {lab.gateway_lan}:12345/12346")
        enclaves = start_demo_enclaves(lab)
        outcomes = try_flows(lab, enclaves)
        print_table(outcomes)
    except LabError as exc:
        print(f"seng-fw lab demo: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    finally:
        if not args.keep:
            lab.down()
    if args.keep:
        print(f"lab left running (state in {lab.state_dir}); `seng-fw lab down` removes it")
    return EXIT_OK


def _down(args: argparse.Namespace) -> int:
    _lab(args).down()
    return EXIT_OK
