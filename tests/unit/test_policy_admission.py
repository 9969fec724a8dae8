"""Policy loading (errors name file, line and field) and admission decisions."""

from __future__ import annotations

from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from seng_fw.attest.identity import EnclaveIdentity
from seng_fw.policy.admission import Admission, AdmissionRejected
from seng_fw.policy.loader import load_policy
from seng_fw.policy.yamlfile import ConfigError

MR_A = "a" * 64
MR_B = "b" * 64
SIGNER = "5" * 64

POLICY = f"""\
apps:
  - name: webapp
    mrenclave: {MR_A}
    mrsigner: {SIGNER}
    min_isv_svn: 2
    hosts: [10.77.1.0/24]
    subnet: {{subnet: 192.168.29.0/24}}
  - name: nginx
    mrenclave: [{MR_B}]
    allow_debug: true
    isv_prod_id: 7
    hosts: [10.77.1.20/32]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def _identity(mrenclave: str, **changes: object) -> EnclaveIdentity:
    fields: dict[str, object] = dict(
        mrenclave=bytes.fromhex(mrenclave),
        mrsigner=bytes.fromhex(SIGNER),
        isv_prod_id=7,
        isv_svn=3,
        debug=False,
        quote_status="OK",
        timestamp=datetime(2026, 1, 1, tzinfo=UTC),
        report_data=bytes(64),
    )
    fields.update(changes)
    return EnclaveIdentity(**fields)  # type: ignore[arg-type]


def test_valid_policy_loads_with_defaults(tmp_path: Path) -> None:
    policy = load_policy(_write(tmp_path, POLICY))
    webapp, nginx = policy.apps
    assert policy.subnet_of(webapp).subnet == IPv4Network("192.168.29.0/24")
    assert policy.subnet_of(webapp).gateway == IPv4Address("192.168.29.1")
    assert policy.subnet_of(nginx).subnet == IPv4Network("192.168.28.0/24")
    assert policy.subnet_of(nginx).gateway == IPv4Address("192.168.28.1")


@pytest.mark.parametrize(
    ("text", "line", "field", "message"),
    [
        (
            POLICY.replace("min_isv_svn", "min_isvsvn"),
            5,
            "apps[0].min_isvsvn",
            "unknown key 'min_isvsvn' (did you mean 'min_isv_svn'?)",
        ),
        (
            POLICY.replace(f"mrenclave: {MR_A}", "mrenclave: abc"),
            3,
            "apps[0].mrenclave[0]",
            "64 hex",
        ),
        (POLICY.replace("10.77.1.0/24", "10.77.1.0/33"), 6, "apps[0].hosts[0]", "IPv4"),
        (POLICY.replace("name: nginx", "name: webapp"), 8, "apps[1].name", "duplicate app"),
        (POLICY.replace(f"[{MR_B}]", f"[{MR_A}]"), 9, "apps[1].mrenclave[0]", "already claimed"),
        (
            POLICY.replace("192.168.29.0/24", "192.168.28.0/23"),
            7,
            "apps[0].subnet.subnet",
            "overlaps",
        ),
        (
            POLICY.replace("allow_debug: true", "allow_debug: maybe"),
            10,
            "apps[1].allow_debug",
            "must be true or false, got 'maybe'",
        ),
        (POLICY + "apps: []\n", 13, "apps", "duplicate key"),
    ],
)
def test_errors_name_file_line_and_field(
    tmp_path: Path, text: str, line: int, field: str, message: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_policy(path)
    issues = [i for i in error.value.issues if i.field == field]
    assert issues, str(error.value)
    assert issues[0].file == str(path)
    assert issues[0].line == line, str(error.value)
    assert message in issues[0].message


def test_every_error_is_reported(tmp_path: Path) -> None:
    text = POLICY.replace("min_isv_svn", "min_isvsvn").replace("allow_debug: true", "x: 1")
    with pytest.raises(ConfigError) as error:
        load_policy(_write(tmp_path, text))
    assert {i.field for i in error.value.issues} == {"apps[0].min_isvsvn", "apps[1].x"}


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_policy(_write(tmp_path, "apps:\n  - name: [unclosed\n"))
    assert error.value.issues[0].line >= 2


@pytest.fixture
def admission(tmp_path: Path) -> Admission:
    return Admission(load_policy(_write(tmp_path, POLICY)))


def test_admits_known_app_from_allowed_host(admission: Admission) -> None:
    assert admission.admit(_identity(MR_A), IPv4Address("10.77.1.10")).name == "webapp"
    assert admission.admit(_identity(MR_B, debug=True), IPv4Address("10.77.1.20")).name == "nginx"


@pytest.mark.parametrize(
    ("identity", "host", "check"),
    [
        (_identity("c" * 64), "10.77.1.10", "unknown_mrenclave"),
        (_identity(MR_A, mrsigner=bytes(32)), "10.77.1.10", "mrsigner_mismatch"),
        (_identity(MR_A, isv_svn=1), "10.77.1.10", "isv_svn_too_low"),
        (_identity(MR_A, debug=True), "10.77.1.10", "debug_enclave"),
        (_identity(MR_A), "10.77.2.10", "host_not_allowed"),
        (_identity(MR_B, isv_prod_id=8), "10.77.1.20", "isv_prod_id_mismatch"),
        (_identity(MR_B), "10.77.1.21", "host_not_allowed"),
    ],
)
def test_refusals_name_the_rule(
    admission: Admission, identity: EnclaveIdentity, host: str, check: str
) -> None:
    with pytest.raises(AdmissionRejected) as refusal:
        admission.admit(identity, IPv4Address(host))
    assert refusal.value.check == check
