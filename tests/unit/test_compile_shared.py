"""Rules on the shared subnet: enclaves told apart by the labeller's conntrack marks.

POLICY has a rule for each `-m seng` match of the original SENG (`--src-app`,
`--dst-app`, `--src-cat`, `--dst-cat`, `--src-host`, `--dst-host`), and rules that
name enclaves of the shared subnet as peers, also from an app with its own subnet.
tests/integration/test_nft_apply.py sends real packets through the same policy.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
import yaml

from seng_fw.compile.compiler import GROUP_SIZE, _Labels, compile_policy, label_table
from seng_fw.compile.nft import Table
from seng_fw.label.marks import NONE, UNKNOWN, LabelTable, encode
from seng_fw.policy.loader import load_policy
from seng_fw.policy.models import Policy
from tests.unit.test_compile_ruleset import decide

ROOT = Path(__file__).resolve().parents[2]
HOST_A, HOST_B = IPv4Address("10.77.1.10"), IPv4Address("10.77.1.20")
EXT = "10.77.2.2"
# enclave address -> (app, client host); FREE_A is a shared address no enclave holds
WEB_A, API_A, FREE_A = "192.168.29.10", "192.168.29.11", "192.168.29.12"
WEB_B, DB_B = "192.168.29.20", "192.168.29.21"
OWN = "192.168.28.10"  # app `own`, with its own subnet
ENCLAVES = {
    WEB_A: ("web", HOST_A),
    API_A: ("api", HOST_A),
    WEB_B: ("web", HOST_B),
    DB_B: ("db", HOST_B),
    OWN: ("own", HOST_A),
}

POLICY_YAML = """\
gateway_networks: [10.77.1.0/24, 10.77.2.0/24]
shared_subnet: {subnet: 192.168.29.0/24}
categories:
  frontend:
    ingress:
      - {from: 10.77.2.0/24, protocol: tcp, ports: 8081}              # --dst-cat frontend
  backend:
    egress:
      - {to: 10.77.2.2, protocol: tcp, ports: 7002}                   # --src-cat backend
  everyone:
    egress:
      - {to: 10.77.2.2, protocol: tcp, ports: 7003, on_hosts: 10.77.1.10/32}  # --src-host A
      - {to: {category: backend, host: 10.77.1.20/32}, protocol: tcp, ports: 5433}
      - {to: {app: own}, protocol: tcp, ports: [443, 9001]}
    ingress:
      - {from: 10.77.2.0/24, protocol: tcp, ports: 8082, on_hosts: 10.77.1.20/32}  # --dst-host B
apps:
  - name: web
    mrenclave: "01"
    hosts: 10.77.1.0/24
    categories: [frontend, everyone]
    egress:
      - {to: 10.77.2.2, protocol: tcp, ports: 7001}                   # --src-app web
    ingress:
      - {from: 10.77.2.0/24, protocol: tcp, ports: 8080}              # --dst-app web
      - {from: {app: own}, protocol: tcp, ports: 9000}
  - name: api
    mrenclave: "02"
    hosts: 10.77.1.10/32
    categories: [frontend, backend, everyone]
    egress:
      - {to: {app: db}, protocol: tcp, ports: 5432}                   # --dst-app db
  - name: db
    mrenclave: "03"
    hosts: 10.77.1.0/24
    categories: [backend, everyone]
    ingress:
      - {from: {app: api}, protocol: tcp, ports: 5432}                # --src-app api
      - {from: {host: 10.77.1.10/32}, protocol: tcp, ports: 5433}     # --src-host A
      - {from: 0.0.0.0/0, protocol: tcp, ports: 9000}
  - name: own
    mrenclave: "04"
    hosts: 10.77.1.0/24
    subnet: {subnet: 192.168.28.0/24}
    categories: [everyone]          # its on_hosts rules do not reach an own subnet
    egress:
      - {to: {app: web}, protocol: tcp, ports: 9000}
    ingress:
      - {from: {category: backend}, protocol: tcp, ports: 9001}
    expose:
      - {address: 10.77.2.1, port: 8443, to_port: 443, from: {app: db, host: 10.77.1.20/32}}
