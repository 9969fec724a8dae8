"""Fixtures for tests that need root, network namespaces and TUN.

- ``require_root``: skips unless we are root and can create a namespace.
  Tests marked ``@pytest.mark.root`` get it automatically.
- ``require_tun``: additionally needs ``/dev/net/tun``.
- ``ns_prefix``: a namespace name prefix unique to the test; everything
  under it is deleted after the test, whatever happened.
- ``host_ns``: one namespace (loopback up, IPv6 off) for single-host tests.
- ``make_topology``: builds a `Topology` from hosts and segments under the
  test's prefix; torn down afterwards.
- ``lab``: the DESIGN.md lab (clienta, clientb, gw, ext), up.
- ``closer``: an ExitStack for the sockets and clients a test opens, closed after
  the test whatever happened (``sock = closer.enter_context(netns_socket(...))``).

Warnings are errors here as everywhere (pyproject): an unclosed socket or file is a
ResourceWarning, which fails the test that leaked it or, collected later, another one.

Prefixes are ``sfwt<pid>n<counter>-``; at session start, namespaces left by
test processes that no longer exist are deleted (never those of a live run,
so parallel sessions on one machine do not disturb each other).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator

import pytest

from seng_fw.lab.topology import Host, Segment, Topology, lab_topology
from seng_fw.system.netns import cleanup, delete_namespace, list_namespaces

TEST_PREFIX = "sfwt"
_STALE = re.compile(rf"^{TEST_PREFIX}(\d+)n\d+-")
_counter = itertools.count()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale() -> None:
    for name in list_namespaces(TEST_PREFIX):
        match = _STALE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            delete_namespace(name)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs iproute2 (the ip command)"
    probe = f"{TEST_PREFIX}{os.getpid()}nprobe-"
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"cannot create network namespaces: {proc.stderr.strip()}"
    delete_namespace(probe)
    return None


@pytest.fixture(scope="session")
def _netns_status() -> str | None:
    reason = _netns_unavailable()
    if reason is None:
        _sweep_stale()
    return reason


@pytest.fixture
def require_root(_netns_status: str | None) -> None:
    if _netns_status is not None:
        pytest.skip(_netns_status)


@pytest.fixture
def require_tun(require_root: None) -> None:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")


@pytest.fixture(autouse=True)
def _skip_marked_root(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("root") is not None:
        request.getfixturevalue("require_root")


@pytest.fixture
def ns_prefix(require_root: None) -> Iterator[str]:
    prefix = f"{TEST_PREFIX}{os.getpid()}n{next(_counter)}-"
    try:
        yield prefix
    finally:
        cleanup(prefix)  # safety net: whatever the test created under the prefix


@pytest.fixture
def make_topology(ns_prefix: str) -> Iterator[Callable[..., Topology]]:
    """``make_topology(hosts, segments=(), suffix="")`` -> a Topology that is up."""
    built: list[Topology] = []

    def make(hosts: Iterable[Host], segments: Iterable[Segment] = (), suffix: str = "") -> Topology:
        topo = Topology(ns_prefix + suffix, hosts, segments)
        built.append(topo)
        topo.up()
        return topo

    try:
        yield make
    finally:
        for topo in reversed(built):
            topo.down()


@pytest.fixture
def host_ns(make_topology: Callable[..., Topology]) -> str:
    """Name of a fresh namespace with loopback up."""
    return make_topology([Host("solo")]).ns("solo")


@pytest.fixture
def lab(ns_prefix: str) -> Iterator[Topology]:
    topo = lab_topology(ns_prefix)
    topo.up()
    try:
        yield topo
    finally:
        topo.down()


@pytest.fixture
def closer() -> Iterator[contextlib.ExitStack]:
    """Closes what the test registered, last first, after the test (passed or failed)."""
    with contextlib.ExitStack() as stack:
        yield stack
