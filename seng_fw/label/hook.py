"""The NFQUEUE hook: label the first packet of each new connection of the shared subnet.

The queue rules (`seng_fw.label.install`) send only packets of `ct state new` from or to
the shared subnet here, copying the first 20 bytes (the IPv4 header up to the
addresses). For each, `Labeller` computes the mark from the registry (pure, no I/O) and
the hook accepts the packet with that mark (NetfilterQueue 1.1.0 can set the packet
mark in the verdict, not the conntrack mark); a rule right after the queue copies it to
the connection (`ct mark set meta mark`). Later packets of the connection are
`established` and never leave the kernel.

The hook is a thin adapter for an asyncio loop: one NetfilterQueue per queue number,
each socket watched with `loop.add_reader`; a wakeup handles at most `batch` packets so
that a flood of new connections cannot starve the loop's other work (the gateway's
tunnels): the excess waits in the kernel queue, and beyond its `max_len` the kernel
drops new connections (counted in /proc/net/netfilter/nfnetlink_queue), never passes
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from seng_fw.label.marks import UNKNOWN
from seng_fw.label.registry import Registry
from seng_fw.system.netns import run_in_netns

log = logging.getLogger("seng_fw.label")

COPY_RANGE = 20  # bytes of each packet the kernel copies to us: the addresses end at 20
DEFAULT_BATCH = 64  # packets per loop wakeup and queue
DEFAULT_MAX_LEN = 1024  # packets the kernel holds per queue before it drops new ones
QUEUE_STATS = "/proc/thread-self/net/netfilter/nfnetlink_queue"  # this thread's netns


class Labeller:
    """IPv4 header -> mark (sans-I/O), with counters."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.labelled = 0
        self.unknown_source = 0
        self.unknown_destination = 0
        self.malformed = 0

    def mark(self, header: bytes) -> int | None:
        """The mark for the first packet whose IPv4 header starts `header`; None for a
        packet that is not IPv4 (to be dropped)."""
        if len(header) < 20 or header[0] >> 4 != 4:
            self.malformed += 1
            return None
        label = self.registry.label
        source, destination = label(header[12:16]), label(header[16:20])
        self.labelled += 1
        if source == UNKNOWN:
            self.unknown_source += 1
        if destination == UNKNOWN:
            self.unknown_destination += 1
        return (destination << 16) | source

    def counters(self) -> dict[str, int]:
        return {
            "labelled": self.labelled,
            "unknown_source": self.unknown_source,
            "unknown_destination": self.unknown_destination,
            "malformed": self.malformed,
        }


# --- the kernel's view of the queues ----------------------------------------------------


@dataclass(frozen=True)
class QueueStats:
    """One line of /proc/net/netfilter/nfnetlink_queue."""

    queue: int
    portid: int  # netlink port of the listener
    waiting: int  # packets queued, verdict pending
    copy_mode: int
    copy_range: int
    queue_dropped: int  # dropped because the queue was full (max_len)
    user_dropped: int  # dropped because the listener's socket buffer was full
    id_sequence: int  # id of the last packet queued


def parse_queue_stats(text: str) -> dict[int, QueueStats]:
    stats: dict[int, QueueStats] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8 or not all(f.isdigit() for f in fields[:8]):
            continue
        values = [int(f) for f in fields[:8]]
        stats[values[0]] = QueueStats(*values)
    return stats


def read_queue_stats(netns: str | None = None) -> dict[int, QueueStats]:
    """The kernel's counters of the bound queues of `netns` (default: this thread's)."""

    def read() -> str:
        try:
            return Path(QUEUE_STATS).read_text()
        except FileNotFoundError:  # nfnetlink_queue not loaded: no queue bound
            return ""

    return parse_queue_stats(run_in_netns(netns, read))


# --- the adapter ------------------------------------------------------------------------


class LabelHookError(RuntimeError):
    """A queue could not be bound (another process holds it, no NFQUEUE support...)."""


class _Budget:
    """The socket NetfilterQueue.run_socket reads from: non-blocking, and it reports
    "would block" once `left` messages were read, which ends the batch."""

    def __init__(self, sock: socket.socket, left: int, hook: LabelHook) -> None:
        self.sock, self.left, self.hook = sock, left, hook

    def recv(self, size: int) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "batch done")
        try:
            data = self.sock.recv(size, socket.MSG_DONTWAIT)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:  # the kernel could not deliver some packets
                self.hook.socket_overruns += 1
            raise
        self.left -= 1
        return data


