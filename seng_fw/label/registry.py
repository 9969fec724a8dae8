"""The live registry: which enclave holds each address, and its label id.

The gateway owns it: it adds a record when it leases an address to an admitted enclave
and removes it when the address is released (before the address's conntrack entries
are deleted, so no new connection picks up the old label in between). The labeller
reads it once per end of each new connection (`Registry.label`, one dict probe on the
4 address bytes of the IP header).

When the labeller runs as its own service, `LabelRegistryServer` (in the gateway) and
`LabelRegistryClient` (in the service) keep a copy in sync over a local Unix stream
socket carrying JSON lines:

    server -> client  {"type": "snapshot", "version": 1, "scope": {...}, "records": [...]}
                      {"type": "add", "record": {...}}
                      {"type": "remove", "address": "192.168.28.7"}
    client -> server  {"type": "stats", "queues": [0, 1], "counters": {...}}

A snapshot comes first on every connection and again after a relabel. A client that
loses the connection clears its copy (every shared address becomes UNKNOWN: fail
closed) and reconnects; a client that reads too slowly is disconnected and resyncs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Protocol

from seng_fw.label.marks import NONE, UNKNOWN, LabelTable
from seng_fw.system import ipc

log = logging.getLogger("seng_fw.label")

PROTOCOL_VERSION = 1
DEFAULT_SOCKET = Path("/run/seng-fw/label.sock")
MAX_LINE = 16 * 1024 * 1024  # a snapshot of a few hundred thousand enclaves


@dataclass(frozen=True, slots=True)
class EnclaveRecord:
    """An admitted enclave, as the labeller sees it."""

    address: IPv4Address
    app: str
    label: int  # LabelTable.label_id(app, host) under the current policy
    host: IPv4Address  # the client host its tunnels come from
    categories: tuple[str, ...] = ()
    mrenclave: bytes = b""
    mrsigner: bytes = b""
    since: float = 0.0  # admission time (the gateway's clock)

    def to_json(self) -> dict[str, Any]:
        return {
            "address": str(self.address),
            "app": self.app,
            "label": self.label,
            "host": str(self.host),
            "categories": list(self.categories),
            "mrenclave": self.mrenclave.hex(),
            "mrsigner": self.mrsigner.hex(),
            "since": self.since,
        }

    @classmethod
    def from_json(cls, obj: Any) -> EnclaveRecord:
        """Raises ValueError (or KeyError/TypeError) on anything malformed."""
        label = obj["label"]
        if not isinstance(label, int) or not 0 <= label <= UNKNOWN:
            raise ValueError(f"bad label {label!r}")
        categories = obj.get("categories", [])
        if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
            raise ValueError("categories must be a list of names")
        return cls(
            address=IPv4Address(obj["address"]),
            app=str(obj["app"]),
            label=label,
            host=IPv4Address(obj["host"]),
            categories=tuple(categories),
            mrenclave=bytes.fromhex(obj.get("mrenclave", "")),
            mrsigner=bytes.fromhex(obj.get("mrsigner", "")),
            since=float(obj.get("since", 0.0)),
        )


# What record_for needs of the gateway's Enclave (seng_fw.gateway.core).
class _Identity(Protocol):
    @property
    def mrenclave(self) -> bytes: ...
    @property
    def mrsigner(self) -> bytes: ...


class _App(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def categories(self) -> list[str]: ...


class EnclaveLike(Protocol):
    @property
    def identity(self) -> _Identity: ...
    @property
    def app(self) -> _App: ...
    @property
    def host(self) -> IPv4Address: ...
    @property
    def address(self) -> IPv4Address: ...
    @property
    def admitted_at(self) -> float: ...


def record_for(enclave: EnclaveLike, table: LabelTable) -> EnclaveRecord:
    """The registry record of a gateway `Enclave` under the policy's label table."""
    return EnclaveRecord(
        address=enclave.address,
        app=enclave.app.name,
        label=table.label_id(enclave.app.name, enclave.host),
        host=enclave.host,
        categories=tuple(enclave.app.categories),
        mrenclave=enclave.identity.mrenclave,
        mrsigner=enclave.identity.mrsigner,
        since=enclave.admitted_at,
    )


@dataclass(frozen=True)
class Scope:
    """The shared subnet, and the gateway's own addresses on it (labelled NONE)."""

    shared: IPv4Network
    own: frozenset[IPv4Address] = frozenset()

    def to_json(self) -> dict[str, Any]:
        return {"shared": str(self.shared), "own": sorted(str(a) for a in self.own)}

    @classmethod
    def from_json(cls, obj: Any) -> Scope:
        return cls(IPv4Network(obj["shared"]), frozenset(IPv4Address(a) for a in obj["own"]))


# Changes, as listeners receive them.
@dataclass(frozen=True)
class Snapshot:
    scope: Scope | None
    records: tuple[EnclaveRecord, ...]


@dataclass(frozen=True)
class Added:
    record: EnclaveRecord


