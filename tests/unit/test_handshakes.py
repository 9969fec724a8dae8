"""Half-open handshakes are bounded (issue 14 item 2): per source and in total, with a
short timeout until the client certificate arrives and rate limits on new ones."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from seng_fw.gateway.config import GatewayConfig
from seng_fw.gateway.core import Port
from seng_fw.gateway.handshakes import HalfOpenHandshakes, HandshakeLimits, TokenBucket
from seng_fw.gateway.limits import LimitsConfig
from seng_fw.gateway.service import GatewayService
from seng_fw.ops.cli import format_status
from seng_fw.ops.metrics import GatewayMetrics
from tests.support.gateway_memory import MemoryGateway
from tests.support.gateway_service import config
from tests.support.seng_client import udp_packet
from tests.unit.test_gateway_core import WEBAPP, policy
from tests.unit.test_gateway_packets import EXTERNAL, RECORD_ROUTE, with_options

NO_RATE_LIMIT = {"rate_per_source": 1e9, "burst_per_source": 10**9,
                 "rate_total": 1e9, "burst_total": 10**9}  # fmt: skip
NO_RATE_LIMIT_CONFIG = {"handshake_rate_per_host": 1e9, "handshake_burst_per_host": 10**9,
                        "handshake_rate": 1e9, "handshake_burst": 10**9}  # fmt: skip


def table(**limits: float) -> HalfOpenHandshakes[int]:
    return HalfOpenHandshakes(HandshakeLimits(**{**NO_RATE_LIMIT, **limits}))  # type: ignore[arg-type]


def test_per_source_cap_evicts_that_sources_oldest() -> None:
    half_open = table(max_per_source=3, max_total=100)
    for key in range(3):
        assert half_open.started(key, "10.0.0.9", now=key) == []
    assert half_open.started(100, "10.0.0.8", now=4) == []
    assert half_open.started(3, "10.0.0.9", now=5) == [0]
    assert len(half_open) == 4 and 0 not in half_open and 100 in half_open
    assert half_open.counters.flat()["limit.max_half_open_per_source"] == 1


def test_total_cap_evicts_the_oldest_of_all() -> None:
    half_open = table(max_per_source=10, max_total=3)
    for key in range(5):
        half_open.started(key, f"10.0.0.{key}", now=key)
    assert [k for k in range(5) if k in half_open] == [2, 3, 4]
    assert half_open.counters.flat()["limit.max_half_open"] == 2
    assert half_open.sources() == 3


def test_certificate_timeout_spares_handshakes_that_have_one() -> None:
    half_open = table(certificate_timeout=5.0)
    for key in range(4):
        half_open.started(key, "10.0.0.1", now=float(key))
    assert half_open.next_deadline() == 5.0
    assert half_open.expired(6.5, has_certificate=lambda key: key == 0) == [1]
    assert 0 in half_open and 1 not in half_open
    assert half_open.next_deadline() == 7.0  # key 0 has its certificate: no deadline
    assert half_open.expired(100.0, has_certificate=lambda key: False) == [2, 3]
    assert half_open.next_deadline() is None and len(half_open) == 1


def test_rate_limits_per_source_and_in_total() -> None:
    limits = HandshakeLimits(rate_per_source=2, burst_per_source=3, rate_total=1, burst_total=5)
    half_open: HalfOpenHandshakes[int] = HalfOpenHandshakes(limits)
    assert [half_open.may_start("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert half_open.may_start("a", 0.5)  # one token back after 0.5 s
    assert [half_open.may_start("b", 0.5) for _ in range(2)] == [True, False]  # total: 5 used
    assert half_open.counters.flat()["limit.handshake_rate_per_host"] == 1
    assert half_open.counters.flat()["limit.handshake_rate"] == 1


def test_token_bucket_refills_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=1.0, burst=2, now=0.0)
    assert bucket.take(0.0) and bucket.take(0.0) and not bucket.take(0.0)
    assert bucket.take(100.0) and bucket.take(100.0) and not bucket.take(100.0)


# ----- on the core, with real DTLS handshakes ------------------------------------------


def gateway(**limits: float) -> MemoryGateway:
    return MemoryGateway(policy(), limits=LimitsConfig(**{**NO_RATE_LIMIT_CONFIG, **limits}))


def connect(gw: MemoryGateway, host: str = "10.0.0.10") -> None:
    gw.enclave(gw.cert(WEBAPP), host).connect()


def test_an_abandoning_flood_from_one_source_keeps_at_most_its_cap() -> None:
    gw = gateway(max_half_open_per_source=8, max_half_open=64)
    for port in range(40):
        gw.abandon(("10.0.0.66", 20000 + port))
    assert len(gw.core.handshakes) == 8
    assert len(gw.core._peers) == 8  # the evicted sessions are gone, not only untracked
    assert gw.core.counters.flat()["limit.max_half_open_per_source"] == 32
    connect(gw)  # others are admitted meanwhile
    assert len(gw.core.enclaves) == 1 and len(gw.core.handshakes) == 8


def test_a_flood_from_many_sources_keeps_at_most_the_total_cap() -> None:
    gw = gateway(max_half_open_per_source=8, max_half_open=20)
    for n in range(50):
        gw.abandon((f"10.0.1.{n}", 30000))
    assert len(gw.core.handshakes) == 20 and len(gw.core._peers) == 20
    assert gw.core.counters.flat()["limit.max_half_open"] == 30
    connect(gw)
    assert len(gw.core.enclaves) == 1


def test_abandoned_handshakes_end_after_the_certificate_timeout() -> None:
    gw = gateway(certificate_timeout=5.0)
    for n in range(10):
        gw.abandon((f"10.0.2.{n}", 30000))
    connect(gw)
    gw.advance(4.0)
    assert len(gw.core.handshakes) == 10
    assert gw.core.next_timeout() is not None
    gw.advance(1.5)
    assert len(gw.core.handshakes) == 0
    assert gw.core.counters.flat()["handshakes.certificate_timeout"] == 10
    assert all(peer.session.established for peer in gw.core._peers.values())
    assert gw.core.sessions_released >= 10


def test_new_handshakes_beyond_the_source_rate_are_not_started() -> None:
    gw = MemoryGateway(
        policy(), limits=LimitsConfig(handshake_rate_per_host=1.0, handshake_burst_per_host=5)
    )
    for port in range(20):
        gw.abandon(("10.0.0.66", 20000 + port))
    assert len(gw.core.handshakes) == 5
    assert gw.core.counters.flat()["limit.handshake_rate_per_host"] == 15
    assert gw.core.counters.flat()["handshakes.started"] == 5
    connect(gw)  # another host is not affected
    assert len(gw.core.enclaves) == 1


def test_status_and_metrics_show_half_open_handshakes_and_limit_hits(tmp_path: Path) -> None:
    gw = gateway(max_half_open_per_source=4, max_half_open=64)
    for port in range(6):
        gw.abandon(("10.0.0.66", 20000 + port))
    policy = gw.core.admission.policy
    control = GatewayService(gw.core, config(tmp_path), load_policy=lambda path: policy)
    status = asyncio.run(control.status())
    assert status["handshakes"] == {
        "half_open": 4, "half_open_sources": 1, "started": 6, "certificate_timeouts": 0,
    }  # fmt: skip
    assert status["limits"] == {"max_half_open_per_source": 2}
    assert "pending   4 handshakes half-open from 1 sources" in format_status(status)
    assert re.search(r"\nmax_half_open_per_source +2\n", format_status(status))
    text = GatewayMetrics(control.snapshot).render().decode()
    assert "seng_fw_handshakes_half_open 4.0" in text
    assert 'seng_fw_limit_hits_total{limit="max_half_open_per_source"} 2.0' in text


# ----- the other limits of gateway.yaml `limits:` --------------------------------------


def test_max_tunnels_per_host_and_in_total_refuse_admission() -> None:
    gw = gateway(max_tunnels=3, max_tunnels_per_host=2)
    for _ in range(2):
        gw.enclave(gw.cert(WEBAPP), "10.0.0.10").connect()
    refused = gw.enclave(gw.cert(WEBAPP), "10.0.0.10")
    refused.open_uplink()
    gw.pump()
    assert refused.assignment is None
    assert gw.core.counters.flat()["limit.max_tunnels_per_host"] == 1
    assert gw.core.counters.flat()["rejected.max_tunnels_per_host"] == 1
    gw.enclave(gw.cert(WEBAPP), "10.0.0.11").connect()  # another host: admitted
    last = gw.enclave(gw.cert(WEBAPP), "10.0.0.12")
    last.open_uplink()
    gw.pump()
    assert last.assignment is None and gw.core.counters.flat()["limit.max_tunnels"] == 1
    assert len(gw.core.enclaves) == 3
    # An enclave that ends frees its host's place.
    gw.core.revoke(lambda enclave: str(enclave.host) == "10.0.0.10", "test", gw.now)
    gw.pump()
    assert gw.core.tunnel_counts.total == 1
    gw.enclave(gw.cert(WEBAPP), "10.0.0.10").connect()
    assert len(gw.core.enclaves) == 2


def test_datagrams_beyond_max_datagram_are_dropped_before_parsing() -> None:
    gw = MemoryGateway(policy(), limits=LimitsConfig(max_datagram=1500))
    enclave = gw.enclave(gw.cert(WEBAPP)).connect()
    gw.inject(Port.SETUP, ("10.0.0.99", 5000), b"\x16\xfe\xfd" + bytes(1600))
    assert gw.core.counters.flat()["limit.max_datagram"] == 1
    assert enclave.uplink is not None and not enclave.uplink.closed_reasons


def test_ip_options_may_be_forwarded_if_configured() -> None:
    gw = MemoryGateway(policy(), limits=LimitsConfig(ip_options="forward"))
    enclave = gw.enclave(gw.cert(WEBAPP)).connect()
    packet = with_options(udp_packet(enclave.address, EXTERNAL, 1, 7, b"x"), RECORD_ROUTE)
    enclave.send(packet)
    assert gw.to_tun == [packet]


def test_the_limits_section_of_gateway_yaml(tmp_path: Path) -> None:
    base = config(tmp_path).model_dump(mode="json")
    loaded = GatewayConfig.model_validate({**base, "limits": {"max_half_open": 64}})
    assert loaded.limits.max_half_open == 64 and loaded.limits.max_tunnels == 4096
    assert loaded.limits.handshakes().max_total == 64
    with pytest.raises(ValueError, match="max_tunnels"):
        GatewayConfig.model_validate({**base, "limits": {"max_tunnels": 0}})
    with pytest.raises(ValueError, match="unknown_limit"):
        GatewayConfig.model_validate({**base, "limits": {"unknown_limit": 1}})
