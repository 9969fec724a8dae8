"""GatewayService (status, enclaves, revoke, reload over a GatewayCore) and the
control socket's server and client."""

from __future__ import annotations

import asyncio
import functools
import grp
import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from seng_fw.gateway.config import ControlConfig
from seng_fw.gateway.counters import Drop, EndKind, Revoked, Traffic
from seng_fw.gateway.service import REVOKED_CHECK, ControlError, FirewallState
from seng_fw.ops.control import (
    ControlClient,
    ControlRequestFailed,
    ControlServer,
    ControlUnavailable,
)
from seng_fw.policy.admission import AdmissionCheck
from seng_fw.policy.digest import policy_digest
from seng_fw.policy.models import Policy
from tests.support.gateway_service import (
    NGINX,
    POLICY,
    WEBAPP,
    Gateway,
)


@pytest.fixture
def gateway(tmp_path: Path) -> Gateway:
    return Gateway(tmp_path)


# ----- status and enclaves -------------------------------------------------------------


def test_status_counts_enclaves_traffic_and_rejections(gateway: Gateway) -> None:
    web = gateway.add("webapp", WEBAPP)
    web.traffic = Traffic(packets_in=3, bytes_in=300, packets_out=2, bytes_out=200)
    gateway.add("webapp", WEBAPP, host="10.0.0.20", nonce=1).traffic.dropped_spoofed = 4
    # Ended enclaves' traffic, as GatewayCore keeps it per app.
    counters = gateway.core.counters
    counters.ended_traffic["webapp"] = Traffic(bytes_in=1000, packets_in=10)
    counters.rejected[AdmissionCheck.UNKNOWN_MRENCLAVE] = 2
    counters.dropped[Drop.NO_ENCLAVE] = 5
    counters.ended[EndKind.IDLE_TIMEOUT] = 1
    counters.admitted = 3
    gateway.clock.now += 90
    status = asyncio.run(gateway.control.status())
    assert status["listen"] == ["10.0.0.1:12345", "10.0.0.1:12346"]
    assert status["mode"] == "per_app" and status["tun"] == {"name": "tunFA", "mtu": 1432}
    assert status["uptime_seconds"] == 90
    assert status["enclaves"] == 2 and status["admitted"] == 3
    apps = {app["name"]: app for app in status["apps"]}
    assert apps["webapp"]["enclaves"] == 2
    assert apps["webapp"]["subnet"] == "192.168.29.0/24"
    assert (apps["webapp"]["packets_in"], apps["webapp"]["bytes_in"]) == (13, 1300)
    assert apps["webapp"]["dropped_spoofed"] == 4
    assert apps["nginx"]["enclaves"] == 0 and apps["nginx"]["bytes_out"] == 0
    assert status["rejected"] == {"unknown_mrenclave": 2}
    assert status["dropped"] == {"no_enclave": 5}
    assert status["ended"] == {"idle_timeout": 1}
    assert status["policy"]["digest"] == policy_digest(gateway.policy)
    assert status["policy"]["applied_at"] == "2027-01-15T08:00:00Z"
    json.dumps(status)  # what the socket sends


def test_status_shows_firewall_counters_and_survives_their_failure(gateway: Gateway) -> None:
    gateway.control.read_firewall = lambda: FirewallState(
        {"tx_webapp": (5, 500), "rx_webapp": (6, 600)}, read=True
    )
    apps = {a["name"]: a for a in asyncio.run(gateway.control.status())["apps"]}
    assert apps["webapp"]["firewall_tx"] == {"packets": 5, "bytes": 500}
    assert apps["nginx"]["firewall_rx"] is None

    def broken() -> FirewallState:
        raise OSError("no libnftables")

    gateway.control.read_firewall = broken
    assert asyncio.run(gateway.control.status())["apps"][0]["firewall_tx"] is None


def test_status_warns_when_ruleset_and_admission_policy_differ(gateway: Gateway) -> None:
    digest = policy_digest(gateway.policy)
    gateway.control.read_firewall = lambda: FirewallState(policy_digest=digest, read=True)
    status = asyncio.run(gateway.control.status())
    assert status["policy"]["ruleset_digest"] == status["policy"]["digest"] == digest
    assert status["warnings"] == []
    gateway.control.read_firewall = lambda: FirewallState(policy_digest="ee" * 32, read=True)
    status = asyncio.run(gateway.control.status())
    assert status["policy"]["ruleset_digest"] == "ee" * 32
    [warning] = status["warnings"]
    assert "another policy" in warning and "eeeeeeee" in warning
    gateway.control.read_firewall = lambda: FirewallState(read=True)  # not stamped
    assert "no policy digest" in asyncio.run(gateway.control.status())["warnings"][0]


