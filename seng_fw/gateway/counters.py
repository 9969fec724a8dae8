"""The gateway's counters, with names mypy checks.

Every reason a tunnel is refused, ended or a packet dropped is a member of an enum (or
a small dataclass over one), from the core through `GatewayService.snapshot()` to the
control socket's `status` and the Prometheus labels, so a misspelt reason is a type
error rather than a new, silently empty series. What operators see is unchanged: the
reasons' text (`str(reason)`) is the JSON key and the metric label, and `flat()` gives
the `rejected.<check>`-style names of the stop log line.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from seng_fw.attest.identity import Check
from seng_fw.policy.admission import AdmissionCheck
from seng_fw.tunnel.dtls import CloseReason
from seng_fw.tunnel.setup import SetupCheck


class Drop(enum.StrEnum):
    """Why a datagram or packet was dropped (`dropped` in status, the metric's reason)."""

    NOT_CLIENT_HELLO = "not_client_hello"  # first datagram of an unknown peer
    NO_ENCLAVE = "no_enclave"  # TUN packet for an address nobody holds
    TUN_NOT_IPV4 = "tun_not_ipv4"
    NOT_IPV4 = "not_ipv4"  # a record on tunnel #1 that is no IPv4 packet
    DOWNLINK_RECORD = "downlink_record"  # SENG clients send nothing on tunnel #2
    SPOOFED = "spoofed"  # source address not the enclave's
    SEND_ERROR = "send_error"  # sendto failed
    TUN_WRITE_ERROR = "tun_write_error"
    IP_OPTIONS = "ip_options"  # IPv4 options from an enclave (limits.ip_options: drop)


class Refusal(enum.StrEnum):
    """The gateway's own reasons to refuse an attested, admitted tunnel."""

    POOL_EXHAUSTED = "pool_exhausted"
    UNPAIRED_DOWNLINK = "unpaired_downlink"
    MAX_TUNNELS = "max_tunnels"  # gateway.yaml limits
    MAX_TUNNELS_PER_HOST = "max_tunnels_per_host"


class Limit(enum.StrEnum):
    """A limit of gateway.yaml `limits:` that refused or evicted something (its key)."""

    MAX_TUNNELS = "max_tunnels"
    MAX_TUNNELS_PER_HOST = "max_tunnels_per_host"
    MAX_HALF_OPEN = "max_half_open"  # the oldest half-open handshake evicted
    MAX_HALF_OPEN_PER_SOURCE = "max_half_open_per_source"
    HANDSHAKE_RATE_PER_HOST = "handshake_rate_per_host"  # a datagram not even cookie-checked
    HANDSHAKE_RATE = "handshake_rate"
    MAX_DATAGRAM = "max_datagram"
    MAX_QUEUED_HANDSHAKES = "max_queued_handshakes"  # the oldest waiting hello evicted
    HANDSHAKE_QUEUE_TIMEOUT = "handshake_queue_timeout"  # a hello waited too long
    HANDSHAKE_STALLED = "handshake_stalled"  # no certificate in time: slot given to a waiter


# Why a tunnel was refused: attestation, admission, or the gateway itself.
RejectReason = Check | AdmissionCheck | Refusal


class EndKind(enum.StrEnum):
    PAIRING_TIMEOUT = "pairing_timeout"
    IDLE_TIMEOUT = "idle_timeout"
    RECONNECTED = "reconnected"  # the client restarted (a new handshake from its address)
    SUPERSEDED = "superseded"  # the same enclave opened tunnel #1 again before pairing
    SHUTDOWN = "shutdown"


@dataclass(frozen=True)
class Revoked:
    """A reload or revocation no longer admits the enclave (or moved its subnet)."""

    check: AdmissionCheck | Literal["subnet_changed"]

    def __str__(self) -> str:
        return f"revoked.{self.check}"


@dataclass(frozen=True)
class PeerClosed:
    reason: CloseReason

    def __str__(self) -> str:
        return f"peer_closed.{self.reason}"


# Why an enclave's tunnels ended; `str()` is the name operators see.
EndReason = EndKind | SetupCheck | Revoked | PeerClosed


class Fault(enum.StrEnum):
    """Trouble inside the gateway that it survives."""

    INTERNAL_ERROR_DATAGRAM = "internal_error.datagram"  # an exception handling one
    PEER_SOCKET_ERROR = "peer_socket_error"  # no receive queue of its own (peersockets)
    TUN_READ_ERROR = "tun_read_error"  # a read of the TUN device failed (not fatal)
    TUN_LOST = "tun_lost"  # the TUN device is gone: the gateway stops (exit 4)
    INTERNAL_ERROR_TIMERS = "internal_error.timers"  # an exception in one timer pass


@dataclass(slots=True)
class Traffic:
    """One enclave's (or one app's) tunnel traffic."""

    packets_in: int = 0  # enclave -> gateway (tunnel #1), written to the TUN device
    bytes_in: int = 0
    packets_out: int = 0  # TUN device -> enclave (tunnel #2)
    bytes_out: int = 0
    dropped_spoofed: int = 0  # from the enclave with a source address not its own

    def add(self, other: Traffic) -> None:
        self.packets_in += other.packets_in
        self.bytes_in += other.bytes_in
        self.packets_out += other.packets_out
        self.bytes_out += other.bytes_out
        self.dropped_spoofed += other.dropped_spoofed

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


TRAFFIC_KEYS = tuple(Traffic.__dataclass_fields__)


@dataclass
class GatewayCounters:
    admitted: int = 0
    reconnect_attempts: int = 0
    rejected: Counter[RejectReason] = field(default_factory=Counter)
    ended: Counter[EndReason] = field(default_factory=Counter)
    dropped: Counter[Drop] = field(default_factory=Counter)
    closed: Counter[CloseReason] = field(default_factory=Counter)  # DTLS sessions ended
    reconnect_failed: Counter[CloseReason] = field(default_factory=Counter)
    faults: Counter[Fault] = field(default_factory=Counter)
    limits: Counter[Limit] = field(default_factory=Counter)
    handshakes_started: int = 0  # past the cookie check and the rate limits
    certificate_timeouts: int = 0  # half-open, dropped without a client certificate
    handshakes_queued: int = 0  # cookie-checked hellos that waited for a handshake slot
    hellos_while_queued: int = 0  # repeated hellos of peers waiting in that queue
    # Traffic of ended enclaves, per app, so that totals never go backwards.
    ended_traffic: dict[str, Traffic] = field(default_factory=dict)

    def flat(self) -> dict[str, int]:
        """Every non-zero counter under its dotted name (`rejected.unknown_mrenclave`)."""
        out: dict[str, int] = {}
        for name, value in (
            ("admitted", self.admitted),
            ("reconnect_attempts", self.reconnect_attempts),
            ("handshakes.started", self.handshakes_started),
            ("handshakes.certificate_timeout", self.certificate_timeouts),
            ("handshakes.queued", self.handshakes_queued),
            ("handshakes.hellos_while_queued", self.hellos_while_queued),
        ):
            if value:
                out[name] = value
        groups: tuple[tuple[str, Counter[Any]], ...] = (
            ("rejected", self.rejected),
            ("ended", self.ended),
            ("dropped", self.dropped),
            ("closed", self.closed),
            ("reconnect_failed", self.reconnect_failed),
            ("limit", self.limits),
        )
        for prefix, counter in groups:
            for reason, value in counter.items():
                out[f"{prefix}.{reason}"] = value
        for fault, value in self.faults.items():
            out[str(fault)] = value
        return out


def by_reason(counter: Counter[Any]) -> dict[str, int]:
    """A group of counters as operators see it: reason text -> count, sorted."""
    return dict(sorted((str(reason), value) for reason, value in counter.items()))
