"""The policy language: rules, peers, ports, enclave subnets (one validation rule with ipam)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pydantic
import pytest

from seng_fw.policy import ipam, labels, models
from seng_fw.policy.loader import load_policy
from seng_fw.policy.models import (
    EgressRule,
    EnclaveSubnet,
    Exposure,
    IngressRule,
    Policy,
    Ref,
    cross_check,
)

ROOT = Path(__file__).resolve().parents[2]


def app(name: str, mrenclave: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "mrenclave": mrenclave * 64, "hosts": "10.77.1.0/24", **fields}


def test_egress_rule_forms() -> None:
    rule = EgressRule.model_validate(
        {
            "to": ["10.1.2.3", "10.2.0.0/16", {"app": "web"}, {"category": "db"}],
            "protocol": "tcp",
            "ports": [443, "8000-8080", " 9000 "],
        }
    )
    assert rule.to == [
        IPv4Network("10.1.2.3/32"),
        IPv4Network("10.2.0.0/16"),
        Ref("app", "web"),
        Ref("category", "db"),
    ]
    assert rule.ports == [(443, 443), (8000, 8080), (9000, 9000)]
    single = EgressRule.model_validate({"to": "0.0.0.0/0", "protocol": "udp", "ports": 53})
    assert single.to == [IPv4Network("0.0.0.0/0")] and single.ports == [(53, 53)]
    assert EgressRule.model_validate({"to": "10.0.0.0/8", "protocol": "any"}).ports == []


@pytest.mark.parametrize(
    "bad",
    [
        {"to": [], "protocol": "tcp"},  # names nobody
        {"to": "10.0.0.0/8", "protocol": "tcp", "ports": [True]},
        {"to": "10.0.0.0/8", "protocol": "tcp", "ports": ["80-"]},
        {"to": "10.0.0.0/8", "protocol": "tcp", "ports": [0]},
        {"to": "10.0.0.0/8", "protocol": "any", "ports": [80]},
        {"to": {"app": "Web"}, "protocol": "tcp"},  # not a valid name
        {"to": {"app": "a", "category": "b"}, "protocol": "tcp"},
        {"to": "10.0.0.0/8"},  # protocol is required
    ],
)
def test_bad_rules(bad: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        EgressRule.model_validate(bad)


def test_ingress_uses_from() -> None:
    rule = IngressRule.model_validate({"from": {"app": "web"}, "protocol": "icmp"})
    assert rule.from_ == [Ref("app", "web")]
    exposure = Exposure.model_validate({"address": "10.77.2.1", "port": 8443, "from": "0.0.0.0/0"})
    assert (exposure.protocol, exposure.target_port) == ("tcp", 8443)


def test_enclave_subnet_follows_ipam() -> None:
    default = EnclaveSubnet(subnet=IPv4Network("192.168.29.0/24"))
    assert default.gateway_address == IPv4Address("192.168.29.1")
    assert default.to_ipam() == ipam.EnclaveSubnet.parse("192.168.29.0/24")
    # /31: both addresses are hosts (RFC 3021); the gateway takes one, enclaves the other
    p2p = EnclaveSubnet(subnet=IPv4Network("10.9.0.0/31"))
    assert p2p.gateway_address == IPv4Address("10.9.0.0")
    assert ipam.AddressPool(p2p.to_ipam()).capacity == 1
    custom = EnclaveSubnet(subnet=IPv4Network("10.9.0.0/30"), gateway=IPv4Address("10.9.0.2"))
    assert custom.to_ipam().gateway == IPv4Address("10.9.0.2")


@pytest.mark.parametrize(
    ("subnet", "gateway", "message"),
    [
        ("10.9.0.7/32", None, "leaves no address for enclaves"),
        ("10.9.0.0/24", "10.9.0.0", "not a host address"),
        ("10.9.0.0/24", "10.9.0.255", "not a host address"),
        ("10.9.0.0/24", "10.9.1.1", "not a host address"),
    ],
)
def test_bad_enclave_subnets(subnet: str, gateway: str | None, message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        EnclaveSubnet.model_validate({"subnet": subnet, "gateway": gateway})


def test_policy_helpers() -> None:
    policy = Policy.model_validate(
        {
            "categories": {"web": {}},
            "apps": [
                app("a", "a", categories="web", subnet={"subnet": "10.9.0.0/24"}),
                app("b", "b", categories=["web"], log_refused=True),
                app("c", "c"),
            ],
        }
    )
    assert [a.name for a in policy.members("web")] == ["a", "b"]
    assert policy.subnet_of(policy.app("b")) is policy.shared_subnet
    assert [s.subnet for s in policy.enclave_subnets()] == [
        IPv4Network("192.168.28.0/24"),
        IPv4Network("10.9.0.0/24"),
    ]
    assert [policy.logs_refused(a) for a in policy.apps] == [False, True, False]
    assert cross_check(policy) == []


def test_too_many_apps(monkeypatch: pytest.MonkeyPatch) -> None:
    # App ids take 16 bits of the conntrack mark; 65536 real apps would be slow to build.
    monkeypatch.setattr(models, "MAX_APPS", 1)
    big = Policy.model_validate({"apps": [app("a", "a"), app("b", "b")]})
    assert cross_check(big) == [(("apps",), "2 apps: at most 1 are supported")]


@pytest.mark.parametrize("path", ["policies/example.yaml", "policies/split-example"])
def test_example_policies_are_valid(path: str) -> None:
    policy = load_policy(ROOT / path)
    assert policy.apps


def test_example_has_the_seng_demo_apps() -> None:
    policy = load_policy(ROOT / "policies/example.yaml")
    demo, nginx = policy.app("demo-enclave"), policy.app("sdk-nginx")
    assert demo.mrenclave[0].hex().startswith("8795db4c")
    assert nginx.mrenclave[0].hex().startswith("7c6ca940")
    assert demo.subnet is not None and str(demo.subnet.subnet) == "192.168.28.0/24"
    assert nginx.subnet is not None and str(nginx.subnet.subnet) == "172.16.28.0/26"


def test_host_selectors() -> None:
    rule = EgressRule.model_validate(
        {
            "to": [
                {"host": "10.77.1.20/32"},
                {"app": "web", "host": "10.77.1.0/25"},
                {"category": "db", "host": " 10.77.1.20 "},
            ],
            "protocol": "tcp",
            "on_hosts": "10.77.1.0/24",
        }
    )
    a20, low_half = IPv4Network("10.77.1.20/32"), IPv4Network("10.77.1.0/25")
    assert rule.to == [Ref(None, "", a20), Ref("app", "web", low_half), Ref("category", "db", a20)]
    assert [str(peer) for peer in rule.to] == [
        "enclaves on hosts 10.77.1.20/32",
        "app 'web' on hosts 10.77.1.0/25",
        "category 'db' on hosts 10.77.1.20/32",
    ]
    assert rule.on_hosts == [IPv4Network("10.77.1.0/24")]


@pytest.mark.parametrize(
    "peer",
    [
        {"app": "a", "category": "b", "host": "10.0.0.0/8"},
        {"host": "10.0.0.1/8"},  # host bits set
        {"host": 5},
        {"host": "web"},
        {},
    ],
)
def test_bad_host_selectors(peer: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        EgressRule.model_validate({"to": peer, "protocol": "tcp"})


def test_shared_subnet_apps_as_sources_and_host_prefixes() -> None:
    """With the labeller's marks, shared-subnet apps can be sources; the host prefixes
    that rules name (selectors, on_hosts, exposures) make the label table's classes."""
    policy = Policy.model_validate(
        {
            "categories": {"web": {"egress": [{"to": "0.0.0.0/0", "protocol": "tcp",
                                               "on_hosts": "10.77.1.0/25"}]}},
            "apps": [
                app("a", "a", subnet={"subnet": "10.9.0.0/24"},
                    ingress=[{"from": [{"app": "b"}, {"category": "web", "host": "10.77.1.8/29"}],
                              "protocol": "tcp"}],
                    expose=[{"address": "10.77.2.1", "port": 80,
                             "from": {"host": "10.77.1.20/32"}}]),
                app("b", "b", categories="web"),
            ],
        }
    )  # fmt: skip
    assert cross_check(policy) == []
    assert policy.host_prefixes() == [
        IPv4Network("10.77.1.0/25"),
        IPv4Network("10.77.1.8/29"),
        IPv4Network("10.77.1.20/32"),
    ]


