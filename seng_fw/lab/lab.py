"""The namespace lab (DESIGN.md section 5): topology, lab CA, gateway and emulated enclaves.

`Lab` is shared by `seng-fw lab up/demo/down` and the integration tests, so what the
tests exercise is what an administrator runs. Every process is started with this
interpreter (`python -m seng_fw`) inside its namespace; everything lives under
`state_dir`, and `down()` removes all of it, also after a crash (by name prefix).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import yaml

from seng_fw.lab import dcap
from seng_fw.lab.ca import ROOT_CERT_FILE, EnclaveCert, LabCA
from seng_fw.lab.topology import (
    CLIENT_A,
    CLIENT_B,
    EXTERNAL,
    GATEWAY,
    LAB_PREFIX,
    Topology,
    lab_topology,
)
from seng_fw.ops.servercert import generate_server_certificate
from seng_fw.system.netns import cleanup

REPO_POLICIES = Path(__file__).resolve().parents[2] / "policies"
DEMO_POLICY = REPO_POLICIES / "lab" / "demo.yaml"
SHARED_DEMO_POLICY = REPO_POLICIES / "lab" / "demo-shared.yaml"
DEFAULT_PREFIX = LAB_PREFIX
DEFAULT_STATE_ROOT = Path("/run/seng-fw-lab")
GATEWAY_PORT = 12345
DCAP_COLLATERAL_FILE = "dcap-collateral.json"
ECHO_PORT = 7
START_TIMEOUT = 20.0

# Identities of the demo apps (see policies/lab/demo.yaml).
DEMO_SIGNER = bytes.fromhex("cca10cf28996a5eb229670e348fae1c738b116fb396593156ef0af019252bfde")
DEMO_WEBAPP = bytes.fromhex("bfcb952ccc697d9fd928a0bfa1aea2c15ce85d41c0873968c8aae66695510de6")
DEMO_NGINX = bytes.fromhex("12c74a7260c0236c2f8d618680a2f1cdd16010f3951b7c21d87217e877343089")
DEMO_DB = bytes.fromhex("4617f3f7372856c6d428a061e6cb0591f920bf84da93000300b717c8b313d494")
DEMO_UNKNOWN = bytes.fromhex("261ea6c6ef138b2d19ea0c0ddc7c5267077684f4787a83a9e8f6750f52ef4645")


class LabError(RuntimeError):
    """The lab could not be brought up; everything it created has been removed."""


@dataclass(frozen=True)
class EnclaveSpec:
    """An emulated enclave: where it runs and what its attestation evidence claims."""

    name: str
    host: str  # CLIENT_A or CLIENT_B
    mrenclave: bytes
    mrsigner: bytes = DEMO_SIGNER
    debug: bool = False
    isv_svn: int = 0
    key_type: str = "ecdsa"
    untrusted_ca: bool = False  # evidence signed by a CA the gateway does not trust
    evidence: str = "epid"  # or "dcap": a quote v3 from a lab platform
    tcb_status: str = "UpToDate"  # dcap: the lab platform's TCB level
    layout: str = "sgx-ra-tls"  # dcap: or "gramine"


@dataclass
class RunningEnclave:
    spec: EnclaveSpec
    process: subprocess.Popen[bytes]
    state_file: Path
    log_file: Path
    state: dict[str, Any] = field(default_factory=dict)

    def read_state(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            self.state = json.loads(self.state_file.read_text())
        return self.state

    def wait_settled(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """Wait until the enclave is up or has given up; returns its state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.read_state()
            if state.get("status") in ("up", "refused", "down"):
                return state
            if self.process.poll() is not None:
                self.read_state()
                return self.state or {"status": "refused", "reason": "emulator exited"}
            time.sleep(0.05)
        return {"status": "timeout", **self.state}

    @property
    def address(self) -> IPv4Address | None:
        address = self.state.get("address")
        return IPv4Address(address) if address else None


