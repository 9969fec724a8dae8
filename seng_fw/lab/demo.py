"""`seng-fw lab up | demo | down`: the demo enclaves, the flows tried, the result table."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TextIO

from seng_fw.lab.lab import (
    DEFAULT_PREFIX,
    DEMO_ENCLAVES,
    DEMO_POLICY,
    ECHO_PORT,
    SHARED_DEMO_ENCLAVES,
    SHARED_DEMO_POLICY,
    EnclaveSpec,
    Lab,
    LabError,
    RunningEnclave,
)
from seng_fw.lab.services import probe_icmp, probe_tcp, probe_udp
from seng_fw.lab.topology import EXTERNAL
from seng_fw.system.cli_toolkit import EXIT_OK, EXIT_REFUSED


@dataclass(frozen=True)
class Outcome:
    enclave: str
    address: str
    flow: str
    passed: bool
    why: str


@dataclass(frozen=True)
class DemoPlan:
    """A demo: policy, gateway mode, enclaves, and what the policy says of each flow."""

    policy: Path
    enclaves: tuple[EnclaveSpec, ...]
    gateway_settings: Mapping[str, Any]
    # enclave name (or app) -> flow kind -> (allowed, the rule that decides it)
    expected: Mapping[str, Mapping[str, tuple[bool, str]]]
    # TCP echo from one enclave to another (on another client host) -> allowed, why
    pairs: Mapping[tuple[str, str], tuple[bool, str]] = field(default_factory=dict)

    def with_policy(self, policy: Path) -> DemoPlan:
        """Another policy: the expectations are this plan's, so they are dropped."""
        if policy == self.policy:
            return self
        return replace(self, policy=policy, expected={}, pairs={})


ALLOWED, REFUSED = (True, "policy allows it"), (False, "policy refuses it")

_WEBAPP_FLOWS = {"tcp": ALLOWED, "udp": REFUSED, "icmp": ALLOWED, "ingress icmp": ALLOWED}

# What policies/lab/demo.yaml allows, per app and flow (the demo checks it holds).
PER_APP_DEMO = DemoPlan(
    DEMO_POLICY,
    DEMO_ENCLAVES,
    {},
    {
        "webapp": _WEBAPP_FLOWS,
        "webapp-dcap": _WEBAPP_FLOWS,  # the same app, attested with DCAP
        "nginx": {"tcp": REFUSED, "udp": ALLOWED, "icmp": REFUSED, "ingress icmp": REFUSED},
    },
)


# What policies/lab/demo-shared.yaml allows: the labeller's marks tell apps, their
# categories and their client hosts apart on the one shared subnet.
SHARED_DEMO = DemoPlan(
    SHARED_DEMO_POLICY,
    SHARED_DEMO_ENCLAVES,
    {"mode": "shared"},
    {
        "webapp@clienta": {
            "tcp": (True, "src-app webapp"),
            "udp": (False, "no rule"),
            "icmp": (True, "src-cat frontend on clienta"),
            "ingress icmp": (True, "dst-cat frontend"),
        },
        "webapp@clientb": {
            "tcp": (True, "src-app webapp"),
            "udp": (False, "no rule"),
            "icmp": (False, "frontend pings from clienta only"),
            "ingress icmp": (True, "dst-cat frontend"),
        },
        "nginx@clienta": {
            "tcp": (False, "webapp's rule, not nginx's"),
            "udp": (True, "src-cat backend"),
            "icmp": (True, "src-cat frontend on clienta"),
            "ingress icmp": (True, "dst-cat frontend"),
        },
        "db@clienta": {
            "tcp": (False, "no rule"),
            "udp": (True, "src-cat backend"),
            "icmp": (False, "db is not frontend"),
            "ingress icmp": (False, "db is not frontend"),
        },
        "db@clientb": {
            "tcp": (False, "no rule"),
            "udp": (True, "src-cat backend"),
            "icmp": (False, "db is not frontend"),
            "ingress icmp": (False, "db is not frontend"),
        },
    },
    {
        ("webapp@clienta", "db@clientb"): (True, "webapp -> backend on clientb, db <- webapp"),
        ("webapp@clientb", "db@clienta"): (False, "backend on clienta: wrong host"),
        ("webapp@clientb", "nginx@clienta"): (False, "backend on clienta: wrong host"),
        ("db@clientb", "nginx@clienta"): (False, "no rule for db"),
        ("nginx@clienta", "webapp@clientb"): (False, "no rule for nginx"),
    },
)


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
            parser.add_argument(
                "--shared",
                action="store_true",
                help="one shared enclave subnet: the gateway labels connections by identity "
                "(policies/lab/demo-shared.yaml)",
            )
            parser.add_argument("--policy", type=Path, help="policy file (default: the demo's)")
        if name == "demo":
            parser.add_argument("--keep", action="store_true", help="leave the lab running")
        parser.set_defaults(func=func)


def demo_plan(args: argparse.Namespace) -> DemoPlan:
    plan = SHARED_DEMO if getattr(args, "shared", False) else PER_APP_DEMO
    policy = getattr(args, "policy", None)
    return plan if policy is None else plan.with_policy(policy)


