"""Bookkeeping of half-open handshakes: DTLS sessions that passed the cookie check but
have not completed (issue 14 item 2).

A ClientHello with a valid cookie proves only that its sender receives datagrams at its
address; the session it starts costs the gateway an ECDHE key, a signature (a few ms of
CPU, on the event loop) and about 54 KiB resident until it completes or times out. A
client that answers the cookie and walks away therefore costs memory for as long as
the handshake timeout (60 s) and CPU for every attempt. So:

- a half-open handshake that has not delivered its client certificate within
  `certificate_timeout` seconds is dropped (a real client sends it in its second
  flight, milliseconds after the ServerHello; mbed TLS retransmits after 1 s);
- at most `max_per_source` half-open handshakes per source address and `max_total` in
  all: a new one evicts the oldest of its source, or else the oldest of all, so a flood
  displaces its own sessions and never blocks clients that complete quickly;
- new handshakes are rate-limited per source address and in total (token buckets),
  which bounds the CPU a flood can take from the established tunnels;
- at most `max_active` handshakes are worked on at once; further ClientHellos that
  passed the cookie check wait in a FIFO (`HandshakeQueue`, a few hundred bytes each,
  at most `max_queued`, `max_per_source` per source) and start as handshakes finish.
  This keeps the gateway work-conserving when many enclaves join at once: started
  handshakes finish within the peers' 1 s retransmission timer instead of all of them
  progressing slowly, timing out into retransmissions (each costing CPU again) and
  certificate timeouts (issue 12: 1,000 enclaves at once).

Evictions are reported to the caller, which forgets the sessions (no alert: the peer is
abandoned or hostile, and a real client starts over with a fresh cookie exchange).
Everything here is pure bookkeeping on `now`; the core owns the sessions.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from seng_fw.gateway.counters import GatewayCounters, Limit

Key = TypeVar("Key", bound=Hashable)


@dataclass(frozen=True)
class HandshakeLimits:
    max_total: int = 512
    max_per_source: int = 16
    certificate_timeout: float = 5.0
    rate_per_source: float = 20.0  # new handshakes per second per source address
    burst_per_source: int = 5
    rate_total: float = 100.0  # new handshakes per second, all sources
    burst_total: int = 10
    max_active: int = 64  # handshakes worked on at once; the rest wait (HandshakeQueue)
    max_queued: int = 4096
    queue_timeout: float = 30.0  # a waiting hello older than this is dropped
    # A handshake in progress that has not delivered its client certificate after this
    # long gives its slot to a waiting hello (an abandoned one must not hold it for the
    # whole certificate timeout while real clients queue behind it).
    stall_timeout: float = 3.0  # two of the peer's retransmissions (1 s, then 2 s)


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated = now

    def peek(self, now: float) -> float:
        return min(self.burst, self.tokens + (now - self.updated) * self.rate)

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def full_at(self, now: float) -> float:
        return now + (self.burst - self.tokens) / self.rate if self.rate > 0 else now


@dataclass
class _Entry:
    source: str
    started: float
    certified: bool = False  # the client certificate arrived: no certificate timeout


class HalfOpenHandshakes(Generic[Key]):
    """Half-open handshakes by key (the core's (port, peer address)), oldest first."""

    def __init__(
        self, limits: HandshakeLimits, counters: GatewayCounters | None = None, now: float = 0.0
    ) -> None:
        self.limits = limits
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._per_source: Counter[str] = Counter()
        self._buckets: dict[str, TokenBucket] = {}
        self._total_bucket = TokenBucket(limits.rate_total, limits.burst_total, now)
        # What happened: the core's counters (limit hits, handshakes started, timeouts).
        self.counters = GatewayCounters() if counters is None else counters

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def sources(self) -> int:
        return len(self._per_source)

    def throttled(self, source: str, now: float) -> bool:
        """`source` has no handshake left in its rate right now: its datagrams need not
        even reach the cookie check (which costs a partial mbed TLS handshake)."""
        bucket = self._buckets.get(source)
        if bucket is None or bucket.peek(now) >= 1.0:
            return False
        self.counters.limits[Limit.HANDSHAKE_RATE_PER_HOST] += 1
        return True

    def may_start(self, source: str, now: float) -> bool:
        """May `source` start a new handshake now (rate limits)? Counts a refusal."""
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= 4 * self.limits.max_total:
                self._forget_full_buckets(now)
            bucket = self._buckets[source] = TokenBucket(
                self.limits.rate_per_source, self.limits.burst_per_source, now
            )
        if not bucket.take(now):
            self.counters.limits[Limit.HANDSHAKE_RATE_PER_HOST] += 1
            return False
        if not self._total_bucket.take(now):
            self.counters.limits[Limit.HANDSHAKE_RATE] += 1
            return False
        return True

    def _forget_full_buckets(self, now: float) -> None:
        # A full bucket is the same as none: keeps the table bounded under a flood
        # from many addresses.
        for source in [s for s, b in self._buckets.items() if b.full_at(b.updated) <= now]:
            del self._buckets[source]
        if len(self._buckets) >= 4 * self.limits.max_total:
            self._buckets.clear()  # fall back to the total rate until they refill

    def started(self, key: Key, source: str, now: float) -> list[Key]:
        """Track a new half-open handshake; returns the ones to evict for it."""
        evict: list[Key] = []
        if self._per_source[source] >= self.limits.max_per_source:
            oldest = next(k for k, e in self._entries.items() if e.source == source)
            evict.append(oldest)
            self.counters.limits[Limit.MAX_HALF_OPEN_PER_SOURCE] += 1
        elif len(self._entries) >= self.limits.max_total:
            evict.append(next(iter(self._entries)))
            self.counters.limits[Limit.MAX_HALF_OPEN] += 1
        for key_ in evict:
            self.discard(key_)
        self._entries[key] = _Entry(source, now)
        self._per_source[source] += 1
        self.counters.handshakes_started += 1
        return evict

    def at_source_cap(self, source: str) -> bool:
        """Another handshake from `source` would evict its oldest one."""
        return self._per_source[source] >= self.limits.max_per_source

    def stall_deadline(self) -> float | None:
        """When the oldest handshake in progress can first be found `stalled`."""
        for entry in self._entries.values():
            return entry.started + self.limits.stall_timeout
        return None

    def discard(self, key: Key) -> None:
        """The handshake completed, failed or its session was forgotten."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._per_source[entry.source] -= 1
        if self._per_source[entry.source] <= 0:
            del self._per_source[entry.source]

    def expired(self, now: float, has_certificate: Callable[[Key], bool]) -> list[Key]:
        """Half-open handshakes past the certificate timeout without a client
        certificate; they are no longer tracked."""
        deadline = now - self.limits.certificate_timeout
        late: list[Key] = []
        for key, entry in self._entries.items():
            if entry.started > deadline:
                break  # oldest first: the rest are younger
            if entry.certified:
                continue
            if has_certificate(key):
                entry.certified = True  # the handshake's own 60 s timeout applies
            else:
                late.append(key)
        for key in late:
            self.discard(key)
        self.counters.certificate_timeouts += len(late)
        return late

    def stalled(self, now: float, has_certificate: Callable[[Key], bool]) -> Key | None:
        """The oldest handshake without a client certificate after `stall_timeout`,
        no longer tracked (counted), to free its slot for a waiting hello; or None."""
        uncertified_by = now - self.limits.stall_timeout
        # One that sent a certificate (any certificate: attestation comes after the
        # handshake) but never finished must not hold its slot for the session's 60 s.
        certified_by = now - max(self.limits.certificate_timeout, self.limits.stall_timeout)
        for key, entry in self._entries.items():
            if entry.started > uncertified_by:
                return None  # oldest first: the rest are younger
            if not entry.certified and has_certificate(key):
                entry.certified = True
            if entry.certified and entry.started > certified_by:
                continue
            self.discard(key)
            self.counters.limits[Limit.HANDSHAKE_STALLED] += 1
            return key
        return None

    def next_deadline(self) -> float | None:
        """When the oldest handshake's certificate timeout ends."""
        for entry in self._entries.values():
            if not entry.certified:
                return entry.started + self.limits.certificate_timeout
        return None


@dataclass
class _Waiting:
    source: str
    hello: bytes  # the latest cookie-checked ClientHello of this peer
    queued: float


class HandshakeQueue(Generic[Key]):
    """Cookie-checked ClientHellos waiting for a handshake slot, oldest first; `first`
    ones (the core's tunnel #2 of an enclave already admitted on tunnel #1) before all
    others, so an enclave that started joining finishes before new ones start (and
    within its pairing timeout). A repeated hello (the peer's retransmission) refreshes
    the stored one (a fresher cookie) and keeps its place. Bookkeeping only: the core
    starts the sessions."""

    def __init__(self, limits: HandshakeLimits, counters: GatewayCounters | None = None) -> None:
        self.limits = limits
        self._first: OrderedDict[Key, _Waiting] = OrderedDict()
        self._rest: OrderedDict[Key, _Waiting] = OrderedDict()
        self._per_source: Counter[str] = Counter()
        self.counters = GatewayCounters() if counters is None else counters

    def __len__(self) -> int:
        return len(self._first) + len(self._rest)

    def __contains__(self, key: Key) -> bool:
        return key in self._first or key in self._rest

    def refresh(self, key: Key, hello: bytes) -> None:
        """A waiting peer repeated its hello (counted; no new rate token taken)."""
        (self._first.get(key) or self._rest[key]).hello = hello
        self.counters.hellos_while_queued += 1

    def _oldest(self, source: str | None = None) -> Key:
        for waiting in (self._rest, self._first):  # the ones not yet begun go first
            for key, entry in waiting.items():
                if source is None or entry.source == source:
                    return key
        raise LookupError(source)

    def add(
        self, key: Key, source: str, hello: bytes, now: float, *, first: bool = False
    ) -> list[Key]:
        """Queue a hello; returns the waiting keys evicted for it (over `max_per_source`:
        the oldest of its source; a full queue: the oldest of all), all counted."""
        evict: list[Key] = []
        if self._per_source[source] >= self.limits.max_per_source:
            evict.append(self._oldest(source))
            self.counters.limits[Limit.MAX_HALF_OPEN_PER_SOURCE] += 1
        elif len(self) >= self.limits.max_queued:
            evict.append(self._oldest())
            self.counters.limits[Limit.MAX_QUEUED_HANDSHAKES] += 1
        for old in evict:
            self.discard(old)
        (self._first if first else self._rest)[key] = _Waiting(source, hello, now)
        self._per_source[source] += 1
        self.counters.handshakes_queued += 1
        return evict

    def pop(
        self, now: float, may_start: Callable[[str], bool] = lambda source: True
    ) -> tuple[Key, bytes] | None:
        """The next hello to start whose source `may_start` (one at its cap of
        handshakes in progress would only evict its own oldest, maybe nearly done: it
        stays queued); those waiting longer than `queue_timeout` are dropped on the
        way (counted: the peer has likely given up)."""
        expired: list[Key] = []
        found: tuple[Key, bytes] | None = None
        for waiting in (self._first, self._rest):
            for key, entry in waiting.items():
                if now - entry.queued > self.limits.queue_timeout:
                    expired.append(key)
                elif may_start(entry.source):
                    found = key, entry.hello
                    break
            if found is not None:
                break
        for key in expired:
            self.discard(key)
        self.counters.limits[Limit.HANDSHAKE_QUEUE_TIMEOUT] += len(expired)
        if found is not None:
            self.discard(found[0])
        return found

    def discard(self, key: Key) -> None:
        entry = self._first.pop(key, None) or self._rest.pop(key, None)
        if entry is None:
            return
        self._per_source[entry.source] -= 1
        if self._per_source[entry.source] <= 0:
            del self._per_source[entry.source]
