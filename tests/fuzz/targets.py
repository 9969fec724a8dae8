"""Fuzz targets: every parser of hostile or operator input, one function of bytes each.

A target calls one parser on the input and succeeds if the parser returns a value or
raises its documented error type (`Target.errors`); anything else escaping is a crash.
Some targets check more (e.g. the record layer never raises and counts every drop).

The same targets serve the atheris campaigns (tests/fuzz/run.py: coverage-guided, in a
subprocess per target) and the pytest replay of the seed corpora and crash inputs
(tests/fuzz/test_fuzz_ci.py). Seeds live in tests/fuzz/<target>/; `python -m
tests.fuzz.seeds` rewrites the generated ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from cryptography import x509

from seng_fw.attest.collateral import CollateralError, CollateralStore, parse_bundle
from seng_fw.attest.dcap import DcapPolicy, verify_dcap_quote
from seng_fw.attest.ias import parse_report
from seng_fw.attest.identity import AttestationRejected
from seng_fw.attest.quote import parse_quote_body
from seng_fw.attest.ratls import parse_ratls_certificate
from seng_fw.attest.ratls_dcap import parse_dcap_certificate
from seng_fw.gateway.config import load_gateway_config
from seng_fw.label.registry import Registry, apply_line, parse_stats
from seng_fw.ops.control import ControlServer
from seng_fw.policy.loader import load_policy
from seng_fw.policy.yamlfile import ConfigError
from seng_fw.tunnel import packets
from seng_fw.tunnel.messages import IpAssignAck, IpAssignment, SetupMessageError
from seng_fw.tunnel.record import DTLS_1_2, HEADER_LEN, RecordLayer, check_framing
from seng_fw.tunnel.setup import ClientSetup, ServerSetup, SetupFailed

FUZZ_DIR = Path(__file__).parent
FIXTURES = FUZZ_DIR.parent / "fixtures"
# Inside the genuine DCAP collateral's validity (tests/fixtures/dcap/README.md).
DCAP_AT = datetime(2025, 7, 1, tzinfo=UTC)

# Fixed record-layer keys: the seeds in dtls_record/ are sealed with them, so mutations
# of a seed reach the decryption and the replay window, not only the header checks.
RECORD_KEY = bytes(range(16))
RECORD_SALT = b"\x01\x02\x03\x04"


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], object]
    errors: tuple[type[BaseException], ...]
    what: str

    @property
    def corpus(self) -> Path:
        return FUZZ_DIR / self.name


class Crash(AssertionError):
    """A target's own invariant failed (beyond "returns or raises its error")."""


def check(target: Target, data: bytes) -> None:
    """One input: the documented outcomes pass, anything else propagates."""
    with contextlib.suppress(target.errors):
        target.run(data)


# --- attestation --------------------------------------------------------------------


def ratls_epid(data: bytes) -> object:
    return parse_ratls_certificate(data)


def ratls_dcap(data: bytes) -> object:
    return parse_dcap_certificate(data)


def ias_report(data: bytes) -> object:
    return parse_report(data)


def epid_quote_body(data: bytes) -> object:
    return parse_quote_body(data)


@cache
def _dcap_policy() -> DcapPolicy:
    root = x509.load_pem_x509_certificate(
        (FIXTURES / "dcap" / "intel-sgx-root-ca.pem").read_bytes()
    )
    bundle = parse_bundle((FIXTURES / "dcap" / "dcap-qvl-sgx-collateral.json").read_bytes())
    return DcapPolicy(
        roots=(root,),
        collateral=CollateralStore([bundle]),
        allowed_statuses=frozenset({"UpToDate", "ConfigurationAndSWHardeningNeeded"}),
    )


def dcap_quote(data: bytes) -> object:
    """The whole DCAP quote path (our header checks, dcap-qvl's parser and verifier) against
    Intel's root and the genuine collateral, as of a date inside its validity."""
    return verify_dcap_quote(data, _dcap_policy(), DCAP_AT)


def dcap_collateral(data: bytes) -> object:
    return parse_bundle(data)


# --- tunnel -------------------------------------------------------------------------


def dtls_record(data: bytes) -> object:
    """The established-session record layer: never raises, every record of a datagram is
    either opened or counted as a drop; and the mbed TLS path's framing screen agrees
    with it on well-framed datagrams."""
    layer = RecordLayer(RECORD_KEY, RECORD_SALT, RECORD_KEY, RECORD_SALT)
    opened_before = layer.records_opened
    out = layer.open(data)
    dropped = sum(layer.drops.values())
    if data and not out and layer.records_opened == opened_before and dropped == 0:
        raise Crash("a datagram was neither opened nor counted as dropped")
    framed = check_framing(data)
    if framed:
        # Every record header of a well-framed datagram carries DTLS's 0xFE major version.
        offset = 0
        while offset < len(data):
            if data[offset + 1] != DTLS_1_2 >> 8:
                raise Crash("check_framing accepted a record of another major version")
            offset += HEADER_LEN + int.from_bytes(data[offset + 11 : offset + 13], "big")
    # A second open of the same datagram opens nothing new (replays are refused).
    if layer.open(data):
        raise Crash("a replayed datagram was opened twice")
    return out


