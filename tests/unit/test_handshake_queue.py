"""Work-conserving admission (issue 12): at most `max_handshakes_in_progress` handshakes
are worked on at once; further cookie-checked ClientHellos wait in a FIFO and start as
handshakes finish, so a crowd joining at once is admitted at the pace of the CPU."""

from __future__ import annotations

from seng_fw.gateway.core import GatewayCore, Port
from seng_fw.gateway.handshakes import HalfOpenHandshakes, HandshakeLimits, HandshakeQueue
from tests.support.gateway_memory import MemoryGateway, handshake_done
from tests.unit.test_gateway_core import WEBAPP
from tests.unit.test_handshakes import gateway


def queue(**limits: float) -> HandshakeQueue[int]:
    return HandshakeQueue(HandshakeLimits(**limits))  # type: ignore[arg-type]


def test_waiting_hellos_leave_in_arrival_order_and_a_repeat_keeps_its_place() -> None:
    waiting = queue()
    for key in range(3):
        assert waiting.add(key, f"10.0.0.{key}", b"hello%d" % key, now=0.0) == []
    waiting.refresh(0, b"hello0-again")
    assert waiting.pop(1.0) == (0, b"hello0-again")
    assert waiting.pop(1.0) == (1, b"hello1")
    assert len(waiting) == 1 and 2 in waiting
    flat = waiting.counters.flat()
    assert flat["handshakes.queued"] == 3 and flat["handshakes.hellos_while_queued"] == 1


def test_the_queue_is_bounded_per_source_and_in_total() -> None:
    waiting = queue(max_per_source=2, max_queued=3)
    assert waiting.add(0, "a", b"", 0.0) == [] and waiting.add(1, "a", b"", 0.0) == []
    assert waiting.add(2, "a", b"", 0.0) == [0]  # the oldest of its source
    assert waiting.add(3, "b", b"", 0.0) == []
    assert waiting.add(4, "c", b"", 0.0) == [1]  # full: the oldest of all
    assert [waiting.pop(0.0) for _ in range(4)] == [(2, b""), (3, b""), (4, b""), None]
    flat = waiting.counters.flat()
    assert flat["limit.max_half_open_per_source"] == 1 and flat["limit.max_queued_handshakes"] == 1


def test_hellos_that_waited_too_long_are_dropped_and_counted() -> None:
    waiting = queue(queue_timeout=30.0)
    waiting.add(0, "a", b"old", 0.0)
    waiting.add(1, "b", b"new", 20.0)
    assert waiting.pop(40.0) == (1, b"new")
    assert waiting.counters.flat()["limit.handshake_queue_timeout"] == 1


def _bounded(core: GatewayCore, most: int) -> list[int]:
    """Record how many handshakes are under way after every datagram the core handles."""
    seen: list[int] = []
    handle = core.datagram_received

    def counting(port: Port, address: tuple[str, int], data: bytes, now: float) -> None:
        handle(port, address, data, now)
        seen.append(len(core.handshakes))

    core.datagram_received = counting  # type: ignore[method-assign]
    return seen


def test_a_crowd_beyond_the_slots_waits_and_is_then_admitted_in_full() -> None:
    gw = gateway(max_handshakes_in_progress=2)
    seen = _bounded(gw.core, 2)
    crowd = [gw.enclave(gw.cert(WEBAPP), f"10.0.0.{10 + n}") for n in range(6)]
    for enclave in crowd:  # all ClientHellos at once, before the gateway answers any
        enclave.open_uplink()
    gw.pump()
    for enclave in crowd:
        assert enclave.assignment is not None
        enclave.open_downlink()
    gw.pump()
    assert len(gw.core.enclaves) == 6
    assert all(e.downlink is not None and handshake_done(e.downlink) for e in crowd)
    assert max(seen) == 2  # never more handshakes under way than slots
    flat = gw.core.counters.flat()
    assert flat["handshakes.queued"] >= 4 and flat["handshakes.started"] == 12
    assert len(gw.core.waiting) == 0 and len(gw.core.handshakes) == 0


def test_a_slot_freed_by_a_certificate_timeout_starts_the_next_waiting_hello() -> None:
    gw: MemoryGateway = gateway(
        max_handshakes_in_progress=1, certificate_timeout=5.0, handshake_stall_timeout=10.0
    )
    gw.abandon(("10.0.0.66", 20000))  # holds the one slot without a certificate
    enclave = gw.enclave(gw.cert(WEBAPP))
    enclave.open_uplink()
    gw.pump()
    assert enclave.assignment is None and len(gw.core.waiting) == 1
    gw.advance(6.0)  # the abandoned one times out; the client's hello starts
    assert enclave.assignment is not None
    assert gw.core.counters.flat()["handshakes.certificate_timeout"] == 1


