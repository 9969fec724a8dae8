"""Does the gateway still carry this enclave's tunnel? The emulator's keepalive, sans-I/O.

A gateway that was SIGKILLed (and perhaps restarted) has forgotten the session: the new
one drops the enclave's records unanswered, and nothing in the SENG protocol or in DTLS
1.2 as mbed TLS speaks it makes an established session answer anything (no heartbeat;
renegotiation is refused silently, see seng_fw/tunnel/dtls.py). What a live gateway always
answers is its kernel's ICMP: the probe is an ICMP echo request from the enclave's address
*to the enclave's own address* with TTL 1, sent into tunnel #1. The gateway's kernel would
forward it back towards the enclave, finds the TTL spent before any filter chain runs, and
sends ICMP time exceeded, which the ruleset passes as `related` and the gateway forwards
down tunnel #2. So the probe works under any policy, with an unchanged gateway (the
original SENG gateway too: it is plain IP through the tunnel), and it goes no further
than the gateway.

`Liveness` decides when to probe and when to give up: after `keepalive` seconds without
any record from the gateway it sends a probe every keepalive/3 seconds, and declares the
tunnel dead if nothing at all arrives within `keepalive` seconds of the first one. An ICMP
error on the enclave's UDP sockets (port unreachable: nothing listens there any more) starts
probing at once instead of ending the tunnel outright, since ICMP is easy to forge.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

from seng_fw.tunnel.packets import inet_checksum

ICMP = 1
ECHO_REQUEST = 8
TIME_EXCEEDED = 11
DEST_UNREACHABLE = 3
PROBE_PAYLOAD = b"seng-fw keepalive"
# Without a keepalive interval, how long an ICMP error's probing may take.
SUSPICION_WINDOW = 3.0
_MIN_PROBE_INTERVAL = 0.2


class Liveness:
    def __init__(self, keepalive: float | None, now: float) -> None:
        if keepalive is not None and keepalive <= 0:
            raise ValueError("keepalive must be positive (or None for none)")
        self.keepalive = keepalive
        self.last_heard = now
        self.first_probe: float | None = None  # of the unanswered probes
        self.last_probe = float("-inf")
        self.suspicion: str | None = None
        self.probes_sent = 0

    @property
    def _window(self) -> float:
        return self.keepalive if self.keepalive is not None else SUSPICION_WINDOW

    def heard(self, now: float) -> None:
        """A record from the gateway arrived (any record: it answers, so it is alive)."""
        self.last_heard = now
        self.first_probe = None
        self.suspicion = None

    def suspect(self, why: str) -> None:
        """Something (an ICMP error) says the gateway may be gone: probe now."""
        if self.suspicion is None:
            self.suspicion = why

    def probe_due(self, now: float) -> bool:
        """Whether to send a probe now (the caller then sends one)."""
        idle = self.keepalive is not None and now - self.last_heard >= self.keepalive
        if not (idle or self.suspicion is not None):
            return False
        if now - self.last_probe < max(self._window / 3, _MIN_PROBE_INTERVAL):
            return False
        self.last_probe = now
        self.probes_sent += 1
        if self.first_probe is None:
            self.first_probe = now
        return True

    def dead(self, now: float) -> str | None:
        """Why the tunnel is dead, or None while it may still be alive."""
        if self.first_probe is None or now - self.first_probe < self._window:
            return None
        why = f"no answer from the gateway within {self._window:g} s of a keepalive probe"
        return f"{why} (after {self.suspicion})" if self.suspicion else why


def probe_packet(address: IPv4Address, ident: int, seq: int) -> bytes:
    """ICMP echo request `address` -> `address`, TTL 1 (see the module docstring)."""
    icmp = struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident, seq & 0xFFFF) + PROBE_PAYLOAD
    icmp = icmp[:2] + inet_checksum(icmp).to_bytes(2, "big") + icmp[4:]
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, 20 + len(icmp), seq & 0xFFFF, 0, 1, ICMP, 0, address.packed, address.packed,
    )  # fmt: skip
    header = header[:10] + inet_checksum(header).to_bytes(2, "big") + header[12:]
    return header + icmp


def is_probe_answer(packet: bytes, address: IPv4Address, ident: int) -> bool:
    """An ICMP error (time exceeded, unreachable) quoting one of our probes."""
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != ICMP:
        return False
    outer = (packet[0] & 0x0F) * 4
    if len(packet) < outer + 8 + 20 or packet[outer] not in (TIME_EXCEEDED, DEST_UNREACHABLE):
        return False
    inner = packet[outer + 8 :]
    inner_len = (inner[0] & 0x0F) * 4
    if len(inner) < inner_len + 8 or inner[9] != ICMP or inner[16:20] != address.packed:
        return False
    echo = inner[inner_len:]
    return echo[0] == ECHO_REQUEST and int.from_bytes(echo[4:6], "big") == ident