_ASSIGNMENT = IpAssignment(
    IPv4Address("10.1.0.2"), IPv4Address("255.255.255.0"), IPv4Address("10.1.0.1")
)


def setup_messages(data: bytes) -> object:
    """Both setup messages and both sides' state machines on the same bytes."""
    for decode in (IpAssignment.decode, IpAssignAck.decode):
        with contextlib.suppress(SetupMessageError):
            decode(data)
    server = ServerSetup(_ASSIGNMENT, 0.0, 1.0, 3)
    with contextlib.suppress(SetupFailed):
        server.receive_ack(data)
    client = ClientSetup()
    try:
        client.receive_record(_ASSIGNMENT.encode())
        client.receive_record(data)
    except SetupFailed:
        pass
    return ClientSetup().receive_record(data)


def ipv4(data: bytes) -> object:
    """The data path's IPv4 check: a bool; when it says yes, the address fields are there."""
    ok = packets.is_ipv4(data)
    if not isinstance(ok, bool):
        raise Crash(f"is_ipv4 returned {ok!r}")
    if ok and (len(packets.source(data)) != 4 or len(packets.destination(data)) != 4):
        raise Crash("is_ipv4 accepted a packet without both addresses")
    return ok


# --- configuration ------------------------------------------------------------------


@cache
def _scratch() -> Path:
    """One private directory per process for the loaders' input files."""
    return Path(tempfile.mkdtemp(prefix="seng-fuzz-"))


def _as_file(data: bytes, name: str) -> Path:
    path = _scratch() / name
    path.write_bytes(data)
    return path


def policy(data: bytes) -> object:
    return load_policy(_as_file(data, "policy.yaml"))


def gateway_config(data: bytes) -> object:
    return load_gateway_config(_as_file(data, "gateway.yaml"))


# --- local sockets ------------------------------------------------------------------


class _Handler:
    """A gateway that answers every command (revoke echoes its arguments)."""

    def status(self) -> dict[str, Any]:
        return {"tunnels": 0}

    def enclaves(self) -> list[dict[str, Any]]:
        return []

    def revoke(
        self, *, app: str | None, address: str | None, mrenclave: str | None, clear: bool
    ) -> dict[str, Any]:
        return {"app": app, "address": address, "mrenclave": mrenclave, "clear": clear}

    async def reload(self) -> dict[str, Any]:
        return {"reloaded": True}


@cache
def _control() -> tuple[ControlServer, asyncio.AbstractEventLoop]:
    server = ControlServer(_Handler(), Path(_scratch() / "control.sock"))  # type: ignore[arg-type]
    return server, asyncio.new_event_loop()


def control_request(data: bytes) -> object:
    """`ControlServer.respond` never raises and answers every line with ok true/false;
    an "internal error" answer means a request escaped the parser's checks."""
    server, loop = _control()
    answer = loop.run_until_complete(server.respond(data))
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise Crash(f"odd answer {answer!r}")
    if not answer["ok"] and str(answer.get("error", "")).startswith("internal error"):
        raise Crash(answer["error"])
    return answer


def label_registry(data: bytes) -> object:
    """Both directions of the label socket: a labeller applying a gateway line
    (`apply_line`, ValueError) and the gateway reading a labeller's stats line
    (`parse_stats`, None for anything else)."""
    parse_stats(data)
    return apply_line(Registry(), data)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("ratls_epid", ratls_epid, (AttestationRejected,), "EPID RA-TLS certificate (DER)"),
        Target("ratls_dcap", ratls_dcap, (AttestationRejected,), "DCAP RA-TLS certificate (DER)"),
        Target("ias_report", ias_report, (AttestationRejected,), "IAS attestation report (JSON)"),
        Target("epid_quote_body", epid_quote_body, (AttestationRejected,), "EPID quote body"),
        Target("dcap_quote", dcap_quote, (AttestationRejected,), "DCAP SGX quote, verified"),
        Target("dcap_collateral", dcap_collateral, (CollateralError,), "DCAP collateral JSON"),
        Target("dtls_record", dtls_record, (), "DTLS 1.2 record datagram, established session"),
        Target("setup_messages", setup_messages, (SetupFailed,), "SENG IpAssignment/ACK"),
        Target("ipv4", ipv4, (), "IPv4 packet from an enclave"),
        Target("policy", policy, (ConfigError,), "policy YAML file"),
        Target("gateway_config", gateway_config, (ConfigError,), "gateway.yaml"),
        Target("control_request", control_request, (), "control socket request line"),
        Target("label_registry", label_registry, (ValueError,), "label socket line"),
    )
}


def corpus_files(target: Target) -> list[Path]:
    if not target.corpus.is_dir():
        return []
    return sorted(p for p in target.corpus.iterdir() if p.is_file() and not p.name.startswith("."))
