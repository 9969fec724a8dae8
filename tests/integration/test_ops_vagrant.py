"""The Vagrant lab: `vagrant validate`, and the same topology as the namespace lab."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from seng_fw.lab.topology import CLIENT_A, CLIENT_B, EXTERNAL, GATEWAY, lab_topology

VAGRANT = Path(__file__).resolve().parents[2] / "vagrant"


def test_vagrantfile_validates(tmp_path: Path) -> None:
    if shutil.which("vagrant") is None:
        pytest.skip("needs vagrant (Debian package vagrant)")
    env = {
        **os.environ,
        # Nothing in the repository, nothing in ~/.vagrant.d: the check leaves no trace.
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"),
        "VAGRANT_HOME": str(tmp_path / "home"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
    }
    # --ignore-provider: VMs cannot run here, so no provider (VirtualBox, libvirt) is
    # installed; everything else in the Vagrantfile is checked.
    result = subprocess.run(
        ["vagrant", "validate", "--ignore-provider"],
        cwd=VAGRANT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout


def test_vms_have_the_namespace_lab_addresses() -> None:
    text = (VAGRANT / "Vagrantfile").read_text()
    topology = lab_topology()
    expected = {
        "gateway": {str(topology.address(GATEWAY, "lan")), str(topology.address(GATEWAY, "ext"))},
        "clienta": {str(topology.address(CLIENT_A, "lan"))},
        "clientb": {str(topology.address(CLIENT_B, "lan"))},
        "external": {str(topology.address(EXTERNAL, "ext"))},
    }
    for name, addresses in expected.items():
        block = re.search(rf'"{name}" => \{{(.*?)\n  \}}', text, re.S)
        assert block is not None, name
        assert set(re.findall(r'"(\d+\.\d+\.\d+\.\d+)"', block.group(1))) == addresses, name


def test_provisioning_scripts_are_posix_shell() -> None:
    for script in sorted((VAGRANT / "provision").glob("*.sh")):
        result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
        assert os.access(script, os.X_OK), f"{script.name} is not executable"