def test_a_stalled_handshake_gives_its_slot_to_a_waiting_hello() -> None:
    gw: MemoryGateway = gateway(
        max_handshakes_in_progress=1, certificate_timeout=5.0, handshake_stall_timeout=2.0
    )
    gw.abandon(("10.0.0.66", 20000))  # holds the one slot without a certificate
    enclave = gw.enclave(gw.cert(WEBAPP))
    enclave.open_uplink()
    gw.pump()
    assert enclave.assignment is None and len(gw.core.waiting) == 1
    gw.advance(1.0)  # not stalled yet: the slot stays taken
    assert enclave.assignment is None and len(gw.core.waiting) == 1
    gw.advance(1.5)  # stalled, long before its certificate timeout: the waiter starts
    assert enclave.assignment is not None
    flat = gw.core.counters.flat()
    assert flat["limit.handshake_stalled"] == 1
    assert flat.get("handshakes.certificate_timeout", 0) == 0


def test_with_nobody_waiting_a_slow_handshake_keeps_its_slot() -> None:
    gw: MemoryGateway = gateway(
        max_handshakes_in_progress=1, certificate_timeout=5.0, handshake_stall_timeout=2.0
    )
    gw.abandon(("10.0.0.66", 20000))
    gw.advance(3.0)  # past the stall timeout, but no hello waits for the slot
    assert len(gw.core.handshakes) == 1
    assert gw.core.counters.flat().get("limit.handshake_stalled", 0) == 0


def test_hellos_marked_first_start_before_older_ones() -> None:
    waiting = queue(max_per_source=10, max_queued=3)
    waiting.add(0, "a", b"", 0.0)
    waiting.add(1, "a", b"", 1.0)
    waiting.add(2, "a", b"", 2.0, first=True)
    assert waiting.add(3, "a", b"", 3.0) == [0]  # full: the oldest not marked first
    assert [waiting.pop(4.0) for _ in range(4)] == [(2, b""), (1, b""), (3, b""), None]


def test_tunnel_2_of_an_admitted_enclave_overtakes_waiting_tunnel_1_hellos() -> None:
    gw = gateway(max_handshakes_in_progress=1)
    first, *others = [gw.enclave(gw.cert(WEBAPP), f"10.0.0.{10 + n}") for n in range(4)]
    first.open_uplink()
    gw.pump()
    assert first.assignment is not None
    gw.abandon(("10.0.0.66", 20000))  # holds the slot
    for enclave in others:
        enclave.open_uplink()
    first.open_downlink()
    gw.pump()
    assert len(gw.core.waiting) == 4
    gw.advance(6.0)  # the abandoned handshake times out: tunnel #2 goes first
    started = [e for e in gw.events if type(e).__name__ == "HandshakeCompleted"]
    assert [e.port for e in started[:2]] == [Port.SETUP, Port.DOWNLINK]
    assert first.downlink is not None and handshake_done(first.downlink)



def test_a_source_at_its_cap_of_handshakes_in_progress_stays_queued() -> None:
    """Starting it would evict that source's own oldest handshake, maybe nearly done."""
    waiting = queue()
    waiting.add(0, "10.0.0.1", b"h0", 0.0)
    waiting.add(1, "10.0.0.2", b"h1", 0.0)
    assert waiting.pop(1.0, lambda source: source != "10.0.0.1") == (1, b"h1")
    assert waiting.pop(1.0, lambda source: source != "10.0.0.1") is None
    assert 0 in waiting and waiting.pop(1.0) == (0, b"h0")


def test_a_certified_handshake_that_never_finishes_stalls_after_the_certificate_timeout() -> None:
    """Any well-formed certificate counts before attestation: it must not hold a slot
    for the session's whole handshake timeout."""
    limits = HandshakeLimits(certificate_timeout=5.0, stall_timeout=2.0)
    handshakes: HalfOpenHandshakes[int] = HalfOpenHandshakes(limits)
    handshakes.started(0, "10.0.0.1", 0.0)
    assert handshakes.stalled(4.0, lambda key: True) is None  # certified, still young
    assert handshakes.stalled(5.5, lambda key: True) == 0
    assert len(handshakes) == 0


def test_a_tunnel_2_hello_without_an_enclave_waiting_for_it_gets_no_priority() -> None:
    """The port is the sender's choice: hellos to tunnel #2's port from a host with
    no enclave waiting to pair queue behind earlier tunnel #1 hellos."""
    gw = gateway(max_handshakes_in_progress=1, handshake_stall_timeout=2.0)
    gw.abandon(("10.0.0.66", 20000))  # holds the one slot
    enclave = gw.enclave(gw.cert(WEBAPP))
    enclave.open_uplink()
    gw.pump()
    gw.abandon(("10.0.0.77", 30000), Port.DOWNLINK)  # queued after the enclave's hello
    assert len(gw.core.waiting) == 2
    gw.advance(2.5)  # the holder stalls: the enclave's hello, queued first, starts
    assert enclave.assignment is not None
