"""The `limits:` section of gateway.yaml: what one client host, or everyone together, may
cost the gateway (issue 14). Each limit hit is counted as `limit.<key>` in the core's
counters: `seng-fw status` (LIMIT HIT) and the metric `seng_fw_limit_hits_total{limit}`.

The defaults fit a gateway on two cores: a few thousand enclaves, admissions at the
pace of enclave start-up, and a handshake flood held to a fraction of one core (a
half-open handshake costs about 4 ms of CPU and 54 KiB; seng_fw.gateway.handshakes).
"""

from __future__ import annotations

from collections import Counter
from ipaddress import IPv4Address
from typing import Literal

from pydantic import Field

from seng_fw.gateway.counters import GatewayCounters, Limit, Refusal
from seng_fw.gateway.handshakes import HandshakeLimits
from seng_fw.policy.models import StrictModel

# The largest datagram a DTLS 1.2 peer may need: one record of 2^14 bytes plus 2048
# bytes of expansion and its 13-byte header (RFC 6347 4.1.1; mbed TLS clients without
# an MTU set send handshake messages in records that large).
MAX_DTLS_RECORD_DATAGRAM = 13 + 2**14 + 2048


class LimitsConfig(StrictModel):
    # Enclaves (each one tunnel pair) at once, in all and per client host.
    max_tunnels: int = Field(default=4096, ge=1)
    max_tunnels_per_host: int = Field(default=1024, ge=1)
    # Handshakes past the cookie check and not completed, in all and per source address;
    # a new one evicts the oldest of its source, or else the oldest of all.
    max_half_open: int = Field(default=512, ge=1)
    max_half_open_per_source: int = Field(default=16, ge=1)
    # Seconds a half-open handshake may take to deliver the client certificate.
    certificate_timeout: float = Field(default=5.0, gt=0)
    # The per-host admission rate: new handshakes per second per client address (an
    # enclave needs two), with bursts of up to `handshake_burst_per_host`; and for all
    # addresses together. A burst is processed in one go on the event loop: keep it
    # small, or a burst of handshakes delays the established tunnels' packets.
    handshake_rate_per_host: float = Field(default=20.0, gt=0)
    handshake_burst_per_host: int = Field(default=5, ge=1)
    handshake_rate: float = Field(default=100.0, gt=0)
    handshake_burst: int = Field(default=10, ge=1)
    # Handshakes worked on at once; further cookie-checked ClientHellos wait in a FIFO
    # (at most `max_queued_handshakes`, up to `max_half_open_per_source` per source)
    # and start as handshakes finish, so a crowd joining at once is admitted at the
    # pace of the CPU instead of timing out into retransmissions.
    max_handshakes_in_progress: int = Field(default=64, ge=1)
    max_queued_handshakes: int = Field(default=4096, ge=1)
    # Seconds a hello may wait there (its peer has likely started over by then).
    handshake_queue_timeout: float = Field(default=30.0, gt=0)
    # Seconds a handshake in progress may go without the client certificate while
    # hellos wait for its slot; then the slot goes to the oldest waiting one.
    handshake_stall_timeout: float = Field(default=3.0, gt=0)
    # Larger datagrams are dropped before any parsing.
    max_datagram: int = Field(default=MAX_DTLS_RECORD_DATAGRAM, ge=256, le=65535)
    # IPv4 packets with options (IHL > 5) from enclaves: dropped by default.
    ip_options: Literal["drop", "forward"] = "drop"

    def handshakes(self) -> HandshakeLimits:
        return HandshakeLimits(
            max_total=self.max_half_open,
            max_per_source=self.max_half_open_per_source,
            certificate_timeout=self.certificate_timeout,
            rate_per_source=self.handshake_rate_per_host,
            burst_per_source=self.handshake_burst_per_host,
            rate_total=self.handshake_rate,
            burst_total=self.handshake_burst,
            max_active=self.max_handshakes_in_progress,
            max_queued=self.max_queued_handshakes,
            queue_timeout=self.handshake_queue_timeout,
            stall_timeout=self.handshake_stall_timeout,
        )


class TunnelCounts:
    """Enclaves per client host, against `max_tunnels` and `max_tunnels_per_host`."""

    def __init__(self, limits: LimitsConfig, counters: GatewayCounters) -> None:
        self.limits = limits
        self.counters = counters
        self._per_host: Counter[IPv4Address] = Counter()
        self.total = 0

    def refusal(self, host: IPv4Address) -> tuple[Refusal, str] | None:
        """(check, reason) if one more enclave from `host` would exceed a limit."""
        if self.total >= self.limits.max_tunnels:
            self.counters.limits[Limit.MAX_TUNNELS] += 1
            return Refusal.MAX_TUNNELS, f"the gateway holds its maximum of {self.total} enclaves"
        if self._per_host[host] >= self.limits.max_tunnels_per_host:
            self.counters.limits[Limit.MAX_TUNNELS_PER_HOST] += 1
            return (
                Refusal.MAX_TUNNELS_PER_HOST,
                f"host {host} holds its maximum of {self._per_host[host]} enclaves",
            )
        return None

    def admitted(self, host: IPv4Address) -> None:
        self._per_host[host] += 1
        self.total += 1

    def ended(self, host: IPv4Address) -> None:
        self._per_host[host] -= 1
        if self._per_host[host] <= 0:
            del self._per_host[host]
        self.total -= 1
