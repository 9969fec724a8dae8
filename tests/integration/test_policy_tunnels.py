"""The compiled policy end to end: real tunnels, real nftables, real packets.

Three apps and two categories on the namespace lab; every allowed flow passes and every
other one is dropped at the gateway, app to app and ingress rules hold, an exposed
enclave service is reachable from the external host, and an apply that removes an app
disconnects its enclaves while the others keep working.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from seng_fw.lab.lab import (
    DEMO_NGINX,
    DEMO_WEBAPP,
    ECHO_PORT,
    EnclaveSpec,
    Lab,
    RunningEnclave,
)
from seng_fw.lab.services import probe_icmp, probe_tcp, probe_udp
from seng_fw.lab.topology import CLIENT_A, CLIENT_B, EXTERNAL, GATEWAY

pytestmark = pytest.mark.root

DEMO_DB = bytes.fromhex("d" * 64)
EXPOSED_PORT = 8007
POLICY = f"""\
gateway_networks: [10.77.1.0/24, 10.77.2.0/24]
categories:
  echo-tcp:
    egress: [{{to: 10.77.2.2, protocol: tcp, ports: {ECHO_PORT}}}]
  pingers:
    egress: [{{to: 10.77.2.0/24, protocol: icmp}}]
apps:
  - name: webapp
    mrenclave: {DEMO_WEBAPP.hex()}
    hosts: [10.77.1.0/24]
    subnet: {{subnet: 192.168.29.0/24}}
    categories: [echo-tcp, pingers]
    egress:
      - {{to: {{app: nginx}}, protocol: tcp, ports: {ECHO_PORT}}}
  - name: nginx
    mrenclave: {DEMO_NGINX.hex()}
    hosts: [10.77.1.0/24]
    subnet: {{subnet: 192.168.30.0/24}}
    egress:
      - {{to: 10.77.2.2, protocol: udp, ports: {ECHO_PORT}}}
    ingress:
      - {{from: {{app: webapp}}, protocol: tcp, ports: {ECHO_PORT}}}
    expose:
      - {{address: 10.77.2.1, port: {EXPOSED_PORT}, protocol: tcp, to_port: {ECHO_PORT},
         from: 10.77.2.0/24}}
  - name: db
    mrenclave: {DEMO_DB.hex()}
    hosts: [10.77.1.0/24]
    subnet: {{subnet: 192.168.31.0/24}}
    categories: [pingers]
    egress:
      - {{to: {{app: nginx}}, protocol: tcp, ports: {ECHO_PORT}}}