@dataclass
class _Bound:
    number: int
    queue: Any  # netfilterqueue.NetfilterQueue (untyped)
    sock: socket.socket  # a dup of the queue's netlink socket, for run_socket


class LabelHook:
    """Binds `queues` (in network namespace `netns`, default: the caller's) and labels
    what they carry. Use `start()` / `stop()` from the event loop, or as an async
    context manager."""

    def __init__(
        self,
        registry: Registry,
        queues: Sequence[int],
        *,
        netns: str | None = None,
        batch: int = DEFAULT_BATCH,
        max_len: int = DEFAULT_MAX_LEN,
    ) -> None:
        if not queues:
            raise ValueError("no queue to bind")
        self.labeller = Labeller(registry)
        self.queues = tuple(queues)
        self.netns = netns
        self.batch, self.max_len = batch, max_len
        self.verdict_errors = 0
        self.socket_overruns = 0
        self._bound: list[_Bound] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def running(self) -> bool:
        return self._loop is not None

    def start(self) -> None:
        """Bind every queue and watch them on the running loop (LabelHookError if a
        queue cannot be bound: nothing stays bound then)."""
        if self._loop is not None:
            return
        loop = asyncio.get_running_loop()
        try:
            for number in self.queues:
                self._bound.append(self._bind(number))
        except BaseException:
            self._unbind_all()
            raise
        for bound in self._bound:
            loop.add_reader(bound.sock.fileno(), self._drain, bound)
        self._loop = loop
        log.info("labelling new connections from queues %s", ",".join(map(str, self.queues)))

    def stop(self) -> None:
        """Unbind: from now on the kernel drops what the queues would carry."""
        if self._loop is not None:
            for bound in self._bound:
                self._loop.remove_reader(bound.sock.fileno())
            self._loop = None
        self._unbind_all()

    async def __aenter__(self) -> LabelHook:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def counters(self) -> dict[str, int]:
        """Our counters and the kernel's for our queues (`seng-fw status`)."""
        out = self.labeller.counters()
        out["verdict_errors"] = self.verdict_errors
        out["socket_overruns"] = self.socket_overruns
        kernel = read_queue_stats(self.netns)
        mine = [kernel[q] for q in self.queues if q in kernel]
        out["queue_dropped"] = sum(s.queue_dropped for s in mine)
        out["user_dropped"] = sum(s.user_dropped for s in mine)
        out["waiting"] = sum(s.waiting for s in mine)
        return out

    # --- internals ------------------------------------------------------------------

    def _bind(self, number: int) -> _Bound:
        from netfilterqueue import COPY_PACKET, NetfilterQueue

        try:
            # The netlink socket belongs to the namespace of the thread that opens it.
            queue = run_in_netns(self.netns, NetfilterQueue)
            with warnings.catch_warnings():
                # "rcvbuf limit": harmless, the kernel caps the socket buffer.
                warnings.simplefilter("ignore", RuntimeWarning)
                queue.bind(number, self._on_packet, self.max_len, COPY_PACKET, COPY_RANGE)
        except OSError as exc:
            raise LabelHookError(
                f"cannot bind NFQUEUE {number}: {exc} (is another labeller using it?)"
            ) from exc
        return _Bound(number, queue, socket.socket(fileno=os.dup(queue.get_fd())))

    def _unbind_all(self) -> None:
        for bound in self._bound:
            with contextlib.suppress(Exception):
                bound.queue.unbind()
            bound.sock.close()
        self._bound.clear()

    def _drain(self, bound: _Bound) -> None:
        try:
            bound.queue.run_socket(_Budget(bound.sock, self.batch, self))
        except OSError as exc:
            log.error("reading NFQUEUE %d: %s", bound.number, exc)

    def _on_packet(self, packet: Any) -> None:
        # Must not raise: NetfilterQueue would lose the exception inside its C loop.
        try:
            mark = self.labeller.mark(packet.get_payload())
            if mark is None:
                packet.drop()
                return
            packet.set_mark(mark)
            packet.accept()
        except Exception:
            self.verdict_errors += 1
            log.exception("labelling a packet failed: dropped")
            with contextlib.suppress(Exception):
                packet.drop()
