"""The labeller as its own service: follows the gateway's registry over a Unix socket
and labels the queues it is given. Several processes may share the work, each with its
own queue numbers (the queue rules spread connections over all of them).

    seng-fw label-hook --socket /run/seng-fw/label.sock --queues 0-1
    python -m seng_fw.label ...            (the same)

systemd/seng-fw-label.service runs it (Type=notify: READY=1 once the registry is synced
and the queues are bound; watchdog pings from the event loop).

The gateway installs the queue rules, not this service: while it is down the kernel
drops new connections of the shared subnet, it never passes them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seng_fw.label.hook import DEFAULT_BATCH, DEFAULT_MAX_LEN, LabelHook, LabelHookError
from seng_fw.label.registry import DEFAULT_SOCKET, LabelRegistryClient, Registry
from seng_fw.system import sdnotify
from seng_fw.system.cli_toolkit import Refused

log = logging.getLogger("seng_fw.label")


def parse_queues(text: str) -> list[int]:
    """`3` or `0-3` -> queue numbers."""
    first, _, last = text.partition("-")
    low, high = int(first), int(last or first)
    if not 0 <= low <= high <= 0xFFFF:
        raise ValueError(f"bad queue range {text!r}")
    return list(range(low, high + 1))


async def serve(
    socket_path: Path,
    queues: Sequence[int],
    *,
    netns: str | None = None,
    batch: int = DEFAULT_BATCH,
    max_len: int = DEFAULT_MAX_LEN,
    stats_interval: float = 5.0,
    stop: asyncio.Event | None = None,
) -> dict[str, int]:
    """Run until `stop` is set (or SIGTERM/SIGINT); returns the final counters."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop.set)
    registry = Registry()
    hook = LabelHook(registry, queues, netns=netns, batch=batch, max_len=max_len)
    client = LabelRegistryClient(
        socket_path,
        registry,
        stats=lambda: {"queues": list(queues), "counters": hook.counters()},
        stats_interval=stats_interval,
    )
    follow = asyncio.create_task(client.run())
    try:
        # Bind only once synced: packets would otherwise be labelled UNKNOWN (dropped).
        synced = asyncio.create_task(client.synced.wait())
        halted = asyncio.create_task(stop.wait())
        await asyncio.wait({synced, halted}, return_when=asyncio.FIRST_COMPLETED)
        synced.cancel()
        halted.cancel()
        if stop.is_set():
            return hook.labeller.counters()
        hook.start()
        sdnotify.ready(f"labelling queues {','.join(map(str, queues))}")
        watchdog = asyncio.create_task(sdnotify.watchdog_loop())
        await stop.wait()
        sdnotify.stopping()
        watchdog.cancel()
        return hook.counters()
    finally:
        hook.stop()
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, default=DEFAULT_SOCKET, help="registry socket")
    parser.add_argument("--queues", type=parse_queues, default=[0], help="N or FIRST-LAST")
    parser.add_argument(
        "--batch",
        type=int,
        default=DEFAULT_BATCH,
        help=f"verdicts sent per batch (default {DEFAULT_BATCH})",
    )
    parser.add_argument(
        "--max-len",
        type=int,
        default=DEFAULT_MAX_LEN,
        help=f"kernel queue length per NFQUEUE (default {DEFAULT_MAX_LEN})",
    )
    parser.add_argument(
        "--stats-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how often the queue statistics are read and published (default 5)",
    )


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """`seng-fw label-hook`: the gateway's `label: {hook: service}`."""
    parser = sub.add_parser(
        "label-hook",
        help="run the NFQUEUE labeller as its own service (gateway `label: {hook: service}`)",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "verbose", 0):
        logging.getLogger("seng_fw").setLevel(logging.INFO)  # a service logs what it does
    try:
        counters = asyncio.run(
            serve(
                args.socket,
                args.queues,
                batch=args.batch,
                max_len=args.max_len,
                stats_interval=args.stats_interval,
            )
        )
    except LabelHookError as exc:
        log.error("%s", exc)
        raise Refused(f"label-hook: {exc}") from None
    log.info("stopped: %s", " ".join(f"{k}={v}" for k, v in counters.items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m seng_fw.label", description="seng-fw NFQUEUE labeller service"
    )
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.set_defaults(func=run)
    from seng_fw import cli  # the one error handling of every command

    return cli.run(parser, argv)