class Lab:
    def __init__(
        self,
        prefix: str = DEFAULT_PREFIX,
        state_dir: Path | None = None,
        policy: Path = DEMO_POLICY,
        gateway_settings: dict[str, Any] | None = None,
    ) -> None:
        self.prefix = prefix
        self.state_dir = state_dir or DEFAULT_STATE_ROOT / prefix.rstrip("-")
        self.policy = policy
        self.gateway_settings = gateway_settings or {}
        self.topology: Topology = lab_topology(prefix)
        self.gateway: subprocess.Popen[bytes] | None = None
        self.enclaves: list[RunningEnclave] = []
        self._services: subprocess.Popen[bytes] | None = None
        self._echoes: list[subprocess.Popen[bytes]] = []
        self._ca: LabCA | None = None
        self._rogue_ca: LabCA | None = None
        self._dcap_ca: dcap.LabDcapCA | None = None

    # ----- addresses -----------------------------------------------------------------

    @property
    def gateway_lan(self) -> IPv4Address:
        return self.topology.address(GATEWAY, "lan")

    @property
    def external(self) -> IPv4Address:
        return self.topology.address(EXTERNAL, "ext")

    @property
    def gateway_log(self) -> Path:
        return self.state_dir / "gateway.log"

    def ns(self, host: str) -> str:
        return self.topology.ns(host)

    # ----- life cycle ----------------------------------------------------------------

    def up(self) -> None:
        """Topology, CA, certificates, configuration, gateway, echo services."""
        try:
            self.down()
            self.state_dir.mkdir(parents=True)
            self.topology.up(replace=True)
            self._write_credentials()
            self.write_gateway_config()
            self.apply_policy()  # rules first: enclave subnets are never reachable without
            self.start_gateway()
            self.start_services()
        except BaseException as exc:
            self.down()
            if isinstance(exc, Exception):
                raise LabError(f"lab up failed: {exc}") from exc
            raise

    def down(self) -> None:
        """Stop every process and remove namespaces and state (idempotent)."""
        for enclave in self.enclaves:
            _terminate(enclave.process)
        self.enclaves.clear()
        for process in (*self._echoes, self._services, self.gateway):
            if process is not None:
                _terminate(process)
        self._services = self.gateway = None
        self._echoes.clear()
        cleanup(self.prefix)  # also ends processes still inside the namespaces
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def _write_credentials(self) -> None:
        self._ca = LabCA.create(self.state_dir / "ca")
        self._rogue_ca = LabCA.create(self.state_dir / "untrusted-ca")
        self._dcap_ca = dcap.LabDcapCA.create(self.state_dir / "ca")
        self.write_dcap_collateral()
        cert, key = generate_server_certificate("seng-fw lab gateway")
        (self.state_dir / "server.pem").write_bytes(cert)
        _write_private(self.state_dir / "server.key", key)

    def write_gateway_config(self, **overrides: Any) -> Path:
        config: dict[str, Any] = {
            "listen": {"address": str(self.gateway_lan), "port": GATEWAY_PORT},
            "tls": {"certificate": "server.pem", "key": "server.key"},
            "attestation": {
                "roots": [f"ca/{ROOT_CERT_FILE}"],
                # DCAP admits UpToDate platforms only (the default allow_status).
                "dcap": {
                    "roots": [f"ca/{dcap.ROOT_CERT_FILE}"],
                    "collateral": [DCAP_COLLATERAL_FILE],
                },
            },
            "policy": str(self.policy),
            "control": {"socket": "control.sock"},  # state dir: labs do not share /run
            "state": {"revocations": "revocations.json"},
            **self.gateway_settings,
            **overrides,
        }
        path = self.state_dir / "gateway.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def write_dcap_collateral(self) -> Path:
        """The lab DCAP CA's collateral bundle (fresh CRLs and revocations) for the gateway."""
        ca = self._dcap_ca or dcap.LabDcapCA.load(self.state_dir / "ca")
        path = self.state_dir / DCAP_COLLATERAL_FILE
        path.write_text(ca.collateral_json())
        return path

    def seng_fw(self, host: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `seng-fw ARGS` inside `host` (same interpreter); never raises on failure."""
        argv = ["ip", "netns", "exec", self.ns(host), sys.executable, "-m", "seng_fw", *args]
        return subprocess.run(argv, capture_output=True, text=True)

    def apply_policy(self, policy: Path | None = None) -> subprocess.CompletedProcess[str]:
        """`seng-fw apply` in the gateway (a running gateway then admits by that policy);
        raises LabError if the policy is refused. No gateway running yet (exit 3) is
        fine: it loads the policy when it starts."""
        result = self.seng_fw(
            GATEWAY, "apply", str(policy or self.policy),
            "--control-socket", str(self.state_dir / "control.sock"),
        )  # fmt: skip
        if result.returncode not in (0, 3):
            raise LabError(f"seng-fw apply failed:\n{result.stdout}{result.stderr}")
        return result

    def start_gateway(self) -> None:
        """Start the gateway and wait until it listens (a restart too: only what this
        start logs counts)."""
        start = self.gateway_log.stat().st_size if self.gateway_log.exists() else 0
        with self.gateway_log.open("ab") as log:  # the child keeps its own descriptor
            self.gateway = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(GATEWAY), sys.executable, "-m", "seng_fw",
                 "serve", "--config", str(self.state_dir / "gateway.yaml")],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while b"listening on" not in self.gateway_log.read_bytes()[start:]:  # ready
            if self.gateway.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"gateway did not start:\n{self.gateway_log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop_gateway(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the gateway and wait for it; returns its exit status."""
        assert self.gateway is not None
        self.gateway.send_signal(signum)
        try:
            return self.gateway.wait(timeout)
        finally:
            self.gateway = None if self.gateway.poll() is not None else self.gateway

    def reload_gateway(self) -> None:
        assert self.gateway is not None
        self.gateway.send_signal(signal.SIGHUP)

    def start_services(self) -> None:
        self._services = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(EXTERNAL), sys.executable, "-m",
             "seng_fw.lab.services", "--bind", str(self.external),
             "--tcp", str(ECHO_PORT), "--udp", str(ECHO_PORT)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def start_echo(self, enclave: RunningEnclave, port: int = ECHO_PORT) -> None:
        """TCP and UDP echo at an enclave's address, on its client host (for flows that
        end at an enclave); returns once it accepts connections."""
        assert enclave.address is not None
        ns, address = self.ns(enclave.spec.host), str(enclave.address)
        process = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "seng_fw.lab.services",
             "--bind", address, "--tcp", str(port), "--udp", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._echoes.append(process)
        deadline = time.monotonic() + START_TIMEOUT
        while not _listening(ns, address, port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"echo service on {address}:{port} did not start")
            time.sleep(0.05)

    def enclave_credentials(self, spec: EnclaveSpec) -> tuple[Path, Path]:
        issued: EnclaveCert | dcap.DcapEnclaveCert
        if spec.evidence == "dcap":
            if spec.untrusted_ca:
                dcap_ca = dcap.LabDcapCA.generate()  # a platform of some other PKI
            else:
                dcap_ca = self._dcap_ca or dcap.LabDcapCA.load(self.state_dir / "ca")
            issued = dcap_ca.issue_enclave_cert(
                mrenclave=spec.mrenclave,
                mrsigner=spec.mrsigner,
                tcb_status=spec.tcb_status,
                layout=spec.layout,
                debug=spec.debug,
                isv_svn=spec.isv_svn,
                key_type=spec.key_type,  # type: ignore[arg-type]
            )
        else:
            ca = self._rogue_ca if spec.untrusted_ca else self._ca
            if ca is None:
                ca = LabCA.load(self.state_dir / ("untrusted-ca" if spec.untrusted_ca else "ca"))
            issued = ca.issue_enclave_cert(
                mrenclave=spec.mrenclave,
                mrsigner=spec.mrsigner,
                debug=spec.debug,
                isv_svn=spec.isv_svn,
                key_type=spec.key_type,  # type: ignore[arg-type]
            )
        directory = self.state_dir / "enclaves" / spec.name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cert.pem").write_bytes(issued.cert_pem)
        _write_private(directory / "key.pem", issued.key_pem)
        return directory / "cert.pem", directory / "key.pem"

    def start_enclave(
        self, spec: EnclaveSpec, tun: str | None = None, extra_args: Sequence[str] = ()
    ) -> RunningEnclave:
        """`seng-fw lab enclave` on the spec's host; `extra_args` e.g. ("--reconnect",)."""
        cert, key = self.enclave_credentials(spec)
        directory = cert.parent
        state_file, log_file = directory / "state.json", directory / "enclave.log"
        state_file.unlink(missing_ok=True)
        tun_name = tun or f"se{len(self.enclaves)}"
        with log_file.open("ab") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(spec.host), sys.executable, "-m", "seng_fw",
                 "lab", "enclave", "--server", f"{self.gateway_lan}:{GATEWAY_PORT}",
                 "--server-cert", str(self.state_dir / "server.pem"),
                 "--cert", str(cert), "--key", str(key), "--tun", tun_name,
                 "--state-file", str(state_file), *extra_args],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        enclave = RunningEnclave(spec, process, state_file, log_file)
        self.enclaves.append(enclave)
        return enclave

    def stop_enclave(self, enclave: RunningEnclave) -> None:
        _terminate(enclave.process)
        if enclave in self.enclaves:
            self.enclaves.remove(enclave)

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str] | None:
        """First match of regular expression `pattern` in the gateway log, waiting for it."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = compiled.search(self.gateway_log.read_text(errors="replace"))
            if match or time.monotonic() > deadline:
                return match
            time.sleep(0.05)

    def rejection_reason(self, enclave: RunningEnclave) -> str | None:
        """The gateway's log line that refused this enclave's tunnel #1, if any."""
        local = enclave.state.get("local")
        if not local:
            return None
        pattern = re.compile(rf"rejected host={re.escape(local[0])} port={local[1]}: (.*)")
        for line in self.gateway_log.read_text(errors="replace").splitlines():
            if match := pattern.search(line):
                return match.group(1)
        return None

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _listening(ns: str, address: str, port: int) -> bool:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "ss", "-Htln", f"src {address}:{port}"],
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    return bool(out.strip())


