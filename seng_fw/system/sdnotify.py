"""sd_notify(3) for `Type=notify` units: readiness, status text and watchdog pings.

Hand-written rather than a dependency (python-systemd needs libsystemd headers to
build; the `sdnotify` package is unmaintained): the protocol is one datagram of
newline-separated ``KEY=VALUE`` lines to the AF_UNIX socket named in $NOTIFY_SOCKET
(a leading ``@`` means the abstract namespace). Without $NOTIFY_SOCKET (not started
by systemd) every call does nothing and returns False.

The gateway calls `ready()` once its sockets, TUN device and control socket are up,
and runs `watchdog_loop()` on its event loop, so a stuck loop stops the pings and
systemd restarts the service (WatchdogSec=).
"""

from __future__ import annotations

import asyncio
import os
import socket

_ENV = "NOTIFY_SOCKET"


def notify(*assignments: str) -> bool:
    """Send ``KEY=VALUE`` assignments in one datagram; True if systemd got them."""
    address = os.environ.get(_ENV, "")
    if not address or not assignments:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False  # e.g. vsock: not something a system service is started with
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(assignments).encode(), address)
    except OSError:
        return False  # the notifications are advisory; never crash the gateway for them
    return True


def ready(status: str | None = None) -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between pings (half of WatchdogSec=), or None when no watchdog is set
    for this process (WATCHDOG_PID names another process, e.g. after a fork)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6


async def watchdog_loop(interval: float | None = None) -> None:
    """Ping the watchdog from the event loop until cancelled (returns at once if no
    watchdog is configured)."""
    interval = watchdog_interval() if interval is None else interval
    if interval is None:
        return
    while True:
        watchdog()
        await asyncio.sleep(interval)