def test_too_many_label_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each app has a label id per class of client hosts that the rules' prefixes cut."""
    monkeypatch.setattr(labels, "MAX_ID", 3)
    rule = {"from": {"host": "10.77.1.0/25"}, "protocol": "tcp"}
    policy = Policy.model_validate(
        {"apps": [app("a", "a", ingress=[rule]), app("b", "b")]}  # 2 apps x 2 classes
    )
    assert cross_check(policy) == [(("apps",), "more than 3 label ids (apps x host classes): "
                                    "name fewer client-host prefixes in rules")]  # fmt: skip


def test_model_dump_of_app_and_category_peers_warns_nothing() -> None:
    """Issue 13 defect 8: `policy_digest` (model_dump) warned
    PydanticSerializationUnexpectedValue for every `{app:}` peer, into the journal at every
    start. pytest runs with filterwarnings = error; this says so explicitly too."""
    import warnings

    from seng_fw.gateway.service import policy_digest

    root = Path(__file__).resolve().parents[2]
    for name in ("policies/example.yaml", "policies/lab/demo-shared.yaml"):
        policy = load_policy(root / name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            digest = policy_digest(policy)
            dumped = policy.model_dump(mode="python")
        assert len(digest) == 64
        peers = [peer for app in dumped["apps"] for rule in app["egress"] for peer in rule["to"]]
        assert any(isinstance(peer, dict) and set(peer) & {"app", "category"} for peer in peers)
        assert all(isinstance(peer, str | dict) for peer in peers)
