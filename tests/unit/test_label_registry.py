"""The live registry, its labels, and its copy in a labeller service over a Unix socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from seng_fw.label.marks import NONE, UNKNOWN, AppLabels, LabelTable
from seng_fw.label.registry import (
    Added,
    Change,
    EnclaveRecord,
    LabelRegistryClient,
    LabelRegistryServer,
    Registry,
    Removed,
    Scope,
    Snapshot,
    apply_line,
    encode_change,
    record_for,
)

A = IPv4Address
SHARED = IPv4Network("192.168.28.0/24")
SCOPE = Scope(SHARED, frozenset({A("192.168.28.1")}))


def rec(address: str, app: str = "web", label: int = 1, host: str = "10.1.0.2") -> EnclaveRecord:
    return EnclaveRecord(
        address=A(address),
        app=app,
        label=label,
        host=A(host),
        categories=("frontend",),
        mrenclave=bytes(32),
        mrsigner=b"\x01" * 32,
        since=12.5,
    )


def test_labels_of_addresses() -> None:
    registry = Registry(SCOPE)
    registry.add(rec("192.168.28.7", label=5))
    registry.add(rec("10.9.0.1", label=6))  # an enclave of a per-app subnet
    assert registry.label(A("192.168.28.7").packed) == 5
    assert registry.label(A("10.9.0.1").packed) == 6
    assert registry.label(A("192.168.28.8").packed) == UNKNOWN  # free shared address
    assert registry.label(A("192.168.28.1").packed) == NONE  # the gateway
    assert registry.label(A("8.8.8.8").packed) == NONE  # outside
    assert registry.remove(A("192.168.28.7")) is not None
    assert registry.label(A("192.168.28.7").packed) == UNKNOWN
    assert registry.remove(A("192.168.28.7")) is None


def test_without_scope_every_unregistered_address_is_unknown() -> None:
    registry = Registry()
    registry.add(rec("192.168.28.7", label=5))
    assert registry.label(A("192.168.28.7").packed) == 5
    assert registry.label(A("8.8.8.8").packed) == UNKNOWN


def test_changes_reach_listeners_and_clear_keeps_the_scope() -> None:
    registry = Registry(SCOPE)
    seen: list[Change] = []
    unsubscribe = registry.subscribe(seen.append)
    registry.add(rec("192.168.28.7"))
    registry.remove(A("192.168.28.7"))
    registry.add(rec("192.168.28.9"))
    registry.clear()
    assert [type(c) for c in seen] == [Added, Removed, Added, Snapshot]
    assert len(registry) == 0 and registry.scope == SCOPE
    assert registry.label(A("192.168.28.9").packed) == UNKNOWN
    unsubscribe()
    registry.add(rec("192.168.28.7"))
    assert len(seen) == 4


def test_a_failing_listener_does_not_stop_the_others() -> None:
    registry = Registry(SCOPE)
    seen: list[Change] = []

    def broken(change: Change) -> None:
        raise RuntimeError("boom")

    registry.subscribe(broken)
    registry.subscribe(seen.append)
    registry.add(rec("192.168.28.7"))
    assert len(seen) == 1 and A("192.168.28.7") in registry


def test_relabel_follows_a_new_table() -> None:
    hosts = (IPv4Network("10.0.0.0/8"),)
    before = LabelTable([AppLabels("web", hosts), AppLabels("db", hosts)])
    after = LabelTable([AppLabels("new", hosts), AppLabels("web", hosts), AppLabels("db", hosts)])
    registry = Registry(SCOPE)
    registry.add(rec("192.168.28.7", "db", before.label_id("db", A("10.1.0.2"))))
    registry.relabel(after)
    assert registry.label(A("192.168.28.7").packed) == after.label_id("db", A("10.1.0.2")) == 3


HOST_B, DB_ADDRESS = A("10.1.0.3"), A("192.168.28.21")


@dataclass
class FakeIdentity:
    mrenclave: bytes = b"\xaa" * 32
    mrsigner: bytes = b"\xbb" * 32


@dataclass
class FakeApp:
    name: str = "db"
    categories: list[str] = field(default_factory=lambda: ["backend"])


@dataclass
class FakeEnclave:
    identity: FakeIdentity = field(default_factory=FakeIdentity)
    app: FakeApp = field(default_factory=FakeApp)
    host: IPv4Address = HOST_B
    address: IPv4Address = DB_ADDRESS
    admitted_at: float = 99.0


def test_record_for_a_gateway_enclave() -> None:
    hosts = (IPv4Network("10.0.0.0/8"),)
    table = LabelTable([AppLabels("web", hosts), AppLabels("db", hosts)])
    record = record_for(FakeEnclave(), table)
    assert record == EnclaveRecord(
        address=A("192.168.28.21"),
        app="db",
        label=2,
        host=A("10.1.0.3"),
        categories=("backend",),
        mrenclave=b"\xaa" * 32,
        mrsigner=b"\xbb" * 32,
        since=99.0,
    )


# --- the wire protocol ------------------------------------------------------------


def test_changes_roundtrip_through_lines() -> None:
    source = Registry(SCOPE)
    source.add(rec("192.168.28.7", label=5))
    copy = Registry()
    assert apply_line(copy, encode_change(source.snapshot())) == "snapshot"
    assert copy.scope == SCOPE and copy.get(A("192.168.28.7")) == rec("192.168.28.7", label=5)
    apply_line(copy, encode_change(Added(rec("192.168.28.8", label=6))))
    apply_line(copy, encode_change(Removed(A("192.168.28.7"))))
    assert [r.address for r in copy] == [A("192.168.28.8")]


@pytest.mark.parametrize(
    "line",
    [
        b"not json\n",
        b'{"type": "nope"}\n',
        b'{"type": "snapshot", "version": 99, "scope": null, "records": []}\n',
        b'{"type": "add", "record": {"address": "1.2.3.4"}}\n',
        b'{"type": "add", "record": {"address": "1.2.3.4", "app": "a", "label": 70000, '
        b'"host": "1.1.1.1"}}\n',
        b'{"type": "remove", "address": "1.2.3"}\n',
        b"[1, 2]\n",
    ],
)
def test_malformed_lines_are_value_errors(line: bytes) -> None:
    with pytest.raises(ValueError):
        apply_line(Registry(), line)


# --- server and client ------------------------------------------------------------


async def until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 15))


def test_client_follows_the_server_and_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "label.sock"

    async def main() -> None:
        registry = Registry(SCOPE)
        registry.add(rec("192.168.28.7", label=5))
        server = LabelRegistryServer(registry, path)
        await server.start()
        assert path.stat().st_mode & 0o077 == 0  # root only
        copy = Registry()
        client = LabelRegistryClient(
            path, copy, retry=0.02, stats=lambda: {"queues": [3], "counters": {"labelled": 7}},
            stats_interval=0.05,
        )  # fmt: skip
        task = asyncio.create_task(client.run())
        await asyncio.wait_for(client.synced.wait(), 3)
        assert copy.label(A("192.168.28.7").packed) == 5 and copy.scope == SCOPE
        registry.add(rec("192.168.28.8", label=6))
        registry.remove(A("192.168.28.7"))
        await until(lambda: copy.label(A("192.168.28.8").packed) == 6)
        assert copy.label(A("192.168.28.7").packed) == UNKNOWN
        await until(lambda: list(server.client_stats.values()) == [
            {"queues": [3], "counters": {"labelled": 7}}
        ])  # fmt: skip
        # The gateway goes away: the copy forgets every enclave (fail closed).
        await server.close()
        await until(lambda: len(copy) == 0)
        assert copy.label(A("192.168.28.8").packed) == UNKNOWN
        # It comes back: the client reconnects and resyncs by itself.
        server = LabelRegistryServer(registry, path)
        await server.start()
        await until(lambda: copy.label(A("192.168.28.8").packed) == 6)
        assert client.connections == 2
        task.cancel()
        await server.close()

    run(main)


def test_a_client_that_does_not_read_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "label.sock"

    async def main() -> None:
        registry = Registry(SCOPE)
        server = LabelRegistryServer(registry, path, max_buffer=64 * 1024)
        await server.start()
        reader, writer = await asyncio.open_unix_connection(str(path))
        await until(lambda: len(server.client_stats) == 1)
        for i in range(20000):  # far more than the socket buffers plus max_buffer hold
            registry.add(rec(f"192.168.{i // 250}.{i % 250 + 1}", label=1 + i % 100))
            if i % 1000 == 0:
                await asyncio.sleep(0)
        await until(lambda: len(server.client_stats) == 0)
        writer.close()
        # A fresh connection starts with a snapshot of everything.
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 24)
        first = json.loads(await reader.readline())
        assert first["type"] == "snapshot" and len(first["records"]) == 20000
        writer.close()
        await server.close()

    run(main)


def test_client_refuses_a_server_that_does_not_start_with_a_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "label.sock"

    async def main() -> None:
        writers: list[asyncio.StreamWriter] = []

        async def rogue(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            writer.write(encode_change(Added(rec("192.168.28.7", label=5))))
            await writer.drain()

        server = await asyncio.start_unix_server(rogue, path=str(path))
        copy = Registry(SCOPE)
        client = LabelRegistryClient(path, copy, retry=0.02)
        task = asyncio.create_task(client.run())
        await until(lambda: client.connections >= 2)
        assert not client.synced.is_set() and len(copy) == 0
        task.cancel()
        for writer in writers:  # the server's ends (server.close() leaves them open)
            writer.close()
        server.close()
        await server.wait_closed()

    run(main)