def test_enclaves_lists_every_tunnel(gateway: Gateway) -> None:
    gateway.add("nginx", NGINX)
    web = gateway.add("webapp", WEBAPP, host="10.0.0.20")
    web.traffic = Traffic(bytes_in=10, bytes_out=20)
    gateway.clock.now += 5
    records = gateway.control.enclaves()
    assert [(r["app"], r["address"], r["host"]) for r in records] == [
        ("nginx", "192.168.30.2", "10.0.0.10"),
        ("webapp", "192.168.29.2", "10.0.0.20"),
    ]
    assert records[1]["mrenclave"] == WEBAPP.hex()
    assert (records[1]["bytes_in"], records[1]["bytes_out"]) == (10, 20)
    assert records[1]["seconds"] == 5 and records[1]["since"] == "2027-01-15T07:59:55Z"
    assert records[1]["paired"] is True
    assert records[1]["evidence"] == "epid" and records[1]["quote_status"] == "OK"
    assert records[1]["tcb_status"] is None and records[1]["advisory_ids"] == []


# ----- revoke --------------------------------------------------------------------------


def test_revoke_app_closes_its_tunnels_and_refuses_it(gateway: Gateway) -> None:
    gateway.add("webapp", WEBAPP)
    gateway.add("webapp", WEBAPP, host="10.0.0.20", nonce=1)
    nginx = gateway.add("nginx", NGINX)
    result = asyncio.run(gateway.control.revoke(app="webapp"))
    assert result["revoked"] == "app webapp"
    assert sorted(e["host"] for e in result["ended"]) == ["10.0.0.10", "10.0.0.20"]
    assert gateway.core.enclaves == [nginx]
    assert gateway.core.counters.ended[Revoked(REVOKED_CHECK)] == 2
    assert gateway.changes == 1  # the adapter sends close_notify and flushes conntrack
    assert gateway.admit(WEBAPP) == REVOKED_CHECK
    assert gateway.admit(NGINX) == "nginx"
    revocations = asyncio.run(gateway.control.status())["revocations"]
    assert [(r["kind"], r["target"]) for r in revocations] == [("app", "webapp")]
    # A policy reload keeps the revocation; --clear lifts it.
    asyncio.run(gateway.control.reload())
    assert gateway.admit(WEBAPP) == REVOKED_CHECK
    assert asyncio.run(gateway.control.revoke(clear=True)) == {
        "cleared": 1,
        "ended": [],
        "saved": False,
    }
    assert gateway.admit(WEBAPP) == "webapp"


def test_revoke_one_enclave_by_address(gateway: Gateway) -> None:
    first = gateway.add("webapp", WEBAPP)
    second = gateway.add("webapp", WEBAPP, host="10.0.0.20", nonce=1)
    result = asyncio.run(gateway.control.revoke(address=str(first.address)))
    assert [e["address"] for e in result["ended"]] == [str(first.address)]
    assert gateway.core.enclaves == [second]
    # That enclave's evidence is refused; the same build elsewhere, or restarted, is not.
    assert gateway.admit(WEBAPP, "10.0.0.10", nonce=0) == REVOKED_CHECK
    assert gateway.admit(WEBAPP, "10.0.0.10", nonce=7) == "webapp"


def test_revoke_mrenclave(gateway: Gateway) -> None:
    gateway.add("webapp", WEBAPP)
    result = asyncio.run(gateway.control.revoke(mrenclave="0x" + WEBAPP.hex().upper()))
    assert len(result["ended"]) == 1
    assert gateway.admit(WEBAPP) == REVOKED_CHECK


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ({}, "exactly one"),
        ({"app": "webapp", "mrenclave": WEBAPP.hex()}, "exactly one"),
        ({"app": "webapp", "clear": True}, "exactly one"),
        ({"app": "ghost"}, "no app 'ghost'"),
        ({"mrenclave": "abcd"}, "64 hex digits"),
        ({"address": "192.168.29.77"}, "no enclave has address"),
        ({"address": "nonsense"}, "not an IPv4 address"),
    ],
)
def test_revoke_refuses_bad_requests(gateway: Gateway, args: dict[str, Any], words: str) -> None:
    gateway.add("webapp", WEBAPP)
    with pytest.raises(ControlError, match=words):
        asyncio.run(gateway.control.revoke(**args))
    assert len(gateway.core.enclaves) == 1


