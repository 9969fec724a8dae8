"""The systemd units, installed and started by a real systemd.

The test machines have no systemd as PID 1, so `PrivateSystemd` boots one as PID 1 of
new PID and mount namespaces on the same kernel: /etc and /var are copy-on-write
overlays (the host's files are never changed), /run is a fresh tmpfs. In there,
`seng-fw install-units` and `seng-fw init` run as an administrator would run them,
and `systemctl start seng-fw` starts the gateway with every restriction of its unit
(user, capabilities, seccomp, read-only file system, private /dev, ...).

What differs from a real machine, and why:
- a drop-in puts both services into the lab's gateway namespace
  (NetworkNamespacePath=), standing in for the host's network;
- /dev/net/tun gets mode 0666, which udev gives it on Debian (here it is 0600);
- the units run /opt/seng-fw-test/bin/seng-fw, a launcher for the interpreter that
  runs the tests, bound under /opt with the checkout (as `make install` puts seng-fw in
  /opt/seng-fw): the interpreter may live under /root, which ProtectHome= hides, and
  the checkout under /tmp, which PrivateTmp= hides.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from seng_fw.lab.ca import ROOT_CERT_FILE, LabCA
from seng_fw.lab.lab import (
    DEMO_POLICY,
    DEMO_SIGNER,
    DEMO_WEBAPP,
    ECHO_PORT,
    SHARED_DEMO_POLICY,
)
from seng_fw.lab.services import probe_tcp
from seng_fw.lab.topology import CLIENT_A, EXTERNAL, GATEWAY, Topology
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = Path("/lib/systemd/systemd")
PROGRAM = "/opt/seng-fw-test/bin/seng-fw"  # inside the private system
CAP_NET_ADMIN = 1 << 12

pytestmark = pytest.mark.root

# Only the units named here exist for the private systemd (SYSTEMD_UNIT_PATH replaces
# the search path, and no generators run): sysinit.target of the real system would
# run systemd-tmpfiles, systemd-sysctl, timesyncd, ... whose effects (on /tmp, kernel
# settings, the clock) no namespace contains. Its own network, UTS and cgroup
# namespaces keep its network set-up and hostname away from the host's.
EMPTY_TARGETS = (
    "sysinit.target", "basic.target", "sockets.target", "paths.target", "timers.target",
    "local-fs.target", "network-pre.target", "network.target", "network-online.target",
    "multi-user.target", "shutdown.target",
)  # fmt: skip
COPIED_UNITS = (
    "systemd-journald.service", "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
)  # fmt: skip

BOOT_SCRIPT = r"""
set -eu
W=$1
mount --make-rprivate /
# Keep the named network namespaces visible under the new /run.
mkdir -p "$W/netns"
if [ -d /run/netns ]; then mount --rbind /run/netns "$W/netns"; fi
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/netns
mount --move "$W/netns" /run/netns
for d in etc var opt; do
    mkdir -p "$W/$d-upper" "$W/$d-work"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$W/$d-upper,workdir=$W/$d-work" "/$d"
