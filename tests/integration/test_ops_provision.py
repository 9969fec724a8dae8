"""The Vagrant lab's provisioning scripts, run in the namespace lab.

vagrant/provision/{gateway,client,external}.sh are what the VMs run; here they run
with SENG_FW_SYSTEMD=0 inside the lab's namespaces, and the test does what the
units would (seng-fw-policy.service's `apply`, seng-fw.service's `serve`). Then the
walkthrough of vagrant/README.md: a refused flow, a policy edit and `apply`, the flow
passes; `seng-fw status`, and a revoked app's enclave leaves.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from seng_fw.lab.lab import DEMO_POLICY, DEMO_WEBAPP
from seng_fw.lab.services import probe_tcp
from seng_fw.lab.topology import CLIENT_A, EXTERNAL, GATEWAY, Topology
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
PROVISION = REPO / "vagrant" / "provision"
SENG_FW = f"{sys.executable} -m seng_fw"

pytestmark = pytest.mark.root


def provision(lab: Topology, host: str, script: str, **env: str) -> str:
    variables = [f"{key}={value}" for key, value in {"SENG_FW_SYSTEMD": "0", **env}.items()]
    result = lab.run(host, ["env", *variables, "sh", str(PROVISION / script)], check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_provisioning_scripts_build_a_working_lab(lab: Topology, tmp_path: Path) -> None:
    etc, shared, state = tmp_path / "etc", tmp_path / "shared", tmp_path / "clienta"
    policy = tmp_path / "demo.yaml"
    # The demo policy without webapp's category: its TCP echo flow is refused at first.
    grant = "    categories: [echo-tcp]\n"
    assert grant in DEMO_POLICY.read_text()
    policy.write_text(DEMO_POLICY.read_text().replace(grant, ""))
    lan = lab.address(GATEWAY, "lan")
    out = provision(
        lab, GATEWAY, "gateway.sh", SENG_FW=SENG_FW, SENG_FW_ETC=str(etc),
        SENG_FW_SHARED=str(shared), SENG_FW_LISTEN=f"{lan}:12345", SENG_FW_POLICY=str(policy),
    )  # fmt: skip
    assert "pin it in clients" in out
    assert (shared / "gateway.pem").read_bytes() == (etc / "server.pem").read_bytes()
    # The control socket of this test's gateway, not the machine's.
    config = etc / "gateway.yaml"
    control = tmp_path / "run" / "control.sock"
    revocations = tmp_path / "state" / "revocations.json"
    config.write_text(
        config.read_text()
        .replace("/run/seng-fw/control.sock", str(control))
        .replace("/var/lib/seng-fw/revocations.json", str(revocations))
    )

    def seng_fw(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return lab.run(GATEWAY, [sys.executable, "-m", "seng_fw", *args], check=check)

    # What seng-fw-policy.service and seng-fw.service run (no gateway yet: exit 3, which
    # the policy unit counts as success).
    first = seng_fw("apply", str(etc / "policies"), "--tun", "tunFA", "--control-socket",
                    str(control), check=False)  # fmt: skip
    assert first.returncode == 3 and "no gateway answering" in first.stderr, first.stderr
    gateway_log = tmp_path / "gateway.log"
    with gateway_log.open("wb") as log:  # the child keeps its own descriptor
        gateway = lab.popen(
            GATEWAY, [sys.executable, "-m", "seng_fw", "serve", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        assert wait_until(lambda: control.exists()), gateway_log.read_text()
        provision(lab, EXTERNAL, "external.sh", SENG_FW_PYTHON=sys.executable,
                  SENG_FW_VIA=str(lab.address(GATEWAY, "ext")),
                  SENG_FW_BIND=str(lab.address(EXTERNAL, "ext")))  # fmt: skip
        provision(
            lab, CLIENT_A, "client.sh", SENG_FW=SENG_FW, SENG_FW_SHARED=str(shared),
            SENG_FW_GATEWAY=f"{lan}:12345", SENG_FW_STATE=str(state),
            SENG_FW_ENCLAVES=f"webapp:{DEMO_WEBAPP.hex()}",
        )  # fmt: skip
        state_file = state / "webapp" / "state.json"
        assert wait_until(lambda: '"up"' in _read(state_file)), _read(state_file) + _read(
            gateway_log
        )
        address = IPv4Address(json.loads(state_file.read_text())["address"])
        external = str(lab.address(EXTERNAL, "ext"))

        def flow() -> bool:
            return probe_tcp(lab.ns(CLIENT_A), address, external, 7, timeout=1.0)

        # No rule gives webapp the TCP echo service yet: the ruleset drops the flow.
        assert not flow()
        policy_file = etc / "policies" / "demo.yaml"
        text = policy_file.read_text()
        policy_file.write_text(re.sub(r"(  - name: webapp\n)", lambda m: m.group(1) + grant, text))
        assert seng_fw("check", str(etc / "policies")).returncode == 0
        applied = seng_fw("apply", str(etc / "policies"), "--tun", "tunFA",
                          "--control-socket", str(control))  # fmt: skip
        assert "gateway reloaded" in applied.stdout
        assert wait_until(flow, 10), "the flow still fails after apply"

        status = json.loads(seng_fw("status", "--socket", str(control), "--json").stdout)["result"]
        assert {a["name"]: a["enclaves"] for a in status["apps"]}["webapp"] == 1
        revoked = seng_fw("revoke", "--app", "webapp", "--socket", str(control))
        assert "1 enclaves disconnected" in revoked.stdout
        # Saved where the configuration says, with who and when.
        [saved] = json.loads(revocations.read_text())["revocations"]
        assert (saved["kind"], saved["target"]) == ("app", "webapp") and "uid=0" in saved["by"]
        assert wait_until(lambda: '"down"' in _read(state_file) or '"refused"' in _read(state_file))
        enclaves = seng_fw("enclaves", "--socket", str(control), "--json").stdout
        assert json.loads(enclaves)["result"] == {"enclaves": []}
    finally:
        gateway.terminate()
        gateway.wait(10)
        for pid_file in state.glob("*/pid"):
            lab.run(CLIENT_A, ["kill", pid_file.read_text().strip()], check=False)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
