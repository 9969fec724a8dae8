"""gateway.yaml: the operations sections (control, metrics, mode, log_format)."""

from __future__ import annotations

from pathlib import Path

import pytest

from seng_fw.gateway.config import DEFAULT_CONTROL_SOCKET, GatewayConfig, load_gateway_config
from seng_fw.policy.yamlfile import ConfigError

BASE = """\
tls: {certificate: server.pem, key: server.key}
attestation: {roots: [root.pem]}
policy: policy.yaml
"""


def load(tmp_path: Path, extra: str = "") -> GatewayConfig:
    path = tmp_path / "gateway.yaml"
    path.write_text(BASE + extra)
    return load_gateway_config(path)


def error(tmp_path: Path, extra: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, extra)
    return str(caught.value)


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path)
    assert config.mode == "per_app"
    assert config.log_format == "text"
    assert config.control.socket == DEFAULT_CONTROL_SOCKET
    assert config.control.mode == 0o660
    assert config.control.group is None
    assert config.metrics.listen is None
    assert config.metrics.address is None


def test_all_sections(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "mode: shared\nlog_format: json\n"
        "control: {socket: run/ctl.sock, mode: 0620, group: adm}\n"
        "metrics: {listen: '127.0.0.1:9108'}\n",
    )
    assert config.mode == "shared"
    assert config.log_format == "json"
    # Relative like every other path: against the file's directory.
    assert config.control.socket == tmp_path / "run" / "ctl.sock"
    assert config.control.mode == 0o620
    assert config.control.group == "adm"
    assert config.metrics.address == ("127.0.0.1", 9108)


@pytest.mark.parametrize("text", ["'0o600'", "'600'", "0600"])
def test_mode_in_octal(tmp_path: Path, text: str) -> None:
    assert load(tmp_path, f"control: {{mode: {text}}}\n").control.mode == 0o600


@pytest.mark.parametrize(
    ("extra", "line", "field", "words"),
    [
        # 660 without the leading 0 is decimal 660 = 0o1224: not a permission mode.
        ("control:\n  mode: 660\n", 5, "control.mode", "write it in octal"),
        ("control:\n  mode: 0666\n", 5, "control.mode", "every local user"),
        ("control:\n  mode: '0o6x0'\n", 5, "control.mode", "not an octal mode"),
        ("control:\n  mode: 0600\n  group: adm\n", 5, "control", "no write access"),
        (
            "control:\n  group: 'Bad Group'\n",
            5,
            "control.group",
            "'Bad Group' is not valid: a group name",
        ),
        ("metrics:\n  listen: 'localhost:9108'\n", 5, "metrics.listen", "not an IPv4"),
        ("metrics:\n  listen: '127.0.0.1'\n", 5, "metrics.listen", "ADDRESS:PORT"),
        ("metrics:\n  listen: '127.0.0.1:70000'\n", 5, "metrics.listen", "ADDRESS:PORT"),
        ("mode: bridged\n", 4, "mode", "per_app"),
        ("log_format: xml\n", 4, "log_format", "json"),
        (
            "control:\n  sockett: /x\n",
            5,
            "control.sockett",
            "unknown key 'sockett' (did you mean 'socket'?)",
        ),
    ],
)
def test_errors_name_file_line_and_field(
    tmp_path: Path, extra: str, line: int, field: str, words: str
) -> None:
    message = error(tmp_path, extra)
    assert f"gateway.yaml:{line}: {field}:" in message
    assert words in message