def plan_lab(plan: DemoPlan, prefix: str = DEFAULT_PREFIX, state_dir: Path | None = None) -> Lab:
    return Lab(prefix, state_dir, plan.policy, dict(plan.gateway_settings))


def start_demo_enclaves(lab: Lab, plan: DemoPlan = PER_APP_DEMO) -> list[RunningEnclave]:
    enclaves = [lab.start_enclave(spec) for spec in plan.enclaves]
    for enclave in enclaves:
        enclave.wait_settled()
    return enclaves


def refusal(lab: Lab, enclave: RunningEnclave) -> str:
    """Why the gateway refused the enclave, from its log (it may lag a moment)."""
    deadline = time.monotonic() + 2.0
    while (reason := lab.rejection_reason(enclave)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return reason or str(enclave.state.get("reason", "no tunnel"))


def _why(passed: bool, expected: tuple[bool, str] | None) -> str:
    if expected is None:
        return "answered" if passed else "no answer"
    allowed, rule = expected
    if passed != allowed:
        return f"UNEXPECTED: the policy says {'allow' if allowed else 'refuse'} ({rule})"
    return rule if passed else f"{rule}: dropped at the gateway"


def _expected(plan: DemoPlan, enclave: RunningEnclave) -> Mapping[str, tuple[bool, str]]:
    name = enclave.spec.name
    app = str(enclave.state.get("app") or name.split("@")[0])
    return plan.expected.get(name) or plan.expected.get(app) or {}


def try_flows(lab: Lab, enclaves: list[RunningEnclave], plan: DemoPlan) -> list[Outcome]:
    ext = str(lab.external)
    outcomes = []
    up: dict[str, RunningEnclave] = {}
    for enclave in enclaves:
        name = enclave.spec.name
        if enclave.state.get("status") != "up" or enclave.address is None:
            outcomes.append(Outcome(name, "-", "tunnel setup", False, refusal(lab, enclave)))
            continue
        up[name] = enclave
        expected = _expected(plan, enclave)
        ns, source = lab.ns(enclave.spec.host), enclave.address
        for kind, flow, passed in (
            ("tcp", f"tcp {ext}:{ECHO_PORT}", probe_tcp(ns, source, ext, ECHO_PORT)),
            ("udp", f"udp {ext}:{ECHO_PORT}", probe_udp(ns, source, ext, ECHO_PORT)),
            ("icmp", f"icmp {ext}", probe_icmp(ns, source, ext)),
        ):
            why = _why(passed, expected.get(kind))
            outcomes.append(Outcome(name, str(source), flow, passed, why))
    for name, enclave in up.items():
        passed = probe_icmp(lab.ns(EXTERNAL), None, str(enclave.address))
        why = _why(passed, _expected(plan, enclave).get("ingress icmp"))
        outcomes.append(Outcome("ext host", ext, f"icmp {enclave.address} ({name})", passed, why))
    serving: set[str] = set()
    for (client, server), rule in plan.pairs.items():
        if client not in up or server not in up:
            continue
        source_address, target = up[client].address, up[server].address
        if server not in serving:
            lab.start_echo(up[server])
            serving.add(server)
        passed = probe_tcp(lab.ns(up[client].spec.host), source_address, str(target), ECHO_PORT)
        flow = f"tcp {target}:{ECHO_PORT} ({server})"
        outcomes.append(Outcome(client, str(source_address), flow, passed, _why(passed, rule)))
    leased = {address for e in enclaves if (address := e.address) is not None}
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
    plan = demo_plan(args)
    lab = plan_lab(plan, args.prefix, args.state_dir)
    try:
        lab.up()
        enclaves = start_demo_enclaves(lab, plan)
    except LabError as exc:
        print(f"seng-fw lab up: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    for enclave in enclaves:
        state = enclave.state
        detail = state.get("address") or refusal(lab, enclave)
        print(f"{enclave.spec.name:24} {state.get('status', '?'):8} {detail}")
    print(f"lab {lab.prefix} is up; state in {lab.state_dir}; `seng-fw lab down` removes it")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    plan = demo_plan(args)
    lab = plan_lab(plan, args.prefix, args.state_dir)
    try:
        lab.up()
        mode = "one shared subnet, connections labelled" if args.shared else "a subnet per app"
        print(f"lab up: namespaces {lab.prefix}*, gateway on {lab.gateway_lan}:12345/12346 "
              f"({mode}), policy {plan.policy}")  # fmt: skip
        enclaves = start_demo_enclaves(lab, plan)
        outcomes = try_flows(lab, enclaves, plan)
        print_table(outcomes)
    except LabError as exc:
        print(f"seng-fw lab demo: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        if not args.keep:
            lab.down()
    if args.keep:
        print(f"lab left running (state in {lab.state_dir}); `seng-fw lab down` removes it")
    unexpected = [o for o in outcomes if o.why.startswith("UNEXPECTED")]
    if unexpected:
        print(f"seng-fw lab demo: {len(unexpected)} flows did not go as the policy says",
              file=sys.stderr)  # fmt: skip
        return EXIT_REFUSED
    return EXIT_OK


def _down(args: argparse.Namespace) -> int:
    Lab(args.prefix, args.state_dir).down()
    return EXIT_OK
