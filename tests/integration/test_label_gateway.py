"""The gateway's hook points (`Labelling`) against the kernel: queue rules installed and
removed, the in-process hook labelling from the registry the gateway keeps, relabelling
on a policy change, the service mode's registry server."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from seng_fw.lab.topology import Topology
from seng_fw.label.config import LabelConfig
from seng_fw.label.labelling import Labelling
from seng_fw.label.marks import NONE, UNKNOWN, encode
from seng_fw.label.registry import LabelRegistryClient, Registry
from seng_fw.policy.models import Policy
from tests.support.label_testbed import (
    CLIENT_A,
    EXT_HOST,
    EXTERNAL,
    GATEWAY,
    HOST_A,
    EchoServers,
    LoopThread,
    connect,
    label_topology,
    place_enclave,
)

pytestmark = pytest.mark.root

ENCLAVE = IPv4Address("192.168.28.10")


def policy(*names: str) -> Policy:
    return Policy.model_validate(
        {
            "apps": [
                {"name": name, "mrenclave": f"{i:064x}", "hosts": "10.1.0.0/24"}
                for i, name in enumerate(names, start=1)
            ]
        }
    )


@dataclass
class Identity:
    mrenclave: bytes = b"\x01" * 32
    mrsigner: bytes = b"\x02" * 32


@dataclass
class App:
    name: str = "web"
    categories: list[str] = field(default_factory=list)


@dataclass
class Enclave:  # the fields of seng_fw.gateway.core.Enclave that Labelling reads
    identity: Identity = field(default_factory=Identity)
    app: App = field(default_factory=App)
    host: IPv4Address = HOST_A
    address: IPv4Address = ENCLAVE
    admitted_at: float = 1.0


@pytest.fixture
def lab(ns_prefix: str) -> Iterator[tuple[Topology, LoopThread]]:
    topo = label_topology(ns_prefix)
    topo.up()
    servers, loop = EchoServers(), LoopThread()
    try:
        place_enclave(topo, ENCLAVE, HOST_A)
        servers.listen(topo.ns(EXT_HOST), EXTERNAL, 7001)
        yield topo, loop
    finally:
        loop.close()
        servers.close()
        topo.down()


def mark_of_connection(topo: Topology) -> int:
    sock = connect(topo.ns(CLIENT_A), ENCLAVE, EXTERNAL, 7001, 2.0)
    assert sock is not None
    with sock:
        out = topo.run(GATEWAY, ["conntrack", "-L", "-p", "tcp", "--sport",
                                 str(sock.getsockname()[1])]).stdout  # fmt: skip
    (mark,) = [int(f[5:]) for f in out.split() if f.startswith("mark=")]
    return mark


def test_in_process_hook_points(lab: tuple[Topology, LoopThread]) -> None:
    topo, loop = lab
    config = LabelConfig(hook="in_process", queues=2)
    labelling = Labelling(config, policy("web"), netns=topo.ns(GATEWAY))
    loop.run(labelling.start())
    try:
        loop.call(lambda: labelling.admitted(Enclave()))
        assert mark_of_connection(topo) == encode(1, NONE)

        loop.call(lambda: labelling.policy_changed(policy("first", "web")))
        assert mark_of_connection(topo) == encode(2, NONE)  # relabelled

        loop.call(lambda: labelling.released(ENCLAVE))
        assert mark_of_connection(topo) == encode(UNKNOWN, NONE)

        status = loop.call(labelling.status)
        assert status["queue_mode"] in ("xtables", "nft") and status["queues"] == [0, 1]
        assert status["enclaves"] == 0 and status["label_ids"] == 2
        assert status["counters"]["labelled"] >= 3
        assert status["counters"]["unknown_source"] >= 1
    finally:
        loop.run(labelling.stop(remove_rules=True))
    assert "seng_label" not in topo.run(GATEWAY, ["nft", "list", "ruleset"]).stdout
    assert "SENG_LABEL" not in topo.run(GATEWAY, ["iptables-nft-save"]).stdout


def test_service_mode_serves_the_registry(
    lab: tuple[Topology, LoopThread], tmp_path: Path
) -> None:
    topo, loop = lab
    config = LabelConfig(hook="service", socket=tmp_path / "label.sock")
    labelling = Labelling(config, policy("web"), netns=topo.ns(GATEWAY))
    loop.run(labelling.start())
    try:
        loop.call(lambda: labelling.admitted(Enclave()))
        copy = Registry()
        client = LabelRegistryClient(config.socket, copy, stats=lambda: {"queues": [0],
                                     "counters": {}})  # fmt: skip
        task = loop.call(lambda: loop.loop.create_task(client.run()))
        loop.run(client.synced.wait(), timeout=5)
        assert loop.call(lambda: copy.label(ENCLAVE.packed)) == 1
        assert "services" in loop.call(labelling.status)
        loop.call(task.cancel)
        # No hook is bound (the service is not running): fail closed.
        assert connect(topo.ns(CLIENT_A), ENCLAVE, EXTERNAL, 7001, 1.0) is None
    finally:
        loop.run(labelling.stop(remove_rules=True))
