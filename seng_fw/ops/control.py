"""The gateway's local control socket: `seng-fw status | enclaves | revoke | reload`.

Protocol: JSON lines over a Unix stream socket. A request is
``{"command": "status" | "enclaves" | "revoke" | "reload", "args": {...}}``, the answer
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "text"}``; a connection may
carry several requests.

Access: connecting to a Unix socket needs write permission on it, so the socket's mode
and group decide who may talk to the gateway (root always may). `ControlServer.start`
refuses to listen unless the directory is private to its owner (nobody else could
swap the socket) and the socket ends up with exactly the configured mode and group.

`seng_fw.gateway.service.GatewayControl` answers the requests from a running
`GatewayCore`; the gateway process builds one and hands it to `ControlServer` (and to
`seng_fw.ops.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import socket
import stat
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from seng_fw.gateway.config import DEFAULT_CONTROL_SOCKET, ControlConfig
from seng_fw.gateway.service import ControlError

if TYPE_CHECKING:
    pass

log = logging.getLogger("seng_fw.ops.control")

COMMANDS = ("status", "enclaves", "revoke", "reload")
MAX_LINE = 64 * 1024  # a request is a few hundred bytes; answers are not limited
IDLE_TIMEOUT = 60.0  # a client that sends nothing for this long is disconnected


class ControlUnavailable(Exception):
    """Client side: no gateway answers on the socket (not running, or no permission)."""


class ControlPermissionDenied(ControlUnavailable):
    """Client side: the socket (or its directory) does not let this user connect; a
    gateway may well be running."""


class ControlRequestFailed(Exception):
    """Client side: the gateway answered with an error (its text is the message)."""


class ControlHandler(Protocol):
    """What the control socket asks of the gateway. Methods run on the event loop."""

    def status(self) -> dict[str, Any]: ...

    def enclaves(self) -> list[dict[str, Any]]: ...

    def revoke(
        self,
        *,
        app: str | None = None,
        address: str | None = None,
        mrenclave: str | None = None,
        clear: bool = False,
    ) -> dict[str, Any]: ...

    async def reload(self) -> dict[str, Any]: ...


# ----- server ------------------------------------------------------------------------


class ControlServer:
    def __init__(
        self, handler: ControlHandler, path: Path, mode: int = 0o660, group: str | None = None
    ) -> None:
        self.handler = handler
        self.path = path
        self.mode = mode
        self.group = group
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @classmethod
    def from_config(cls, handler: ControlHandler, config: ControlConfig) -> ControlServer:
        return cls(handler, config.socket, config.mode, config.group)

    async def start(self) -> None:
        """Check the directory, replace a stale socket, listen. Raises ControlError."""
        gid = _group_id(self.group)
        _check_directory(self.path.parent)
        _remove_stale_socket(self.path)
        # Bound under a temporary name and renamed once mode and group are right, so the
        # public name never has other permissions than the configured ones.
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        temporary.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(temporary))
            os.chmod(temporary, self.mode)
            if gid is not None and os.stat(temporary).st_gid != gid:
                os.chown(temporary, -1, gid)
            os.rename(temporary, self.path)
            self._inode = _verify_socket(self.path, self.mode, gid)
            self._server = await asyncio.start_unix_server(
                self._serve_client, sock=sock, limit=MAX_LINE
            )
        except BaseException as exc:
            sock.close()
            temporary.unlink(missing_ok=True)
            self._unlink()
            if isinstance(exc, OSError):
                raise ControlError(f"control socket {self.path}: {exc}") from exc
            raise
        log.info("control socket %s (mode %#o, group %s)", self.path, self.mode, self.group or "-")

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        self._server = None
        self._unlink()

    def _unlink(self) -> None:
        # Only our own socket: a newer gateway may already have replaced it.
        with contextlib.suppress(OSError):
            if self._inode is not None and os.lstat(self.path).st_ino == self._inode:
                self.path.unlink()
        self._inode = None

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._writers.add(writer)
        peer = _peer_credentials(writer)
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
                except TimeoutError:
                    break
                except ValueError:  # longer than MAX_LINE
                    writer.write(_encode({"ok": False, "error": "request too long"}))
                    break
                if not line:
                    break
                writer.write(_encode(await self.respond(line, peer)))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def respond(self, line: bytes, peer: str = "?") -> dict[str, Any]:
        """The answer to one request line (never raises)."""
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ControlError("a request is a JSON object")
            command, args = request.get("command"), request.get("args")
            args = {} if args is None else args
            if not isinstance(args, dict):
                raise ControlError("args must be a JSON object")
            if command in ("revoke", "reload"):  # who changed what, for the audit trail
                log.info("control: %s %s by %s", command, json.dumps(args), peer)
            if command == "reload":  # the only one that waits (the policy loads off the loop)
                return {"ok": True, "result": await self.handler.reload()}
            return {"ok": True, "result": self._dispatch(command, args)}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except ValueError as exc:  # json.JSONDecodeError
            return {"ok": False, "error": f"not a JSON request: {exc}"}
        except RecursionError:  # found by fuzzing: "[[[[..." deeper than json can decode
            return {"ok": False, "error": "not a JSON request: nested too deeply"}
        except Exception as exc:
            log.exception("control: internal error")
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}

    def _dispatch(self, command: object, args: dict[str, Any]) -> Any:
        handler = self.handler
        if command == "status":
            return handler.status()
        if command == "enclaves":
            return handler.enclaves()
        if command == "revoke":
            unknown = set(args) - {"app", "address", "mrenclave", "clear"}
            if unknown:
                raise ControlError(f"revoke: unknown arguments {sorted(unknown)}")
            texts = {key: args.get(key) for key in ("app", "address", "mrenclave")}
            if any(value is not None and not isinstance(value, str) for value in texts.values()):
                raise ControlError("revoke: app, address and mrenclave are strings")
            return handler.revoke(
                app=texts["app"],
                address=texts["address"],
                mrenclave=texts["mrenclave"],
                clear=args.get("clear") is True,
            )
        raise ControlError(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, default=str).encode() + b"\n"


def _group_id(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ControlError(f"control socket group {group!r} does not exist") from None


def _check_directory(directory: Path) -> None:
    """The socket's directory must belong to us or root and be writable by nobody else:
    whoever can write there can replace the socket with their own."""
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        # Normally systemd's RuntimeDirectory= made it; without systemd, make it private.
        directory.mkdir(mode=0o750, parents=True)
        info = os.stat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise ControlError(f"{directory} is not a directory")
    if info.st_uid not in (0, os.geteuid()):
        raise ControlError(f"{directory} belongs to uid {info.st_uid}, not to root or us")
    if info.st_mode & 0o022:
        raise ControlError(
            f"{directory} is writable by group or others (mode {info.st_mode & 0o7777:#o}): "
            "another user could replace the control socket; use a private directory"
        )


def _remove_stale_socket(path: Path) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlError(f"{path} exists and is not a socket; not touching it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # left by a gateway that died
            return
        except OSError as exc:
            raise ControlError(f"{path}: cannot check the existing socket: {exc}") from exc
    raise ControlError(f"another gateway is listening on {path}")


def _verify_socket(path: Path, mode: int, gid: int | None) -> int:
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
        raise ControlError(f"control socket {path}: {'; '.join(problems)}")
    return info.st_ino


def _peer_credentials(writer: asyncio.StreamWriter) -> str:
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return "?"
    pid, uid, gid = struct.unpack("3i", creds)
    return f"uid={uid} gid={gid} pid={pid}"


# ----- client ------------------------------------------------------------------------


class ControlClient:
    """Blocking client for the CLI: one connection per request."""

    def __init__(self, path: Path = DEFAULT_CONTROL_SOCKET, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout

    def request(self, command: str, **args: Any) -> Any:
        """The request's result; raises ControlUnavailable or ControlRequestFailed."""
        message = {"command": command, "args": {k: v for k, v in args.items() if v is not None}}
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.path))
                sock.sendall(_encode(message))
                with sock.makefile("rb") as answers:
                    line = answers.readline()
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlUnavailable(
                f"no gateway is listening on {self.path} (is seng-fw.service running?)"
            ) from None
        except PermissionError:
            raise ControlPermissionDenied(
                f"permission denied on {self.path}: run as root or as a member of its group"
            ) from None
        except TimeoutError:
            raise ControlUnavailable(
                f"the gateway did not answer within {self.timeout:g}s"
            ) from None
        except OSError as exc:
            raise ControlUnavailable(f"{self.path}: {exc}") from None
        if not line:
            raise ControlUnavailable(f"the gateway closed {self.path} without answering")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise ControlRequestFailed(str(answer.get("error", "unknown error")))
        return answer.get("result")