def _terminate(process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


DEMO_ENCLAVES = (
    EnclaveSpec("webapp@clienta", CLIENT_A, DEMO_WEBAPP),
    EnclaveSpec("webapp@clientb", CLIENT_B, DEMO_WEBAPP),
    EnclaveSpec("nginx@clientb", CLIENT_B, DEMO_NGINX, key_type="rsa"),
    EnclaveSpec("nginx@clienta", CLIENT_A, DEMO_NGINX),
    EnclaveSpec("webapp-debug@clienta", CLIENT_A, DEMO_WEBAPP, debug=True),
    EnclaveSpec("unknown@clienta", CLIENT_A, DEMO_UNKNOWN),
    EnclaveSpec("webapp-fakeca@clientb", CLIENT_B, DEMO_WEBAPP, untrusted_ca=True),
    # DCAP (quote v3, lab PCK platforms): one up to date, one whose TCB is out of date.
    EnclaveSpec("webapp-dcap@clienta", CLIENT_A, DEMO_WEBAPP, evidence="dcap"),
    EnclaveSpec(
        "webapp-dcap-ood@clientb", CLIENT_B, DEMO_WEBAPP, evidence="dcap", tcb_status="OutOfDate"
    ),
)

# `seng-fw lab demo --shared` (policies/lab/demo-shared.yaml): one shared subnet.
SHARED_DEMO_ENCLAVES = (
    EnclaveSpec("webapp@clienta", CLIENT_A, DEMO_WEBAPP),
    EnclaveSpec("webapp@clientb", CLIENT_B, DEMO_WEBAPP),
    EnclaveSpec("nginx@clienta", CLIENT_A, DEMO_NGINX, key_type="rsa"),
    EnclaveSpec("nginx@clientb", CLIENT_B, DEMO_NGINX),
    EnclaveSpec("db@clienta", CLIENT_A, DEMO_DB),
    EnclaveSpec("db@clientb", CLIENT_B, DEMO_DB),
    EnclaveSpec("unknown@clientb", CLIENT_B, DEMO_UNKNOWN),
)
