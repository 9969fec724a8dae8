"""Local IPC: JSON lines over Unix stream sockets, for the control socket
(seng_fw.ops.control) and the labeller's registry (seng_fw.label.registry).

Listening (`UnixListener.start`) is hardened the same way for both, because whoever can
connect can act on the gateway or learn which enclave holds which address:
- the socket's directory must belong to us or root and be writable by nobody else
  (anyone who can write there could swap the socket for their own); a missing one is
  created private (0750; normally systemd's RuntimeDirectory= made it);
- a stale socket (nobody answers) is replaced; a live one means another process is
  serving there, and we refuse rather than steal it;
- the socket is bound under a temporary name, given its mode (and group), renamed into
  place and checked, so the public name never has other permissions;
- on close we unlink it only if it is still ours (same inode).

Connecting needs write permission on the socket, so its mode and group decide who may
talk to the server (root always may).

The client side (`request`) sends one JSON object and reads one JSON line back.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import pwd
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

DEFAULT_CONTROL_SOCKET = Path("/run/seng-fw/control.sock")

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class IpcError(Exception):
    """Server side: the socket cannot be set up safely (the text says why)."""


class IpcUnavailable(Exception):
    """Client side: nobody answers on the socket."""


class IpcNoAnswer(IpcUnavailable):
    """Client side: a server was reached but gave no (valid) answer: it timed out, closed
    the connection or sent something that is not JSON."""


class IpcPermissionDenied(IpcUnavailable):
    """Client side: this user may not connect to the socket (a server may be running)."""


# ----- listening ------------------------------------------------------------------------


class UnixListener:
    """A hardened Unix stream socket served by asyncio (`handler` per connection)."""

    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        mode: int = 0o600,
        group: str | None = None,
        limit: int = 64 * 1024,
        what: str = "socket",
        server_name: str = "process",
    ) -> None:
        self.path = path
        self.handler = handler
        self.mode = mode
        self.group = group
        self.limit = limit
        self.what = what  # for messages: "control socket", "label registry socket"
        self.server_name = server_name  # "another gateway is listening on ..."
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None

    async def start(self) -> None:
        """Check the directory, replace a stale socket, listen. Raises IpcError."""
        try:
            gid = group_id(self.group)
            check_directory(self.path.parent)
            remove_stale_socket(self.path, self.server_name)
        except IpcError as exc:
            raise IpcError(f"{self.what} {self.path}: {exc}") from None
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        temporary.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(temporary))
            os.chmod(temporary, self.mode)
            if gid is not None and os.stat(temporary).st_gid != gid:
                os.chown(temporary, -1, gid)
            os.rename(temporary, self.path)
            self._inode = verify_socket(self.path, self.mode, gid)
            self._server = await asyncio.start_unix_server(
                self.handler, sock=sock, limit=self.limit
            )
        except BaseException as exc:
            sock.close()
            temporary.unlink(missing_ok=True)
            self._unlink()
            if isinstance(exc, IpcError):
                raise IpcError(f"{self.what} {self.path}: {exc}") from None
            if isinstance(exc, OSError):
                raise IpcError(f"{self.what} {self.path}: {exc}") from exc
            raise

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._unlink()

    def _unlink(self) -> None:
        # Only our own socket: a newer server may already have replaced it.
        with contextlib.suppress(OSError):
            if self._inode is not None and os.lstat(self.path).st_ino == self._inode:
                self.path.unlink()
        self._inode = None


def group_id(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise IpcError(f"group {group!r} does not exist") from None


def check_directory(directory: Path) -> None:
    """The socket's directory must belong to us or root and be writable by nobody else:
    whoever can write there can replace the socket with their own."""
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        # Normally systemd's RuntimeDirectory= made it; without systemd, make it private.
        directory.mkdir(mode=0o750, parents=True)
        info = os.stat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise IpcError(f"{directory} is not a directory")
    if info.st_uid not in (0, os.geteuid()):
        raise IpcError(f"{directory} belongs to uid {info.st_uid}, not to root or us")
    if info.st_mode & 0o022:
        raise IpcError(
            f"{directory} is writable by group or others (mode {info.st_mode & 0o7777:#o}): "
            "another user could replace the socket; use a private directory"
        )


def remove_stale_socket(path: Path, server_name: str = "process") -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise IpcError(f"{path} exists and is not a socket; not touching it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # left by a process that died
            return
        except OSError as exc:
            raise IpcError(f"{path}: cannot check the existing socket: {exc}") from exc
    raise IpcError(f"another {server_name} is listening on {path}")


def verify_socket(path: Path, mode: int, gid: int | None) -> int:
    info = os.lstat(path)
    problems = []
    if not stat.S_ISSOCK(info.st_mode):
        problems.append("not a socket")
    if info.st_uid != os.geteuid():
        problems.append(f"owner uid {info.st_uid}, expected {os.geteuid()}")
    if stat.S_IMODE(info.st_mode) != mode:
        problems.append(f"mode {stat.S_IMODE(info.st_mode):#o}, expected {mode:#o}")
    if gid is not None and info.st_gid != gid:
        problems.append(f"group {info.st_gid}, expected {gid}")
    if problems:
        raise IpcError("; ".join(problems))
    return info.st_ino


def peer_credentials(writer: asyncio.StreamWriter) -> str:
    """`uid=... gid=... pid=...` of the connected process, for audit logs."""
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return "?"
    pid, uid, gid = struct.unpack("3i", creds)
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = "?"
    return f"{user} (uid={uid} gid={gid} pid={pid})"


def encode(message: Any) -> bytes:
    return json.dumps(message, default=str).encode() + b"\n"


# ----- the client ---------------------------------------------------------------------


def request(path: Path, message: Any, timeout: float = 30.0) -> Any:
    """Send `message`, return the decoded answer line (blocking; one connection).
    Raises IpcUnavailable (nobody listening), IpcPermissionDenied or IpcNoAnswer (a
    server was reached but did not answer properly), each with a sentence for the user."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(encode(message))
            with sock.makefile("rb") as answers:
                line = answers.readline()
    except (FileNotFoundError, ConnectionRefusedError):
        raise IpcUnavailable(f"nothing is listening on {path}") from None
    except PermissionError:
        raise IpcPermissionDenied(
            f"permission denied on {path}: run as root or as a member of its group"
        ) from None
    except TimeoutError:
        raise IpcNoAnswer(f"no answer on {path} within {timeout:g}s") from None
    except OSError as exc:
        raise IpcUnavailable(f"{path}: {exc}") from None
    if not line:
        raise IpcNoAnswer(f"{path} was closed without an answer")
    try:
        return json.loads(line)
    except ValueError:
        raise IpcNoAnswer(f"{path}: the answer is not JSON") from None
