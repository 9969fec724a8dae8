"""Prometheus metrics: rendered from the gateway's snapshot, served on the event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from seng_fw.gateway.counters import Traffic
from seng_fw.gateway.service import AppTraffic, Snapshot
from seng_fw.ops.metrics import GatewayMetrics, MetricsServer
from seng_fw.policy.admission import AdmissionCheck
from tests.support.gateway_service import NGINX, WEBAPP, Gateway


def snapshot() -> Snapshot:
    return Snapshot(
        started_at=1_700_000_000.0,
        uptime=12.0,
        admitted=4,
        rejected={"debug_enclave": 2, "quote_status": 1},
        ended={"idle_timeout": 3},
        dropped={"no_enclave": 7},
        apps=[
            AppTraffic("webapp", 2, 10, 1000, 20, 2000, 1),
            AppTraffic("nginx", 0, 0, 0, 0, 0, 0),
        ],
        labeller={"labelled": 5, "unknown": 1},
        firewall={"tx_webapp": (8, 800), "rx_webapp": (9, 900)},
        policy_digest="ab" * 32,
        ruleset_digest="ab" * 32,
        policy_applied_at=1_700_000_100.0,
        half_open=9,
        handshakes_started=40,
        limits={"max_half_open_per_source": 6},
    )


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_render_exposes_the_snapshot() -> None:
    metrics = GatewayMetrics(snapshot)
    metrics.observe_handshake(0.02)
    metrics.observe_handshake(3.0)
    values = samples(metrics.render().decode())
    assert values[("seng_fw_admissions_total", ())] == 4
    assert values[("seng_fw_rejections_total", (("reason", "debug_enclave"),))] == 2
    assert values[("seng_fw_tunnel_ends_total", (("reason", "idle_timeout"),))] == 3
    assert values[("seng_fw_dropped_packets_total", (("reason", "no_enclave"),))] == 7
    assert values[("seng_fw_tunnels_active", (("app", "webapp"),))] == 2
    assert values[("seng_fw_handshakes_half_open", ())] == 9
    assert values[("seng_fw_handshakes_started_total", ())] == 40
    assert values[("seng_fw_limit_hits_total", (("limit", "max_half_open_per_source"),))] == 6
    assert values[("seng_fw_tunnels_active", (("app", "nginx"),))] == 0
    key = (("app", "webapp"), ("direction", "from_enclave"))
    assert values[("seng_fw_forwarded_packets_total", key)] == 10
    assert values[("seng_fw_forwarded_bytes_total", key)] == 1000
    key = (("app", "webapp"), ("direction", "to_enclave"))
    assert values[("seng_fw_forwarded_bytes_total", key)] == 2000
    assert values[("seng_fw_spoofed_packets_total", (("app", "webapp"),))] == 1
    assert values[("seng_fw_firewall_packets_total", (("app", "webapp"), ("direction", "rx")))] == 9
    assert values[("seng_fw_labeller_events_total", (("event", "labelled"),))] == 5
    assert values[("seng_fw_handshake_duration_seconds_count", ())] == 2
    assert values[("seng_fw_handshake_duration_seconds_bucket", (("le", "0.025"),))] == 1
    assert values[("seng_fw_policy_info", (("digest", "ab" * 32),))] == 1
    assert values[("seng_fw_start_time_seconds", ())] == 1_700_000_000


def test_each_gateway_has_its_own_registry() -> None:
    first, second = GatewayMetrics(snapshot), GatewayMetrics(snapshot)
    first.observe_handshake(1.0)
    assert samples(second.render().decode())[("seng_fw_handshake_duration_seconds_count", ())] == 0


def test_metrics_of_a_real_gateway_core(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    gateway.add("webapp", WEBAPP).traffic = Traffic(packets_in=3, bytes_in=30)
    gateway.add("nginx", NGINX)
    gateway.core.counters.rejected[AdmissionCheck.UNKNOWN_MRENCLAVE] = 1
    values = samples(GatewayMetrics(gateway.control.snapshot).render().decode())
    assert values[("seng_fw_tunnels_active", (("app", "webapp"),))] == 1
    key = (("app", "webapp"), ("direction", "from_enclave"))
    assert values[("seng_fw_forwarded_bytes_total", key)] == 30
    # Ended enclaves keep counting (GatewayCore moves their traffic to ended_traffic).
    gateway.core.counters.ended_traffic["webapp"] = Traffic(bytes_in=30)
    gateway.core._enclave_by_address.clear()
    values = samples(GatewayMetrics(gateway.control.snapshot).render().decode())
    assert values[("seng_fw_forwarded_bytes_total", key)] == 30
    assert values[("seng_fw_tunnels_active", (("app", "webapp"),))] == 0


async def _http(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


def test_server_answers_get_metrics() -> None:
    async def main() -> list[bytes]:
        server = MetricsServer(GatewayMetrics(snapshot), "127.0.0.1", 0)
        await server.start()
        try:
            return [
                await _http(server.port, request)
                for request in (
                    b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"HEAD /metrics HTTP/1.1\r\n\r\n",
                    b"GET /nothing HTTP/1.1\r\n\r\n",
                    b"POST /metrics HTTP/1.1\r\n\r\n",
                    b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n",
                )
            ]
        finally:
            await server.close()

    get, head, missing, post, query = asyncio.run(main())
    headers, body = get.split(b"\r\n\r\n", 1)
    assert headers.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Type: text/plain; version=" in headers  # the exposition format
    assert f"Content-Length: {len(body)}".encode() in headers
    assert b"seng_fw_admissions_total 4.0" in body
    assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
    assert missing.startswith(b"HTTP/1.1 404")
    assert post.startswith(b"HTTP/1.1 405")
    assert query.startswith(b"HTTP/1.1 200 OK")
