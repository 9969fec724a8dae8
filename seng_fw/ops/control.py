"""The gateway's local control socket: `seng-fw status | enclaves | revoke | reload`.

Protocol: JSON lines over a Unix stream socket. A request is
``{"command": "status" | "enclaves" | "revoke" | "reload", "args": {...}}``, the answer
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "text"}``; a connection may
carry several requests. `reload` takes ``{"policy": ABSOLUTE_PATH, "digest": HEX}``
from `seng-fw apply` (load that policy, refuse it unless its digest matches), or
nothing (reload the running policy's file).

Access: connecting to a Unix socket needs write permission on it, so the socket's mode
and group decide who may talk to the gateway (root always may). The socket is set up
with the hardening of `seng_fw.system.ipc` (private directory, temporary name, mode and
group, rename, check).

This module is only the protocol: `seng_fw.gateway.service.GatewayService` answers the
requests from a running `GatewayCore`; the gateway process builds one and hands it to
`ControlServer` (and to `seng_fw.ops.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Protocol

from seng_fw.gateway.config import ControlConfig
from seng_fw.gateway.service import ControlError
from seng_fw.system import ipc
from seng_fw.system.ipc import DEFAULT_CONTROL_SOCKET

log = logging.getLogger("seng_fw.ops.control")

COMMANDS = ("status", "enclaves", "revoke", "revocations", "reload")
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

    async def status(self) -> dict[str, Any]: ...

    def enclaves(self) -> list[dict[str, Any]]: ...

    async def revoke(
        self,
        *,
        app: str | None = None,
        address: str | None = None,
        mrenclave: str | None = None,
        clear: bool = False,
        reason: str = "",
        by: str = "?",
    ) -> dict[str, Any]: ...

    def revocation_list(self) -> list[dict[str, Any]]: ...

    async def reload(
        self, policy: str | None = None, digest: str | None = None
    ) -> dict[str, Any]: ...


# ----- server ------------------------------------------------------------------------


class ControlServer:
    def __init__(
        self, handler: ControlHandler, path: Path, mode: int = 0o660, group: str | None = None
    ) -> None:
        self.handler = handler
        self.path = path
        self.mode = mode
        self.group = group
        self._listener = ipc.UnixListener(
            path, self._serve_client, mode=mode, group=group, limit=MAX_LINE,
            what="control socket", server_name="gateway",
        )  # fmt: skip
        self._writers: set[asyncio.StreamWriter] = set()

    @classmethod
    def from_config(cls, handler: ControlHandler, config: ControlConfig) -> ControlServer:
        return cls(handler, config.socket, config.mode, config.group)

    async def start(self) -> None:
        """Listen with the hardening of `seng_fw.system.ipc`. Raises ControlError."""
        try:
            await self._listener.start()
        except ipc.IpcError as exc:
            raise ControlError(str(exc)) from None
        log.info("control socket %s (mode %#o, group %s)", self.path, self.mode, self.group or "-")

    async def close(self) -> None:
        for writer in list(self._writers):
            writer.close()
        await self._listener.close()

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._writers.add(writer)
        peer = ipc.peer_credentials(writer)
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
                except TimeoutError:
                    break
                except ValueError:  # longer than MAX_LINE
                    writer.write(ipc.encode({"ok": False, "error": "request too long"}))
                    break
                if not line:
                    break
                writer.write(ipc.encode(await self.respond(line, peer)))
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
            return {"ok": True, "result": await self._dispatch(command, args, peer)}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except ValueError as exc:  # json.JSONDecodeError
            return {"ok": False, "error": f"not a JSON request: {exc}"}
        except RecursionError:  # found by fuzzing: "[[[[..." deeper than json can decode
            return {"ok": False, "error": "not a JSON request: nested too deeply"}
        except Exception as exc:
            log.exception("control: internal error")
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}

    async def _dispatch(self, command: object, args: dict[str, Any], peer: str = "?") -> Any:
        handler = self.handler
        if command == "status":  # reads the live ruleset in a worker thread
            return await handler.status()
        if command == "enclaves":
            return handler.enclaves()
        if command == "revoke":  # saves the revocations in a worker thread
            _known(command, args, {"app", "address", "mrenclave", "clear", "reason"})
            texts = {key: args.get(key) for key in ("app", "address", "mrenclave", "reason")}
            _strings(command, texts)
            return await handler.revoke(
                app=texts["app"],
                address=texts["address"],
                mrenclave=texts["mrenclave"],
                clear=args.get("clear") is True,
                reason=texts["reason"] or "",
                by=peer,
            )
        if command == "revocations":
            return handler.revocation_list()
        if command == "reload":  # the policy loads off the loop
            _known(command, args, {"policy", "digest"})
            texts = {key: args.get(key) for key in ("policy", "digest")}
            _strings(command, texts)
            return await handler.reload(policy=texts["policy"], digest=texts["digest"])
        raise ControlError(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")


def _known(command: str, args: dict[str, Any], known: set[str]) -> None:
    unknown = set(args) - known
    if unknown:
        raise ControlError(f"{command}: unknown arguments {sorted(unknown)}")


def _strings(command: str, values: dict[str, Any]) -> None:
    if any(value is not None and not isinstance(value, str) for value in values.values()):
        raise ControlError(f"{command}: {', '.join(values)} are strings")


# ----- client ------------------------------------------------------------------------


class ControlClient:
    """Blocking client for the CLI: one connection per request."""

    def __init__(self, path: Path = DEFAULT_CONTROL_SOCKET, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout

    def request(self, command: str, **args: Any) -> Any:
        """The request's result; raises ControlUnavailable or ControlRequestFailed."""
        return request(self.path, command, timeout=self.timeout, **args)


def request(path: Path, command: str, *, timeout: float = 30.0, **args: Any) -> Any:
    """One control request (blocking); raises ControlUnavailable, ControlRequestFailed."""
    message = {"command": command, "args": {k: v for k, v in args.items() if v is not None}}
    try:
        answer = ipc.request(path, message, timeout)
    except ipc.IpcPermissionDenied as exc:  # its own kind: a gateway may be running
        raise ControlPermissionDenied(str(exc)) from None
    except ipc.IpcUnavailable as exc:
        if str(exc).startswith("nothing is listening"):
            raise ControlUnavailable(
                f"no gateway is listening on {path} (is seng-fw.service running?)"
            ) from None
        raise ControlUnavailable(f"the gateway did not answer: {exc}") from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        error = answer.get("error", "unknown error") if isinstance(answer, dict) else answer
        raise ControlRequestFailed(str(error))
    return answer.get("result")
