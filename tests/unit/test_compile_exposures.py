"""Exposed services keep their own `from` lists (issue 13, defect 1).

Several exposures on one gateway address and protocol may forward to the same enclave
port (`to_port`); each must admit only its own sources. The ruleset's `expose_from`
set is keyed by the connection's original destination (gateway address and port), so
these tests model a DNATed connection by that destination (`decide(..., dnat=...)`).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from seng_fw.compile.compiler import compile_policy
from seng_fw.policy.models import Policy
from tests.unit.test_compile_ruleset import decide

GATEWAY = "10.77.2.1"
ADMIN = "10.77.2.5"


def _app(index: int, expose: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": f"app{index}",
        "mrenclave": f"{index + 1:064x}",
        "hosts": "10.77.1.0/24",
        "subnet": {"subnet": f"172.16.{index}.0/24"},
        "expose": expose,
    }


def _enclave(index: int) -> str:
    return f"172.16.{index}.10"


def test_exposures_with_the_same_enclave_port_keep_their_own_sources() -> None:
    """X: gateway port 8001 -> X:8080 from one admin host; Y: 8002 -> Y:8080 from a /24;
    Z: 8003 -> Z:8080 and 8004 -> Z:8080 (one app, two exposures), from different hosts."""
    policy = Policy.model_validate(
        {
            "apps": [
                _app(0, [{"address": GATEWAY, "port": 8001, "to_port": 8080, "from": ADMIN}]),
                _app(
                    1, [{"address": GATEWAY, "port": 8002, "to_port": 8080, "from": "10.77.3.0/24"}]
                ),
                _app(
                    2,
                    [
                        {"address": GATEWAY, "port": 8003, "to_port": 8080, "from": "10.77.4.1"},
                        {"address": GATEWAY, "port": 8004, "to_port": 8080, "from": "10.77.4.2"},
                        {"address": GATEWAY, "port": 8080, "from": "10.77.4.3"},
                    ],
                ),
            ]
        }
    )
    table = compile_policy(policy)

    def reaches(src: str, app: int, port: int) -> bool:
        return decide(table, src, _enclave(app), "tcp", 8080, dnat=(GATEWAY, port))

    assert reaches(ADMIN, 0, 8001)
    assert not reaches("10.77.3.7", 0, 8001)  # Y's sources, through X's exposure
    assert reaches("10.77.3.7", 1, 8002)
    assert not reaches(ADMIN, 1, 8002)
    assert reaches("10.77.4.1", 2, 8003) and not reaches("10.77.4.1", 2, 8004)
    assert reaches("10.77.4.2", 2, 8004) and not reaches("10.77.4.2", 2, 8003)
    assert reaches("10.77.4.3", 2, 8080) and not reaches("10.77.4.1", 2, 8080)
    # the rule keys on the original destination port, not the port after DNAT
    assert "ct original proto-dst @expose_from" in table.text()


_NETWORKS = st.builds(
    lambda third, fourth, length: IPv4Network(f"10.77.{third}.{fourth}/{length}", strict=False),
    st.integers(2, 5),
    st.integers(0, 255),
    st.sampled_from([24, 28, 30, 32]),
)
_EXPOSURE = st.tuples(
    st.sampled_from(["10.77.2.1", "10.77.2.254"]),  # gateway address
    st.sampled_from(["tcp", "udp"]),
    st.integers(8000, 8005),  # gateway port
    st.sampled_from([80, 443, 8080]),  # enclave port: often shared
    st.lists(_NETWORKS, min_size=1, max_size=3),  # from
    st.integers(0, 3),  # app
)


@settings(max_examples=60, deadline=None)
@given(
    exposures=st.lists(_EXPOSURE, min_size=1, max_size=8, unique_by=lambda e: (e[0], e[1], e[2])),
    sources=st.lists(
        st.builds(lambda a, b: f"10.77.{a}.{b}", st.integers(2, 5), st.integers(0, 255)),
        min_size=1,
        max_size=12,
    ),
)
def test_no_exposure_admits_a_source_outside_its_own_from(
    exposures: list[tuple[str, str, int, int, list[IPv4Network], int]], sources: list[str]
) -> None:
    by_app: dict[int, list[dict[str, Any]]] = {index: [] for index in range(4)}
    for address, protocol, port, to_port, from_, app in exposures:
        by_app[app].append(
            {
                "address": address,
                "protocol": protocol,
                "port": port,
                "to_port": to_port,
                "from": [str(net) for net in from_],
            }
        )
    policy = Policy.model_validate({"apps": [_app(i, e) for i, e in by_app.items()]})
    table = compile_policy(policy)
    for address, protocol, port, to_port, from_, app in exposures:
        for source in sources:
            allowed = any(IPv4Address(source) in net for net in from_)
            got = decide(table, source, _enclave(app), protocol, to_port, dnat=(address, port))
            assert got is allowed, (source, address, protocol, port)