"""


# mrenclave "01" stands for 32 bytes 0x01
POLICY_TEXT = re.sub(r'mrenclave: "(\d\d)"', lambda m: f'mrenclave: "{m[1] * 32}"', POLICY_YAML)
POLICY = Policy.model_validate(yaml.safe_load(POLICY_TEXT))
LABELS = label_table(POLICY)


def label(address: str) -> int:
    """The label the labeller gives an address: its enclave's, UNKNOWN for a free shared
    address, NONE outside enclave subnets."""
    if address in ENCLAVES:
        app, host = ENCLAVES[address]
        return LABELS.label_id(app, host)
    return UNKNOWN if IPv4Address(address) in IPv4Network("192.168.29.0/24") else NONE


def mark(src: str, dst: str) -> int:
    return encode(label(src), label(dst))


# (source, destination, port, allowed); every flow is TCP
FLOWS = [
    # --src-app web
    (WEB_A, EXT, 7001, True), (WEB_B, EXT, 7001, True),
    (API_A, EXT, 7001, False), (DB_B, EXT, 7001, False), (FREE_A, EXT, 7001, False),
    # --src-cat backend (api, db)
    (API_A, EXT, 7002, True), (DB_B, EXT, 7002, True), (WEB_A, EXT, 7002, False),
    # --src-host A (a category's rule with on_hosts; `own` has its own subnet: not reached)
    (WEB_A, EXT, 7003, True), (API_A, EXT, 7003, True),
    (WEB_B, EXT, 7003, False), (DB_B, EXT, 7003, False), (OWN, EXT, 7003, False),
    # --dst-app web
    (EXT, WEB_A, 8080, True), (EXT, WEB_B, 8080, True),
    (EXT, API_A, 8080, False), (EXT, FREE_A, 8080, False),
    # --dst-cat frontend (web, api)
    (EXT, WEB_A, 8081, True), (EXT, API_A, 8081, True), (EXT, DB_B, 8081, False),
    # --dst-host B
    (EXT, WEB_B, 8082, True), (EXT, DB_B, 8082, True),
    (EXT, WEB_A, 8082, False), (EXT, OWN, 8082, False),
    # enclave to enclave: api's egress to app db and db's ingress from app api
    (API_A, DB_B, 5432, True), (WEB_A, DB_B, 5432, False), (API_A, WEB_B, 5432, False),
    # to category backend on host B, and db's ingress from any enclave on host A
    (WEB_A, DB_B, 5433, True), (API_A, DB_B, 5433, True),
    (WEB_A, WEB_B, 5433, False),  # web is not in backend
    (OWN, DB_B, 5433, False),  # own's egress allows it, but own is no enclave of host A
    (WEB_B, DB_B, 5433, False),  # not from host A
    # an app with its own subnet to a shared-subnet app, and its ingress from a category
    (OWN, WEB_B, 9000, True), (OWN, WEB_A, 9000, True),
    (OWN, DB_B, 9000, False),  # db admits anyone on 9000, but own's egress names web only
    (DB_B, OWN, 9001, True), (API_A, OWN, 9001, True), (WEB_B, OWN, 9001, False),
]  # fmt: skip


@pytest.fixture(scope="module")
def table() -> Table:
    return compile_policy(POLICY)


@pytest.mark.parametrize(("src", "dst", "port", "allowed"), FLOWS)
def test_flows(table: Table, src: str, dst: str, port: int, allowed: bool) -> None:
    assert decide(table, src, dst, "tcp", port, mark=mark(src, dst)) is allowed


@pytest.mark.parametrize(("src", "dst", "port", "allowed"), [f for f in FLOWS if f[3]])
def test_unlabelled_connections_are_refused(
    table: Table, src: str, dst: str, port: int, allowed: bool
) -> None:
    """Without the labeller's mark only flows between an own subnet and the outside could
    pass, and this policy has none."""
    assert not decide(table, src, dst, "tcp", port, mark=0)


def test_exposure_from_shared_subnet_enclaves(table: Table) -> None:
    """An exposed service admits sources by their label too (the originator's half)."""
    for src, allowed in ((DB_B, True), (WEB_B, False), (API_A, False), (EXT, False)):
        got = decide(table, src, OWN, "tcp", 443, mark=mark(src, OWN), dnat=("10.77.2.1", 8443))
        assert got is allowed, src


def test_label_ids_follow_the_host_prefixes_the_rules_name() -> None:
    assert POLICY.host_prefixes() == [IPv4Network("10.77.1.10/32"), IPv4Network("10.77.1.20/32")]
    expected = LabelTable.from_policy(POLICY, POLICY.host_prefixes())
    assert [LABELS.info(i) for i in range(1, 20)] == [expected.info(i) for i in range(1, 20)]
    # host classes: 10.77.1.0-9, .10, .11-19, .20, .21-255 (web and db reach all five)
    assert LABELS.select(apps=["web"]) == [(1, 5)] and LABELS.select(apps=["api"]) == [(6, 6)]
    assert LABELS.label_id("web", HOST_A) == 2 and LABELS.label_id("db", HOST_B) == 10


@pytest.mark.parametrize("policy", [POLICY, load_policy(ROOT / "policies/example.yaml")])
def test_the_compilers_index_of_labels_agrees_with_the_labeller(policy: Policy) -> None:
    table = label_table(policy)
    index = _Labels(table)
    names = [app.name for app in policy.apps]
    for host in [None, *policy.host_prefixes()]:
        for apps in [[name] for name in names] + [names, names[1:], []]:
            assert index.select(apps, host) == table.select(apps=apps, host=host)


def test_compiled_shapes(table: Table) -> None:
    """The chains and sets of a shared-subnet app: one lookup keyed on both labels."""
    assert table.set("egress_labels").elements == [((1, 5),), ((6, 6),), ((7, 11),)]
    assert table.set("egress_labels").values == ["goto out_web", "goto out_api", "goto out_db"]
    assert [r.text() for r in table.chain("out_web").rules] == [
        "ct mark & 0x0000ffff . meta l4proto . th dport . ip daddr . ct mark >> 16 "
        "@allowed_out_shared_0 return",
        "drop",
    ]
    assert table.chain("in_own").rules[0].text() == (
        "ip daddr . meta l4proto . th dport . ip saddr . ct mark & 0x0000ffff @allowed_in_0 return"
    )
    shared = table.set("allowed_out_shared_0")
    assert shared.key == ("mark", "inet_proto", "inet_service", "ipv4_addr", "mark")
    texts = [text for _, text in shared.rendered_elements()]
    # api -> app db (ids 7-11) on the shared subnet
    assert "0x00000006 . tcp . 5432 . 192.168.29.0/24 . 0x00000007-0x0000000b" in texts
    # web on host A (id 2) -> anything on 7003
    assert "0x00000002 . tcp . 7003 . 10.77.2.2 . 0x00000000-0x0000ffff" in texts
    # counters by label, both directions
    assert table.set("tx_labels").values == ["tx_web", "tx_api", "tx_db"]
    assert table.set("rx_labels").elements == table.set("egress_labels").elements
    assert [r.text() for r in table.chain("count_reply").rules] == [
        "counter name ct mark >> 16 map @tx_labels",
        "counter name ct mark & 0x0000ffff map @rx_labels",
    ]


def _apps(own: int, shared: int) -> Policy:
    def app(i: int, subnet: bool) -> dict[str, object]:
        return {
            "name": f"{'o' if subnet else 's'}{i}",
            "mrenclave": f"{i + (0 if subnet else 10**6):064x}",
            "hosts": "10.77.1.0/24",
            **({"subnet": {"subnet": f"10.{100 + i // 256}.{i % 256}.0/24"}} if subnet else {}),
            "egress": [{"to": "10.77.2.0/24", "protocol": "tcp", "ports": i + 1}],
        }

    apps = [app(i, True) for i in range(own)] + [app(i, False) for i in range(shared)]
    return Policy.model_validate({"apps": apps})


def test_apps_share_rule_sets_in_groups() -> None:
    table = compile_policy(_apps(GROUP_SIZE + 1, 2 * GROUP_SIZE))
    rule_sets = sorted(s.name for s in table.sets if s.name.startswith("allowed_"))
    assert rule_sets == [
        "allowed_out_0",
        "allowed_out_1",
        "allowed_out_shared_0",
        "allowed_out_shared_1",
    ]
    # no rule names enclaves of the shared subnet: no peer label in the key
    assert table.set("allowed_out_0").key == (
        "ipv4_addr",
        "inet_proto",
        "inet_service",
        "ipv4_addr",
    )
    assert table.chain("out_o0").rules[0].text() == (
        "ip saddr . meta l4proto . th dport . ip daddr @allowed_out_0 return"
    )
    # each set holds the rules of its apps only: one element per app here
    assert len(table.set("allowed_out_0").elements) == GROUP_SIZE
    assert len(table.set("allowed_out_1").elements) == 1
    assert len(table.set("allowed_out_shared_1").elements) == GROUP_SIZE
    assert table.chain(f"out_o{GROUP_SIZE}").rules[0].text().endswith("@allowed_out_1 return")
    assert table.chain("out_s0").rules[0].text().endswith("@allowed_out_shared_0 return")
    # and each app gets exactly its own rule (app sN allows port N + 1)
    policy = _apps(0, GROUP_SIZE + 10)
    grouped = compile_policy(policy)
    shared_address = "192.168.28.10"  # the default shared subnet
    s70 = encode(LabelTable.from_policy(policy).label_id("s70", HOST_A), NONE)
    for port in (70, 71, 72):
        assert decide(grouped, shared_address, EXT, "tcp", port, mark=s70) is (port == 71)


def test_the_policy_loads_from_yaml(tmp_path: Path) -> None:
    """The loader (file, line numbers and all) reads the same policy."""
    path = tmp_path / "shared.yaml"
    path.write_text(POLICY_TEXT)
    assert load_policy(path) == POLICY
