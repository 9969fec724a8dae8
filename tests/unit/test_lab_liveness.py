"""The emulator's keepalive: when to probe, when to give up, and the probe's packets."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest

from seng_fw.lab.enclave import Backoff
from seng_fw.lab.liveness import (
    SUSPICION_WINDOW,
    TIME_EXCEEDED,
    Liveness,
    is_probe_answer,
    probe_packet,
)
from seng_fw.tunnel import packets
from seng_fw.tunnel.packets import inet_checksum

ME = IPv4Address("192.168.29.2")
GATEWAY = IPv4Address("192.168.29.1")


def _time_exceeded(quoted: bytes, source: IPv4Address = GATEWAY) -> bytes:
    """What the gateway's kernel sends back for an expired packet."""
    icmp = struct.pack("!BBHI", TIME_EXCEEDED, 0, 0, 0) + quoted[:28]
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0, source.packed, ME.packed
    )
    return header + icmp


def test_a_healthy_idle_tunnel_is_probed_and_an_answer_keeps_it() -> None:
    live = Liveness(2.0, now=0.0)
    assert not live.probe_due(1.9) and live.dead(1.9) is None
    assert live.probe_due(2.0)
    assert not live.probe_due(2.5)  # probes a third of the interval apart
    assert live.probe_due(2.7)
    live.heard(3.0)
    assert live.first_probe is None and live.dead(4.9) is None
    assert not live.probe_due(4.9)  # idle again only from the answer on
    assert live.probe_due(5.0)


def test_no_answer_within_the_interval_after_the_first_probe_is_death() -> None:
    live = Liveness(2.0, now=0.0)
    assert live.probe_due(2.0)
    assert live.dead(3.9) is None
    reason = live.dead(4.0)
    assert reason is not None and "within 2 s of a keepalive probe" in reason


def test_an_icmp_error_starts_probing_at_once_even_without_a_keepalive() -> None:
    live = Liveness(None, now=0.0)
    assert not live.probe_due(100.0) and live.dead(100.0) is None  # no keepalive: quiet
    live.suspect("ICMP error on port 4433: Connection refused")
    assert live.probe_due(100.0)
    assert live.dead(100.0 + SUSPICION_WINDOW - 0.1) is None
    reason = live.dead(100.0 + SUSPICION_WINDOW)
    assert reason is not None and "after ICMP error on port 4433" in reason


def test_an_answer_clears_a_suspicion() -> None:
    live = Liveness(5.0, now=0.0)
    live.suspect("ICMP error")
    assert live.probe_due(1.0)
    live.heard(1.5)
    assert live.suspicion is None and live.first_probe is None
    assert not live.probe_due(2.0) and live.dead(6.0) is None


def test_keepalive_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Liveness(0.0, now=0.0)


def test_the_probe_is_a_valid_ttl_1_echo_request_to_the_enclave_itself() -> None:
    probe = probe_packet(ME, 0x1234, 7)
    assert packets.is_ipv4(probe)
    assert packets.source(probe) == packets.destination(probe) == ME.packed
    assert probe[8] == 1  # TTL: it expires at the gateway
    assert probe[9] == 1 and probe[20] == 8  # ICMP echo request
    assert inet_checksum(probe[:20]) == 0 and inet_checksum(probe[20:]) == 0


def test_answers_to_our_probes_are_recognised_and_nothing_else() -> None:
    probe = probe_packet(ME, 0x1234, 7)
    assert is_probe_answer(_time_exceeded(probe), ME, 0x1234)
    assert not is_probe_answer(_time_exceeded(probe), ME, 0x4321)  # another emulator's
    other = probe_packet(IPv4Address("192.168.29.3"), 0x1234, 7)
    assert not is_probe_answer(_time_exceeded(other), ME, 0x1234)
    assert not is_probe_answer(probe, ME, 0x1234)  # the request itself
    for length in range(len(_time_exceeded(probe))):  # truncations never raise
        assert not is_probe_answer(_time_exceeded(probe)[:length], ME, 0x1234)


def test_backoff_doubles_up_to_its_maximum_with_jitter() -> None:
    backoff = Backoff(initial=0.5, maximum=4.0)
    for failures, base in ((0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (10, 4.0), (1000, 4.0)):
        for _ in range(20):
            assert base * 0.8 <= backoff.delay(failures) <= base * 1.2