@dataclass(frozen=True)
class Removed:
    address: IPv4Address


Change = Snapshot | Added | Removed
Listener = Callable[[Change], None]


class Registry:
    """Address -> enclave record. Not thread-safe: use it from one event loop."""

    def __init__(self, scope: Scope | None = None) -> None:
        self._records: dict[bytes, EnclaveRecord] = {}
        self._labels: dict[bytes, int] = {}  # the hot path's view of _records
        self._listeners: list[Listener] = []
        self._scope: Scope | None = None
        self._own: frozenset[bytes] = frozenset()
        self._net = self._mask = -1  # no address matches until a scope is set
        self.set_scope(scope)

    # --- the labeller's lookup ----------------------------------------------------

    def label(self, packed: bytes) -> int:
        """Label of the 4-byte address `packed`: its enclave's, NONE for the gateway and
        addresses outside the shared subnet, UNKNOWN for free shared addresses (and for
        every unregistered address while no scope is known)."""
        label = self._labels.get(packed)
        if label is not None:
            return label
        if self._mask < 0:
            return UNKNOWN
        if packed in self._own:
            return NONE
        return UNKNOWN if int.from_bytes(packed, "big") & self._mask == self._net else NONE

    # --- reads ----------------------------------------------------------------------

    @property
    def scope(self) -> Scope | None:
        return self._scope

    def get(self, address: IPv4Address) -> EnclaveRecord | None:
        return self._records.get(address.packed)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[EnclaveRecord]:
        return iter(list(self._records.values()))

    def __contains__(self, address: object) -> bool:
        return isinstance(address, IPv4Address) and address.packed in self._records

    # --- changes ----------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` after every change; returns the function that unsubscribes."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def add(self, record: EnclaveRecord) -> None:
        """Add or replace the record of `record.address`."""
        key = record.address.packed
        self._records[key] = record
        self._labels[key] = record.label
        self._emit(Added(record))

    def remove(self, address: IPv4Address) -> EnclaveRecord | None:
        record = self._records.pop(address.packed, None)
        self._labels.pop(address.packed, None)
        if record is not None:
            self._emit(Removed(address))
        return record

    def replace(self, records: Iterable[EnclaveRecord], scope: Scope | None = None) -> None:
        """Replace everything (and the scope, if given) with one snapshot."""
        if scope is not None:
            self.set_scope(scope, notify=False)
        self._records = {r.address.packed: r for r in records}
        self._labels = {key: r.label for key, r in self._records.items()}
        self._emit(self.snapshot())

    def clear(self) -> None:
        """Forget every enclave; the scope stays, so shared addresses become UNKNOWN."""
        self.replace(())

    def relabel(self, table: LabelTable) -> None:
        """Recompute every label under a new policy's table (one snapshot)."""
        self.replace(
            dataclasses.replace(r, label=table.label_id(r.app, r.host))
            for r in self._records.values()
        )

    def set_scope(self, scope: Scope | None, *, notify: bool = True) -> None:
        self._scope = scope
        if scope is None:
            self._own, self._net, self._mask = frozenset(), -1, -1
        else:
            self._own = frozenset(a.packed for a in scope.own)
            self._net = int(scope.shared.network_address)
            self._mask = int(scope.shared.netmask)
        if notify:
            self._emit(self.snapshot())

    def snapshot(self) -> Snapshot:
        return Snapshot(self._scope, tuple(self._records.values()))

    def _emit(self, change: Change) -> None:
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:  # one broken listener must not stop the others
                log.exception("registry listener failed")


# --- the wire protocol ------------------------------------------------------------------


def encode_change(change: Change) -> bytes:
    if isinstance(change, Snapshot):
        message: dict[str, Any] = {
            "type": "snapshot",
            "version": PROTOCOL_VERSION,
            "scope": None if change.scope is None else change.scope.to_json(),
            "records": [r.to_json() for r in change.records],
        }
    elif isinstance(change, Added):
        message = {"type": "add", "record": change.record.to_json()}
    else:
        message = {"type": "remove", "address": str(change.address)}
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def apply_line(registry: Registry, line: bytes) -> str:
    """Apply one server line to a registry copy and return its type; ValueError if it is
    malformed (the copy may then be half-updated: the caller clears it)."""
    try:
        message = json.loads(line)
        kind = message["type"]
        if kind == "snapshot":
            if message.get("version") != PROTOCOL_VERSION:
                raise ValueError(f"protocol version {message.get('version')!r} not supported")
            scope = None if message["scope"] is None else Scope.from_json(message["scope"])
            records = [EnclaveRecord.from_json(r) for r in message["records"]]
            registry.set_scope(scope, notify=False)
            registry.replace(records)
        elif kind == "add":
            registry.add(EnclaveRecord.from_json(message["record"]))
        elif kind == "remove":
            registry.remove(IPv4Address(message["address"]))
        else:
            raise ValueError(f"unknown message type {kind!r}")
        return str(kind)
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"malformed registry message: {exc!r}") from exc


