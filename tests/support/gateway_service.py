"""A `GatewayService` over a `GatewayCore` whose enclaves are put in place directly (no
DTLS): for tests of status, revocations, reloads, metrics and the control socket.

    gateway = Gateway(tmp_path)              # service: gateway.control
    gateway.add("webapp", WEBAPP)            # an admitted, paired enclave
    gateway.admit(WEBAPP)                    # what admission says now ("webapp" or a check)
    with RunningGateway(tmp_path) as running: ...   # the same behind a real control socket

(`tests/support/gateway_memory.py` drives the core itself with real DTLS clients.)
"""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from seng_fw.attest.identity import EnclaveIdentity
from seng_fw.gateway.config import GatewayConfig
from seng_fw.gateway.core import Enclave, GatewayCore
from seng_fw.gateway.service import GatewayService
from seng_fw.ops.control import ControlServer
from seng_fw.policy.admission import Admission, AdmissionRejected
from seng_fw.policy.models import Policy

WEBAPP, NGINX, OTHER = bytes([1]) * 32, bytes([2]) * 32, bytes([3]) * 32
SIGNER = bytes([9]) * 32
POLICY = {
    "apps": [
        {"name": "webapp", "mrenclave": WEBAPP.hex(), "hosts": ["10.0.0.0/24"],
         "subnet": {"subnet": "192.168.29.0/24"}},
        {"name": "nginx", "mrenclave": NGINX.hex(), "hosts": ["10.0.0.0/24"],
         "subnet": {"subnet": "192.168.30.0/24"}},
    ]
}  # fmt: skip


class FakeSession:
    """What GatewayCore touches of a DTLS session when it ends an enclave."""

    closed = False

    def close(self) -> None:
        self.closed = True

    def datagrams_to_send(self) -> list[bytes]:
        return []


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def identity(mrenclave: bytes, nonce: int = 0) -> EnclaveIdentity:
    return EnclaveIdentity(
        mrenclave=mrenclave, mrsigner=SIGNER, isv_prod_id=0, isv_svn=0, debug=False,
        quote_status="OK", timestamp=datetime(2026, 1, 1, tzinfo=UTC),
        report_data=nonce.to_bytes(64, "big"),
    )  # fmt: skip


def config(tmp_path: Path) -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "listen": {"address": "10.0.0.1", "port": 12345},
            "tls": {"certificate": "s.pem", "key": "s.key"},
            "attestation": {"roots": ["r.pem"]},
            "policy": str(tmp_path / "policy.yaml"),
            "control": {"socket": str(tmp_path / "ctl" / "control.sock")},
        }
    )


class Gateway:
    """A GatewayCore with enclaves put in place directly (no DTLS), and its control."""

    def __init__(self, tmp_path: Path, policy: dict[str, Any] = POLICY, store: Any = None) -> None:
        self.policy = Policy.model_validate(policy)
        self.clock = Clock()
        self.core = GatewayCore(Admission(self.policy), None, {}, config(tmp_path).timeouts)  # type: ignore[arg-type]
        self.changes = 0
        self.control = GatewayService(
            self.core, config(tmp_path), load_policy=lambda path: self.policy,
            after_change=self.changed, clock=self.clock, wall_clock=lambda: 1_800_000_000.0,
            store=store,
        )  # fmt: skip

    def changed(self) -> None:
        self.changes += 1

    def add(self, app: str, mrenclave: bytes, host: str = "10.0.0.10", nonce: int = 0) -> Enclave:
        policy_app = self.policy.app(app)
        address = self.core.ipam.lease(self.policy.subnet_of(policy_app).subnet, app)
        now = self.clock()
        enclave = Enclave(
            identity=identity(mrenclave, nonce), app=policy_app, host=IPv4Address(host),
            address=address, uplink_peer=(host, 40000 + nonce), uplink=FakeSession(),  # type: ignore[arg-type]
            setup=None, pairing_deadline=now + 30, admitted_at=now, last_activity=now,  # type: ignore[arg-type]
            downlink_peer=(host, 50000 + nonce), downlink=FakeSession(),  # type: ignore[arg-type]
        )  # fmt: skip
        self.core._enclave_by_address[address.packed] = enclave
        return enclave

    def admit(self, mrenclave: bytes, host: str = "10.0.0.10", nonce: int = 0) -> str:
        try:
            return self.core.admission.admit(identity(mrenclave, nonce), IPv4Address(host)).name
        except AdmissionRejected as refusal:
            return refusal.check


class RunningGateway:
    """A GatewayService behind a real control socket, on an event loop in a thread."""

    def __init__(self, tmp_path: Path) -> None:
        self.gateway = Gateway(tmp_path)
        self.socket = tmp_path / "run" / "control.sock"
        self.server = ControlServer(self.gateway.control, self.socket)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> RunningGateway:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
