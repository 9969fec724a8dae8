"""Prometheus metrics of the gateway (`metrics.listen` in gateway.yaml).

Counters and gauges are not updated on the data path: a collector reads them from the
gateway's own counters (`GatewayService.snapshot()`) at scrape time, so forwarding a
packet costs nothing extra. Only the handshake latency histogram is observed as it
happens (`observe_handshake`). Everything lives in the gateway's own registry, never
prometheus_client's global one, so several gateways (tests) can share a process.

`MetricsServer` answers ``GET /metrics`` on the gateway's asyncio loop, rather than in
prometheus_client's HTTP server thread: the collector then reads the core's state
between two events, never while a packet is half-way through it, without any lock.

Metric names (all prefixed ``seng_fw_``):
  admissions_total, rejections_total{reason}, tunnels_active{app},
  tunnel_ends_total{reason}, forwarded_packets_total{app,direction},
  forwarded_bytes_total{app,direction}, spoofed_packets_total{app},
  dropped_packets_total{reason}, firewall_packets_total{app,direction},
  firewall_bytes_total{app,direction}, labeller_events_total{event},
  handshake_duration_seconds (histogram), handshakes_half_open, handshakes_started_total,
  limit_hits_total{limit}, start_time_seconds,
  policy_applied_timestamp_seconds, policy_info{digest}.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from seng_fw.gateway.service import Snapshot

log = logging.getLogger("seng_fw.ops.metrics")

PREFIX = "seng_fw"
# DTLS handshake + attestation + admission: milliseconds on a LAN, more under load.
HANDSHAKE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DIRECTIONS = (("in", "from_enclave"), ("out", "to_enclave"))


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield _counter("admissions", "Enclaves admitted", [((), snap.admitted)])
        yield _counter(
            "rejections", "Tunnels refused, by failed check", _labelled(snap.rejected), ["reason"]
        )
        yield _counter(
            "tunnel_ends", "Enclave tunnels ended, by reason", _labelled(snap.ended), ["reason"]
        )
        yield _counter(
            "dropped_packets",
            "Packets the gateway dropped, by reason",
            _labelled(snap.dropped),
            ["reason"],
        )

        yield GaugeMetricFamily(
            f"{PREFIX}_handshakes_half_open",
            "DTLS handshakes past the cookie check and not completed",
            snap.half_open,
        )
        yield _counter(
            "handshakes_started",
            "DTLS handshakes started (past the cookie check and the rate limits)",
            [((), snap.handshakes_started)],
        )
        yield _counter(
            "limit_hits",
            "Times a configured limit refused or evicted something, by limit",
            _labelled(snap.limits),
            ["limit"],
        )

        active = GaugeMetricFamily(
            f"{PREFIX}_tunnels_active", "Enclaves with open tunnels", labels=["app"]
        )
        for app in snap.apps:
            active.add_metric([app.name], app.enclaves)
        yield active

        for unit, attribute in (("packets", "packets"), ("bytes", "bytes")):
            family = CounterMetricFamily(
                f"{PREFIX}_forwarded_{unit}",
                f"{unit.capitalize()} forwarded through enclave tunnels",
                labels=["app", "direction"],
            )
            for app in snap.apps:
                for suffix, direction in DIRECTIONS:
                    family.add_metric([app.name, direction], getattr(app, f"{attribute}_{suffix}"))
            yield family

        yield _counter(
            "spoofed_packets",
            "Packets from an app's enclaves with a source address not theirs (dropped)",
            [((app.name,), app.dropped_spoofed) for app in snap.apps],
            ["app"],
        )

        if snap.firewall:
            for index, unit in enumerate(("packets", "bytes")):
                family = CounterMetricFamily(
                    f"{PREFIX}_firewall_{unit}",
                    f"{unit.capitalize()} counted by the app's nftables counters",
                    labels=["app", "direction"],
                )
                for name, values in sorted(snap.firewall.items()):
                    direction, _, app_name = name.partition("_")
                    family.add_metric([app_name, direction], values[index])
                yield family

        yield _counter(
            "labeller_events",
            "Connections seen by the shared-subnet labeller, by outcome",
            [((event,), value) for event, value in sorted(snap.labeller.items())],
            ["event"],
        )

        yield GaugeMetricFamily(
            f"{PREFIX}_start_time_seconds", "Start of the gateway (Unix time)", snap.started_at
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_policy_applied_timestamp_seconds",
            "When the running policy was loaded (Unix time)",
            snap.policy_applied_at,
        )
        info = GaugeMetricFamily(
            f"{PREFIX}_policy_info", "Digest of the running policy", labels=["digest"]
        )
        info.add_metric([snap.policy_digest], 1)
        yield info


def _labelled(by_reason: dict[str, int]) -> list[tuple[tuple[str, ...], int]]:
    return [((reason,), value) for reason, value in sorted(by_reason.items())]


def _counter(
    name: str,
    documentation: str,
    samples: Iterable[tuple[tuple[str, ...], int]],
    labels: list[str] | None = None,
) -> CounterMetricFamily:
    family = CounterMetricFamily(f"{PREFIX}_{name}", documentation, labels=labels or [])
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


class GatewayMetrics:
    """The gateway's registry: snapshot-backed counters plus the handshake histogram."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        refresh: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        # `refresh` reads what the snapshot cannot read on the event loop (the live
        # ruleset's counters, in a worker thread) before each scrape.
        self.refresh = refresh
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_SnapshotCollector(snapshot))
        self.handshake = Histogram(
            f"{PREFIX}_handshake_duration_seconds",
            "From the first ClientHello that passed the cookie check to admission",
            buckets=HANDSHAKE_BUCKETS,
            registry=self.registry,
        )

    def observe_handshake(self, seconds: float) -> None:
        self.handshake.observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition format."""
        return generate_latest(self.registry)


class MetricsServer:
    """``GET /metrics`` over HTTP/1.0-style one-request connections, on the event loop."""

    def __init__(self, metrics: GatewayMetrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=8192)
        sockets = self._server.sockets
        if sockets:
            self.port = sockets[0].getsockname()[1]  # when started on port 0 (tests)
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, target, *_ = [*request_line.split(" "), "", ""]
            path = target.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, body, kind = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path == "/metrics":
                if self.metrics.refresh is not None:
                    await self.metrics.refresh()
                status, body, kind = "200 OK", self.metrics.render(), CONTENT_TYPE_LATEST
            elif path == "/":
                status, body, kind = "200 OK", b'<a href="/metrics">/metrics</a>\n', "text/html"
            else:
                status, body, kind = "404 Not Found", b"see /metrics\n", "text/plain"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a slow, truncated or oversized request: just hang up
        except ConnectionError:
            pass
        except Exception:
            log.exception("metrics: internal error")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