def parse_stats(line: bytes) -> dict[str, Any] | None:
    """A labeller's `{"type": "stats", "queues": [...], "counters": {...}}` line, or None
    for anything else (the server ignores what it does not understand)."""
    try:
        message = json.loads(line)
        if message["type"] != "stats":
            return None
        return {"queues": list(message["queues"]), "counters": dict(message["counters"])}
    except (ValueError, KeyError, TypeError, RecursionError):
        return None


@dataclass(eq=False)  # clients are kept in a set, by identity
class _Client:
    writer: asyncio.StreamWriter
    name: str
    stats: dict[str, Any] = field(default_factory=dict)


class LabelRegistryServer:
    """Serves the registry to labeller services (in the gateway process)."""

    def __init__(
        self, registry: Registry, path: Path = DEFAULT_SOCKET, *, max_buffer: int = 8 << 20
    ) -> None:
        self.registry = registry
        self.path = path
        self.max_buffer = max_buffer
        self._clients: set[_Client] = set()
        # Only the gateway's user (and root) may connect: the records name enclaves.
        self._listener = ipc.UnixListener(
            path, self._serve, mode=0o600, limit=MAX_LINE, what="label registry socket",
            server_name="gateway",
        )  # fmt: skip
        self._unsubscribe: Callable[[], None] | None = None
        self._counter = 0

    async def start(self) -> None:
        """Listen with the hardening of `seng_fw.system.ipc` (private directory, a
        stale socket replaced, a live one refused, mode 0600 before the name appears).
        Raises IpcError."""
        await self._listener.start()
        self._unsubscribe = self.registry.subscribe(self._broadcast)

    async def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for client in list(self._clients):
            client.writer.close()
        await self._listener.close()

    @property
    def client_stats(self) -> dict[str, dict[str, Any]]:
        """The latest counters each connected labeller reported, by client name."""
        return {c.name: c.stats for c in self._clients}

    def _broadcast(self, change: Change) -> None:
        line = encode_change(change)
        for client in list(self._clients):
            self._send(client, line)

    def _send(self, client: _Client, line: bytes) -> None:
        transport = client.writer.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() > self.max_buffer:
            log.warning("labeller %s reads too slowly: disconnected (it resyncs)", client.name)
            self._clients.discard(client)
            transport.abort()
            return
        client.writer.write(line)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._counter += 1
        client = _Client(writer, f"labeller-{self._counter}")
        # Snapshot and subscription in one step of the loop: no change falls in between.
        self._clients.add(client)
        self._send(client, encode_change(self.registry.snapshot()))
        log.info("%s connected", client.name)
        try:
            while line := await reader.readline():
                stats = parse_stats(line)
                if stats is not None:
                    client.stats = stats
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self._clients.discard(client)
            writer.close()
            log.info("%s disconnected", client.name)


class LabelRegistryClient:
    """Keeps `registry` a copy of the gateway's (in a labeller service)."""

    def __init__(
        self,
        path: Path,
        registry: Registry,
        *,
        retry: float = 0.1,
        max_retry: float = 2.0,
        stats: Callable[[], dict[str, Any]] | None = None,
        stats_interval: float = 5.0,
    ) -> None:
        self.path = path
        self.registry = registry
        self.retry, self.max_retry = retry, max_retry
        self.stats, self.stats_interval = stats, stats_interval
        self.synced = asyncio.Event()  # set while connected and a snapshot has arrived
        self.connections = 0

    async def run(self) -> None:
        """Forever: connect, follow the server's changes; on any loss clear the copy
        (fail closed) and reconnect with backoff."""
        delay = self.retry
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path), limit=MAX_LINE)
            except OSError as exc:
                log.debug("registry %s not reachable: %s", self.path, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_retry)
                continue
            delay = self.retry
            self.connections += 1
            reporter = asyncio.create_task(self._report(writer)) if self.stats else None
            try:
                await self._follow(reader)
            except (OSError, ValueError, asyncio.LimitOverrunError) as exc:
                log.warning("registry connection lost: %s", exc)
            finally:
                self.synced.clear()
                self.registry.clear()
                if reporter is not None:
                    reporter.cancel()
                writer.close()
            await asyncio.sleep(delay)

    async def _follow(self, reader: asyncio.StreamReader) -> None:
        first = True
        while line := await reader.readline():
            if not line.endswith(b"\n"):
                raise ValueError("truncated message")
            kind = apply_line(self.registry, line)
            if first:
                if kind != "snapshot":
                    raise ValueError("the server did not start with a snapshot")
                first = False
                self.synced.set()
        raise ConnectionResetError("registry server closed the connection")

    async def _report(self, writer: asyncio.StreamWriter) -> None:
        assert self.stats is not None
        with contextlib.suppress(ConnectionError):
            while not writer.is_closing():
                message = {"type": "stats", **self.stats()}
                writer.write(json.dumps(message).encode() + b"\n")
                await writer.drain()
                await asyncio.sleep(self.stats_interval)