# ----- reload --------------------------------------------------------------------------


def test_reload_applies_the_new_policy(gateway: Gateway) -> None:
    gateway.add("webapp", WEBAPP)
    gateway.add("nginx", NGINX)
    old_digest = gateway.control.policy_digest()
    gateway.clock.now += 60
    gateway.policy = Policy.model_validate({"apps": [POLICY["apps"][1]]})
    result = asyncio.run(gateway.control.reload())
    assert (result["apps"], result["enclaves"], result["closed"]) == (1, 1, 1)
    assert result["digest"] != old_digest == policy_digest(Policy.model_validate(POLICY))
    assert gateway.admit(WEBAPP) == "unknown_mrenclave"
    assert gateway.changes == 1


def test_a_failed_reload_keeps_the_running_policy(gateway: Gateway) -> None:
    gateway.add("webapp", WEBAPP)

    def broken(path: Path) -> Policy:
        raise ValueError("policy.yaml:3: apps[0].name: bad")

    gateway.control.load_policy = broken
    with pytest.raises(ControlError, match="running one is kept"):
        asyncio.run(gateway.control.reload())
    assert len(gateway.core.enclaves) == 1 and gateway.admit(WEBAPP) == "webapp"
    assert gateway.changes == 0


def test_revocations_survive_a_reload_by_sighup_path(gateway: Gateway) -> None:
    """The adapter's SIGHUP reload goes through load_and_apply_policy too."""
    asyncio.run(gateway.control.revoke(app="nginx"))
    asyncio.run(gateway.control.load_and_apply_policy())
    assert gateway.admit(NGINX) == REVOKED_CHECK


def test_a_reload_loads_the_policy_off_the_event_loop(gateway: Gateway) -> None:
    """Loading a large policy takes seconds: the event loop (tunnels, watchdog) must keep
    running meanwhile, and two reloads must not interleave."""
    loading: list[str] = []

    def slow_load(path: Path) -> Policy:
        loading.append("start")
        time.sleep(0.3)  # stands for parsing and checking 10,000 apps
        loading.append("end")
        return gateway.policy

    gateway.control.load_policy = slow_load

    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await asyncio.gather(gateway.control.reload(), gateway.control.reload())
        task.cancel()
        return ticks

    assert asyncio.run(main()) >= 20  # the loop ran on during both loads (0.6 s)
    assert loading == ["start", "end", "start", "end"]  # one reload at a time


# ----- the socket ----------------------------------------------------------------------


@pytest.fixture
def socket_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "run"
    directory.mkdir(mode=0o750)
    return directory


def serve(handler: Any, server: ControlServer, *requests: tuple[str, dict[str, Any]]) -> list[Any]:
    """Start `server`, send each request from a blocking client in a thread, stop."""

    async def main() -> list[Any]:
        await server.start()
        try:
            loop = asyncio.get_running_loop()
            client = ControlClient(server.path, timeout=5)
            answers = []
            for command, args in requests:
                try:
                    call = functools.partial(client.request, command, **args)
                    result = await loop.run_in_executor(None, call)
                except ControlRequestFailed as exc:
                    result = exc
                answers.append(result)
            return answers
        finally:
            await server.close()

    return asyncio.run(main())


def test_client_and_server_talk_json_lines(gateway: Gateway, socket_dir: Path) -> None:
    gateway.add("webapp", WEBAPP)
    server = ControlServer(gateway.control, socket_dir / "control.sock")
    status, enclaves, revoked, bad = serve(
        gateway.control, server,
        ("status", {}), ("enclaves", {}), ("revoke", {"app": "webapp"}), ("revoke", {"app": "x"}),
    )  # fmt: skip
    assert status["enclaves"] == 1
    assert enclaves[0]["app"] == "webapp"
    assert len(revoked["ended"]) == 1
    assert isinstance(bad, ControlRequestFailed) and "no app 'x'" in str(bad)
    assert not (socket_dir / "control.sock").exists()  # removed on close