"""


@pytest.fixture
def lab(ns_prefix: str, tmp_path: Path) -> Iterator[Lab]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with Lab(ns_prefix, tmp_path / "state", policy) as running:
        yield running


def _up(lab: Lab, spec: EnclaveSpec) -> RunningEnclave:
    enclave = lab.start_enclave(spec)
    state = enclave.wait_settled()
    assert state["status"] == "up", (state, lab.gateway_log.read_text()[-2000:])
    return enclave


def test_three_apps_two_categories_through_real_tunnels(lab: Lab) -> None:
    web = _up(lab, EnclaveSpec("web", CLIENT_A, DEMO_WEBAPP))
    nginx = _up(lab, EnclaveSpec("nginx", CLIENT_B, DEMO_NGINX))
    db = _up(lab, EnclaveSpec("db", CLIENT_A, DEMO_DB))
    assert web.address and nginx.address and db.address
    # nginx's enclave serves echo on its own address (inside client host B).
    service = lab.topology.popen(
        CLIENT_B,
        [sys.executable, "-m", "seng_fw.lab.services", "--bind", str(nginx.address),
         "--tcp", str(ECHO_PORT), "--udp", str(ECHO_PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        ext, a, b = str(lab.external), lab.ns(CLIENT_A), lab.ns(CLIENT_B)
        flows = {
            # egress by category and by app rule
            "web tcp ext": probe_tcp(a, web.address, ext, ECHO_PORT),
            "web udp ext": probe_udp(a, web.address, ext, ECHO_PORT, timeout=1.0),
            "web icmp ext": probe_icmp(a, web.address, ext),
            "nginx udp ext": probe_udp(b, nginx.address, ext, ECHO_PORT),
            "nginx tcp ext": probe_tcp(b, nginx.address, ext, ECHO_PORT, timeout=1.0),
            "nginx icmp ext": probe_icmp(b, nginx.address, ext, timeout=1.0),
            "db icmp ext": probe_icmp(a, db.address, ext),
            "db tcp ext": probe_tcp(a, db.address, ext, ECHO_PORT, timeout=1.0),
            # app to app: needs the source's egress and the destination's ingress
            "web tcp nginx": probe_tcp(a, web.address, str(nginx.address), ECHO_PORT),
            "db tcp nginx": probe_tcp(a, db.address, str(nginx.address), ECHO_PORT, timeout=1.0),
            # ingress: the external host only through the declared exposure
            "ext tcp nginx": probe_tcp(
                lab.ns(EXTERNAL), None, str(nginx.address), ECHO_PORT, timeout=1.0
            ),
            "ext tcp exposed": probe_tcp(lab.ns(EXTERNAL), None, "10.77.2.1", EXPOSED_PORT),
            "ext icmp web": probe_icmp(lab.ns(EXTERNAL), None, str(web.address), timeout=1.0),
        }
    finally:
        service.terminate()
        service.wait(5)
    assert flows == {
        "web tcp ext": True,
        "web udp ext": False,
        "web icmp ext": True,
        "nginx udp ext": True,
        "nginx tcp ext": False,
        "nginx icmp ext": False,
        "db icmp ext": True,
        "db tcp ext": False,
        "web tcp nginx": True,
        "db tcp nginx": False,  # db's egress allows it, nginx's ingress does not
        "ext tcp nginx": False,
        "ext tcp exposed": True,
        "ext icmp web": False,
    }


def test_apply_removing_an_app_disconnects_its_enclaves(lab: Lab) -> None:
    web = _up(lab, EnclaveSpec("web", CLIENT_A, DEMO_WEBAPP))
    db = _up(lab, EnclaveSpec("db", CLIENT_B, DEMO_DB))
    db_address = db.address
    ruleset_before = lab.seng_fw(GATEWAY, "compile", str(lab.policy)).stdout
    lab.policy.write_text(POLICY[: POLICY.index("  - name: db")])
    applied = lab.apply_policy()
    assert "gateway reloaded" in applied.stdout, applied.stdout + applied.stderr
    # The gateway reloaded: db's tunnels are closed and its address released.
    assert db.process.wait(10) == 1
    assert db.read_state()["status"] == "down"
    assert lab.wait_for_log(r"app=db .* reason=revoked\.unknown_mrenclave")
    assert lab.wait_for_log(rf"conntrack: deleted \d+ entries of {db_address}\b")
    # webapp's established tunnel keeps working under the new ruleset.
    assert probe_tcp(lab.ns(CLIENT_A), web.address, str(lab.external), ECHO_PORT)
    assert lab.seng_fw(GATEWAY, "compile", str(lab.policy)).stdout != ruleset_before
    again = lab.start_enclave(EnclaveSpec("db-again", CLIENT_B, DEMO_DB))
    assert again.wait_settled()["status"] == "refused"
    # Ruleset and admission policy agree, and status says so.
    status = _status(lab)
    assert status["policy"]["ruleset_digest"] == status["policy"]["digest"]
    assert status["warnings"] == []
    # A ruleset applied without telling the gateway: status warns that they differ.
    other = lab.state_dir / "other.yaml"
    other.write_text(POLICY)
    alone = lab.seng_fw(
        GATEWAY, "apply", str(other), "--control-socket", str(lab.state_dir / "nobody.sock")
    )
    assert alone.returncode == 3, alone.stderr
    status = _status(lab)
    assert status["policy"]["ruleset_digest"] != status["policy"]["digest"]
    assert "another policy" in status["warnings"][0]
    shown = lab.seng_fw(GATEWAY, "status", "--socket", str(lab.state_dir / "control.sock"))
    assert "warning: the live ruleset was compiled from another policy" in shown.stderr


def _status(lab: Lab) -> dict[str, Any]:
    shown = lab.seng_fw(
        GATEWAY, "status", "--json", "--socket", str(lab.state_dir / "control.sock")
    )
    assert shown.returncode == 0, shown.stderr
    result: dict[str, Any] = json.loads(shown.stdout)["result"]  # the JSON document
    return result
