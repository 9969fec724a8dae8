"""Network-namespace primitives: iproute2 commands, namespaces, and work inside one.

The plumbing runs iproute2 commands rather than pyroute2: they are the
commands a human types to inspect or repair a lab, their errors are readable,
and pyroute2 forks a helper process for every netlink socket it opens in
another namespace anyway. Short Python jobs (sysctls, sockets) run in a
thread that `setns()`es into the namespace (`run_in_netns`): a thread's
network namespace is its own, so the rest of the process is unaffected, and
sockets and TUN file descriptors keep their namespace after the thread ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

NETNS_RUN_DIR = Path("/run/netns")  # where `ip netns add` bind-mounts namespaces
CLONE_NEWNET = 0x40000000
IFNAMSIZ = 15  # usable characters of an interface name

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    """An iproute2 command or a namespace operation failed."""


# --- primitives -------------------------------------------------------------


def ip(*args: str, netns: str | None = None) -> str:
    """Run `ip [-n NETNS] ARGS...`; return stdout, raise `NetnsError` with stderr."""
    argv = ["ip", *(("-n", netns) if netns else ()), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc.stdout


def list_namespaces(prefix: str = "") -> list[str]:
    """Names of the named network namespaces starting with `prefix`."""
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def namespace_exists(name: str) -> bool:
    return (NETNS_RUN_DIR / name).exists()


def _namespace_pids(name: str) -> list[int]:
    try:
        out = ip("netns", "pids", name)
    except NetnsError:
        return []
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def delete_namespace(name: str, *, kill_grace: float = 2.0) -> bool:
    """Delete a namespace, ending the processes still running in it first.

    The processes would otherwise keep the namespace (and its veths and
    addresses) alive after its name is gone. Returns False if it did not exist.
    """
    if not namespace_exists(name):
        return False
    pids = _namespace_pids(name)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + kill_grace
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            if pids:
                time.sleep(0.02)
        if not pids:
            break
    try:
        ip("netns", "delete", name)
    except NetnsError:
        if namespace_exists(name):
            raise
        return False  # raced with another cleanup
    return True


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def cleanup(prefix: str) -> list[str]:
    """Delete every namespace whose name starts with `prefix`; return their names."""
    if not prefix:
        raise ValueError("refusing to delete every namespace: empty prefix")
    return [name for name in list_namespaces(prefix) if delete_namespace(name)]


def _event_loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def run_in_netns(netns: str | None, fn: Callable[..., T], *args: Any) -> T:
    """Call `fn(*args)` in a thread that has entered namespace `netns`.

    With `netns=None` the call happens in the current namespace: directly, or in a
    helper thread when this thread runs an asyncio loop, because pyroute2's synchronous
    API drives an event loop of its own and cannot run inside a running one.
    Sockets, netlink sockets and TUN devices opened by `fn` belong to `netns`
    and stay usable from any thread afterwards.
    """
    if netns is None and not _event_loop_running():
        return fn(*args)
    result: list[T] = []
    error: list[BaseException] = []

    def enter(name: str) -> None:
        try:
            fd = os.open(NETNS_RUN_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NetnsError(f"no network namespace {name!r}") from None
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({name}): {os.strerror(err)}")
        finally:
            os.close(fd)

    def target() -> None:
        try:
            if netns is not None:
                enter(netns)
            result.append(fn(*args))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{netns or 'current'}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def netns_socket(netns: str | None, family: int, type: int, proto: int = 0) -> socket.socket:
    """A socket that lives in namespace `netns`."""
    return run_in_netns(netns, socket.socket, family, type, proto)


def write_sysctl(netns: str | None, key: str, value: str | int) -> None:
    """Set `key` (dotted, e.g. ``net.ipv4.ip_forward``) inside `netns`."""
    path = Path("/proc/sys", *key.split("."))

    def write() -> None:
        path.write_text(f"{value}\n")

    run_in_netns(netns, write)


def read_sysctl(netns: str | None, key: str) -> str:
    path = Path("/proc/sys", *key.split("."))
    return run_in_netns(netns, lambda: path.read_text().strip())