def test_reload_requests_are_checked(gateway: Gateway, socket_dir: Path) -> None:
    server = ControlServer(gateway.control, socket_dir / "control.sock")
    answers = serve(
        gateway.control, server,
        ("reload", {"policy": "relative.yaml", "digest": "ab" * 32}),
        ("reload", {"policy": "/x.yaml", "digest": "short"}),
        ("reload", {"policy": "/x.yaml", "extra": 1}),
        ("reload", {"policy": 5}),
        ("reload", {}),
    )  # fmt: skip
    relative, short, extra, number, plain = answers
    assert "must be absolute" in str(relative)
    assert "64 hex digits" in str(short)
    assert "unknown arguments ['extra']" in str(extra)
    assert "are strings" in str(number)
    assert plain["digest"] == policy_digest(gateway.policy)


def test_socket_gets_exactly_the_configured_mode_and_group(
    gateway: Gateway, socket_dir: Path
) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    config = ControlConfig(socket=socket_dir / "c.sock", mode=0o620, group=group)
    server = ControlServer.from_config(gateway.control, config)
    seen: list[os.stat_result] = []

    async def main() -> None:
        await server.start()
        seen.append(os.stat(server.path))
        await server.close()

    asyncio.run(main())
    assert stat.S_ISSOCK(seen[0].st_mode)
    assert stat.S_IMODE(seen[0].st_mode) == 0o620
    assert seen[0].st_gid == os.getgid()
    assert sorted(p.name for p in socket_dir.iterdir()) == []  # no temporary left


def test_start_refuses_unsafe_or_busy_places(gateway: Gateway, socket_dir: Path) -> None:
    def start(path: Path, group: str | None = None) -> str:
        server = ControlServer(gateway.control, path, group=group)
        with pytest.raises(ControlError) as caught:
            asyncio.run(server.start())
        return str(caught.value)

    shared = socket_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert "writable by group or others" in start(shared / "c.sock")
    assert "does not exist" in start(socket_dir / "c.sock", group="no-such-group-xyz")
    (socket_dir / "file").write_text("")
    assert "not a socket" in start(socket_dir / "file")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as busy:
        busy.bind(str(socket_dir / "busy.sock"))
        busy.listen()
        assert "another gateway is listening" in start(socket_dir / "busy.sock")


def test_a_stale_socket_is_replaced(gateway: Gateway, socket_dir: Path) -> None:
    path = socket_dir / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, never listening: what a killed gateway leaves
    (status,) = serve(gateway.control, ControlServer(gateway.control, path), ("status", {}))
    assert status["enclaves"] == 0


def test_missing_directory_is_created_private(gateway: Gateway, tmp_path: Path) -> None:
    path = tmp_path / "new" / "control.sock"
    serve(gateway.control, ControlServer(gateway.control, path), ("status", {}))
    assert stat.S_IMODE(os.stat(path.parent).st_mode) & 0o027 == 0


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (b"not json\n", "not a JSON request"),
        (b"[1, 2]\n", "a request is a JSON object"),
        (b'{"command": "launch"}\n', "unknown command 'launch'"),
        (b'{"command": "revoke", "args": {"app": 3}}\n', "are strings"),
        (b'{"command": "revoke", "args": {"force": true}}\n', "unknown arguments"),
        (b'{"command": "status", "args": []}\n', "args must be"),
    ],
)
def test_bad_requests_get_an_error_answer(gateway: Gateway, line: bytes, words: str) -> None:
    answer = asyncio.run(ControlServer(gateway.control, Path("/unused")).respond(line))
    assert answer["ok"] is False and words in answer["error"]


def test_an_internal_error_is_an_answer_not_a_crash(gateway: Gateway) -> None:
    class Broken:
        def status(self) -> dict[str, Any]:
            raise RuntimeError("boom")

    answer = asyncio.run(ControlServer(Broken(), Path("/unused")).respond(b'{"command": "status"}'))  # type: ignore[arg-type]
    assert answer == {"ok": False, "error": "internal error: RuntimeError: boom"}


def test_oversized_request_is_refused(gateway: Gateway, socket_dir: Path) -> None:
    server = ControlServer(gateway.control, socket_dir / "c.sock")

    async def main() -> bytes:
        await server.start()
        try:
            reader, writer = await asyncio.open_unix_connection(str(server.path))
            writer.write(b"x" * 200_000 + b"\n")
            answer = await reader.readline()
            writer.close()
            return answer
        finally:
            await server.close()

    assert json.loads(asyncio.run(main())) == {"ok": False, "error": "request too long"}


def test_client_without_gateway(tmp_path: Path) -> None:
    with pytest.raises(ControlUnavailable, match="no gateway is listening"):
        ControlClient(tmp_path / "none.sock").request("status")
