"""Inputs that crashed a parser under fuzzing (tests/fuzz), each now refused with the
parser's documented error. The inputs are also in tests/fuzz/<target>/crash-*."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from seng_fw.attest.collateral import CollateralError, parse_bundle
from seng_fw.label.registry import Registry, apply_line, parse_stats
from seng_fw.ops.control import ControlServer
from seng_fw.policy.loader import load_policy
from seng_fw.policy.yamlfile import ConfigError, load_yaml

FUZZ = Path(__file__).parent.parent / "fuzz"
DEEP_JSON = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        ("apps:\n  - name: !!int 0x\n", 2, "apps[0].name: bad value '0x'"),
        ("a: !!timestamp 2020-13-45\n", 1, "a: bad value '2020-13-45'"),
        ("a: !!float abc\n", 1, "a: bad value 'abc'"),
        ("a: !!timestamp 2020-1\n", 1, "a: bad value '2020-1'"),  # AttributeError
        ("a:\n  b: !!bool maybe\n", 2, "a.b: bad value 'maybe'"),
        ("a: !!binary é\n", 1, "a: bad value 'é'"),
        # PyYAML's ConstructorError for a tag the safe constructor does not know.
        ("a: !!python/name:os.system x\n", 1, "a: bad value 'x'"),
        ("a: !custom x\n", 1, "a: bad value 'x'"),
    ],
)
def test_a_bad_tagged_scalar_is_a_config_error(
    tmp_path: Path, text: str, line: int, expected: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_yaml(path)
    assert f"policy.yaml:{line}: {expected}" in str(caught.value)


def test_yaml_nested_deeper_than_python_recursion_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("[" * 1000 + "]" * 1000)  # libyaml's limit is 1000 flow levels
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_policy(path)


def test_control_request_nested_too_deeply_is_refused_not_an_internal_error() -> None:
    server = ControlServer(None, Path("/nonexistent/control.sock"))  # type: ignore[arg-type]
    answer = asyncio.run(server.respond(DEEP_JSON))
    assert answer == {"ok": False, "error": "not a JSON request: nested too deeply"}


def test_label_lines_nested_too_deeply_are_malformed() -> None:
    assert parse_stats(DEEP_JSON) is None
    with pytest.raises(ValueError, match="malformed registry message"):
        apply_line(Registry(), DEEP_JSON)


def test_collateral_with_a_malformed_crl_issuer_is_a_collateral_error() -> None:
    """The genuine collateral with the PCK CRL's issuer CN re-tagged as a BOOLEAN:
    cryptography loads the CRL and fails only when the issuer is read."""
    data = (FUZZ / "dcap_collateral" / "crash-lazy-crl-issuer").read_bytes()
    with pytest.raises(CollateralError, match="pck_crl is not a DER CRL"):
        parse_bundle(data)