done
# The interpreter at a path the units can see (ProtectHome= hides /root and /home),
# with a launcher like the one `make install` puts in /opt/seng-fw/bin.
mkdir -p /opt/seng-fw-test/python /opt/seng-fw-test/bin /opt/seng-fw-test/repo
mount --bind "$PYTHON_BASE" /opt/seng-fw-test/python
# The checkout too (and the venv in it): PrivateTmp= hides a checkout under /tmp.
mount --bind "$REPO" /opt/seng-fw-test/repo
install -m 0755 "$W/launcher" /opt/seng-fw-test/bin/seng-fw
mknod "$W/tun" c 10 200
chmod 0666 "$W/tun"
mount --bind "$W/tun" /dev/net/tun
mkdir -p /run/systemd/system /run/seng-fw-test/units /run/seng-fw-test/none
cp -r "$W/units/." /run/seng-fw-test/units/
export container=other
export SYSTEMD_UNIT_PATH=/run/systemd/system:/run/seng-fw-test/units
export SYSTEMD_GENERATOR_PATH=/run/seng-fw-test/none
export SYSTEMD_ENVIRONMENT_GENERATOR_PATH=/run/seng-fw-test/none
exec /lib/systemd/systemd --system --unit=seng-fw-test.target --log-level=warning
"""


def _launcher() -> str:
    """A seng-fw program for the bound interpreter, with this interpreter's packages and
    this checkout's seng_fw (an editable install points at the checkout's own path)."""
    bounds = ((Path(sys.base_prefix), Path("/opt/seng-fw-test/python")),
              (REPO, Path("/opt/seng-fw-test/repo")))  # fmt: skip

    def inside(path: Path) -> str:
        for real, bound in bounds:
            if path.is_relative_to(real):
                return str(bound / path.relative_to(real))
        return str(path)

    base = Path(sys.base_prefix)
    python = inside(base / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}")
    sites = [inside(Path(p)) for p in sys.path if p.endswith("site-packages")]
    code = (
        f"import site, sys\nsys.path.insert(0, {json.dumps(inside(REPO))})\n"
        f"for path in {json.dumps(sites)}:\n    site.addsitedir(path)\n"
        "from seng_fw.cli import main\nsys.exit(main())\n"
    )
    # LD_LIBRARY_PATH: a shared-libpython build (pyenv) finds its libpython by an
    # absolute rpath into the hidden prefix.
    return f"#!/bin/sh\nLD_LIBRARY_PATH={inside(base / 'lib')} exec {python} -c '{code}' \"$@\"\n"


def _cgroup_dirs() -> set[Path]:
    found: set[Path] = set()
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        for directory, subdirs, _ in os.walk(hierarchy):
            found.update(Path(directory, s) for s in subdirs)
    return found


class PrivateSystemd:
    """systemd as PID 1 of private PID and mount namespaces (see the module docstring)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self._cgroups_before = _cgroup_dirs()

    def start(self, timeout: float = 30.0) -> None:
        script = self.workdir / "boot.sh"
        script.write_text(BOOT_SCRIPT)
        units = self.workdir / "units"
        units.mkdir()
        for name in EMPTY_TARGETS:
            (units / name).write_text("[Unit]\nDescription=empty stand-in\n")
        for name in COPIED_UNITS:
            shutil.copyfile(Path("/lib/systemd/system", name), units / name)
        (units / "seng-fw-test.target").write_text(
            "[Unit]\nDescription=seng-fw test system\nWants=systemd-journald.service\n"
        )
        (self.workdir / "launcher").write_text(_launcher())
        env = {**os.environ, "PYTHON_BASE": sys.base_prefix, "REPO": str(REPO)}
        with (self.workdir / "systemd.log").open("wb") as log:  # the child keeps its own
            self.process = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--mount-proc", "--mount", "--cgroup", "--uts",
                 "--net", "bash", str(script), str(self.workdir)],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            with _suppress_missing():
                pids = children.read_text().split()
                if pids and Path(f"/proc/{pids[0]}/exe").resolve() == SYSTEMD.resolve():
                    self.pid = int(pids[0])
                    state = self.run(["systemctl", "is-system-running"], check=False).stdout
                    if state.strip() in ("running", "degraded"):
                        return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(
            f"private systemd did not come up:\n{(self.workdir / 'systemd.log').read_text()}"
        )

    def run(
        self, argv: Sequence[str], *, check: bool = True, netns: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the private system (and optionally in a network namespace)."""
        inner = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", "--", *inner],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(f"{inner} exited {result.returncode}:\n{result.stderr}")
        return result

    def journal(self, unit: str) -> str:
        return self.run(["journalctl", "-u", unit, "-o", "cat", "--no-pager"], check=False).stdout

    def stop(self) -> None:
        if self.pid:
            # SIGKILL of the namespace's PID 1 ends every process in it.
            with _suppress_missing():
                os.kill(self.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)
        # systemd's cgroups outlive it (there is no cgroup-aware init outside).
        for directory in sorted(_cgroup_dirs() - self._cgroups_before, reverse=True):
            with _suppress_missing():
                directory.rmdir()


class _suppress_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        return exc_type is not None and issubclass(exc_type, OSError)


@pytest.fixture
def private_systemd(tmp_path: Path) -> Iterator[PrivateSystemd]:
    for tool in ("unshare", "nsenter", "mknod"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    if not SYSTEMD.exists():
        pytest.skip("needs systemd (Debian package systemd)")
    if Path("/run/systemd/system").is_dir():
        pytest.skip("systemd is the init system here: test the units on it directly")
    if not Path("/opt").is_dir():
        pytest.skip("needs /opt")
    system = PrivateSystemd(tmp_path)
    try:
        system.start()
    except RuntimeError as exc:
        system.stop()
        pytest.skip(f"cannot boot a private systemd here: {exc}")
    try:
        yield system
    finally:
        system.stop()


def _process_status(system: PrivateSystemd, pid: int) -> dict[str, str]:
    text = system.run(["cat", f"/proc/{pid}/status"]).stdout
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _install(
    system: PrivateSystemd, lab: Topology, tmp_path: Path, policy: Path, *init_options: str
) -> LabCA:
    """As the README says: install units and user, then init the configuration (with
    `init_options`); returns the lab CA the gateway trusts."""
    gw_ns = lab.ns(GATEWAY)
    lan = lab.address(GATEWAY, "lan")
    installed = system.run([str(PROGRAM), "install-units", "--bin", str(PROGRAM)], netns=gw_ns)
    assert "seng-fw.service" in installed.stdout
    ca = LabCA.create(tmp_path / "ca")
    system.run(
        [str(PROGRAM), "init", "--listen", f"{lan}:12345",
         "--root", str(tmp_path / "ca" / ROOT_CERT_FILE), "--policy", str(policy),
         *init_options],
    )  # fmt: skip
    for unit in ("seng-fw.service", "seng-fw-policy.service", "seng-fw-label.service"):
        # The private system reads units from /run/systemd/system only (see above).
        system.run(["cp", f"/etc/systemd/system/{unit}", "/run/systemd/system/"])
        system.run(["mkdir", "-p", f"/run/systemd/system/{unit}.d"])
        system.run(["sh", "-c", f"printf '[Service]\\nNetworkNamespacePath=/run/netns/{gw_ns}\\n'"
                    f" > /run/systemd/system/{unit}.d/test-netns.conf"])  # fmt: skip
    system.run(["systemctl", "daemon-reload"])
    return ca


def _start_emulator(
    lab: Topology, ca: LabCA, tmp_path: Path, mrenclave: bytes
) -> tuple[subprocess.Popen[bytes], Path]:
    """An emulated enclave on client host A; returns it and its state file."""
    enclave_dir = tmp_path / "enclave"
    enclave_dir.mkdir()
    issued = ca.issue_enclave_cert(mrenclave=mrenclave, mrsigner=DEMO_SIGNER)
    (enclave_dir / "cert.pem").write_bytes(issued.cert_pem)
    (enclave_dir / "key.pem").write_bytes(issued.key_pem)
    server_pem = tmp_path / "etc-upper" / "seng-fw" / "server.pem"
    state = enclave_dir / "state.json"
    lan = lab.address(GATEWAY, "lan")
    emulator = lab.popen(
        CLIENT_A,
        [sys.executable, "-m", "seng_fw", "lab", "enclave", "--server", f"{lan}:12345",
         "--server-cert", str(server_pem), "--cert", str(enclave_dir / "cert.pem"),
         "--key", str(enclave_dir / "key.pem"), "--tun", "se0", "--state-file", str(state)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return emulator, state


def _main_process(system: PrivateSystemd, unit: str) -> dict[str, str]:
    show = system.run(["systemctl", "show", unit, "-p", "MainPID"])
    return _process_status(system, int(show.stdout.strip().split("=", 1)[1]))


def test_gateway_runs_under_its_unit(
    lab: Topology, private_systemd: PrivateSystemd, tmp_path: Path
) -> None:
    # `lab` comes first: the private system sees the namespaces that exist when it boots.
    system = private_systemd
    lan = lab.address(GATEWAY, "lan")
    ca = _install(system, lab, tmp_path, DEMO_POLICY)

    started = system.run(["systemctl", "start", "seng-fw.service"], check=False)
    assert started.returncode == 0, started.stderr + system.journal("seng-fw*")
    assert system.run(["systemctl", "is-active", "seng-fw-policy.service"]).stdout.strip() == (
        "active"
    )
    # The ruleset is in the gateway's namespace, loaded by the policy unit.
    assert "table inet seng" in lab.run(GATEWAY, ["nft", "list", "tables"]).stdout

    status = _main_process(system, "seng-fw.service")
    uid = system.run(["id", "-u", "seng-fw"]).stdout.strip()
    assert status["Uid"].split()[0] == uid != "0"
    assert int(status["CapEff"], 16) == CAP_NET_ADMIN
    assert int(status["CapBnd"], 16) == CAP_NET_ADMIN
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"

    # The control socket answers root, with the gateway's configuration.
    answer = system.run([str(PROGRAM), "status", "--json"])
    gateway = json.loads(answer.stdout)["result"]
    assert gateway["listen"] == [f"{lan}:12345", f"{lan}:12346"]
    assert gateway["tun"]["name"] == "tunFA"
    assert "tunFA" in lab.run(GATEWAY, ["ip", "-o", "link"]).stdout

    # An enclave joins from client host A; revoking its app closes its tunnels.
    emulator, state = _start_emulator(lab, ca, tmp_path, DEMO_WEBAPP)
    try:
        assert wait_until(lambda: '"up"' in _read(state)), _read(state) + system.journal("seng-fw")
        listed = json.loads(system.run([str(PROGRAM), "enclaves", "--json"]).stdout)["result"][
            "enclaves"
        ]
        assert [(e["app"], e["host"]) for e in listed] == [
            ("webapp", str(lab.address(CLIENT_A, "lan")))
        ]
        revoked = system.run([str(PROGRAM), "revoke", "--app", "webapp"])
        assert "1 enclaves disconnected" in revoked.stdout
        listed = json.loads(system.run([str(PROGRAM), "enclaves", "--json"]).stdout)["result"]
        assert listed == {"enclaves": []}
    finally:
        emulator.terminate()
        emulator.wait(10)

    # systemctl reload goes through the control socket; stop removes the TUN device.
    system.run(["systemctl", "reload", "seng-fw.service"])
    system.run(["systemctl", "stop", "seng-fw.service"])
    assert "tunFA" not in lab.run(GATEWAY, ["ip", "-o", "link"]).stdout
    journal = system.journal("seng-fw.service")
    assert "revoked app webapp" in journal


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_labeller_runs_under_its_unit(
    lab: Topology, private_systemd: PrivateSystemd, tmp_path: Path
) -> None:
    """Shared-subnet mode with the hook as its own service: seng-fw-label.service labels
    an enclave's connections; stopped, new connections are dropped; started again, they
    pass, the gateway untouched."""
    system = private_systemd
    ca = _install(
        system, lab, tmp_path, SHARED_DEMO_POLICY, "--mode", "shared", "--label-hook", "service"
    )
    started = system.run(["systemctl", "start", "seng-fw.service"], check=False)
    assert started.returncode == 0, started.stderr + system.journal("seng-fw*")
    gateway_pid = _main_process(system, "seng-fw.service")["Pid"]
    # Type=notify: `start` returns once the registry is synced and the queue bound.
    started = system.run(["systemctl", "start", "seng-fw-label.service"], check=False)
    assert started.returncode == 0, started.stderr + system.journal("seng-fw*")
    status = _main_process(system, "seng-fw-label.service")
    assert status["Uid"].split()[0] == system.run(["id", "-u", "seng-fw"]).stdout.strip()
    assert int(status["CapEff"], 16) == CAP_NET_ADMIN and status["Seccomp"] == "2"

    external = str(lab.address(EXTERNAL, "ext"))
    echo = lab.popen(
        EXTERNAL, [sys.executable, "-m", "seng_fw.lab.services", "--bind", external],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    emulator, state = _start_emulator(lab, ca, tmp_path, DEMO_WEBAPP)
    try:
        assert wait_until(lambda: '"up"' in _read(state)), _read(state) + system.journal("seng-fw")
        address = IPv4Address(json.loads(state.read_text())["address"])

        def flow() -> bool:  # webapp may use the TCP echo (policies/lab/demo-shared.yaml)
            return probe_tcp(lab.ns(CLIENT_A), address, external, ECHO_PORT, timeout=1.0)

        assert wait_until(flow, 10), system.journal("seng-fw*")
        gateway = json.loads(system.run([str(PROGRAM), "status", "--json"]).stdout)["result"]
        assert gateway["mode"] == "shared" and gateway["queue_mode"] in ("nft", "xtables")

        system.run(["systemctl", "stop", "seng-fw-label.service"])
        assert not flow()  # no labeller: dropped, never passed unlabelled
        system.run(["systemctl", "start", "seng-fw-label.service"])
        assert wait_until(flow, 10)
        assert _main_process(system, "seng-fw.service")["Pid"] == gateway_pid
    finally:
        emulator.terminate()
        emulator.wait(10)
        echo.terminate()
        echo.wait(10)
    system.run(["systemctl", "stop", "seng-fw.service"])
    assert "labelling new connections from queues 0" in system.journal("seng-fw-label.service")
