"""Every validation error of the policy language names the file, the line and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from seng_fw.policy.loader import load_policy
from seng_fw.policy.yamlfile import ConfigError, ConfigIssue

MR_A, MR_B, MR_C = "a" * 64, "b" * 64, "c" * 64

BASE = f"""\
gateway_networks: [10.77.1.0/24, 10.77.2.0/24]
categories:
  web:
    egress:
      - to: 0.0.0.0/0
        protocol: tcp
        ports: [80, 443]
apps:
  - name: alpha
    mrenclave: {MR_A}
    mrsigner: {"5" * 64}
    hosts: 10.77.1.0/24
    subnet: {{subnet: 192.168.30.0/24}}
    categories: [web]
    egress:
      - to: [{{app: beta}}, 10.1.0.0/16]
        protocol: tcp
        ports: [8000-8080]
  - name: beta
    mrenclave: {MR_B}
    hosts: 10.77.1.0/24
    subnet: {{subnet: 192.168.31.0/24}}
    ingress:
      - from: {{app: alpha}}
        protocol: tcp
        ports: 8080
    expose:
      - address: 10.77.2.1
        port: 8443
        to_port: 8080
        from: 0.0.0.0/0
  - name: gamma
    mrenclave: {MR_C}
    hosts: 10.77.1.0/24
"""


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based line of the `occurrence`-th line containing `needle`."""
    hits = [n for n, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(hits) >= occurrence, f"{needle!r} not in the text"
    return hits[occurrence - 1]


def last_line_of(text: str, needle: str) -> int:
    return [n for n, line in enumerate(text.splitlines(), start=1) if needle in line][-1]


def errors_of(path: Path) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as error:
        load_policy(path)
    return error.value.issues


def test_base_policy_is_valid(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(BASE)
    policy = load_policy(tmp_path / "p.yaml")
    assert [app.name for app in policy.apps] == ["alpha", "beta", "gamma"]


# (description, old, new, needle of the line at fault (in the new text), field, message)
CASES = [
    (
        "unknown key",
        "    egress:\n      - to: [{app",
        "    egres:\n      - to: [{app",
        "egres:",
        "apps[0].egres",
        "unknown key 'egres' (did you mean 'egress'?)",
    ),
    (
        "unknown key in a rule",
        "        ports: 8080",
        "        ports: 8080\n        port: 1",
        "port: 1",
        "apps[1].ingress[0].port",
        "unknown key 'port' (did you mean 'ports'?)",
    ),
    (
        "duplicate app name",
        "  - name: gamma",
        "  - name: alpha",
        "name: alpha",
        "apps[2].name",
        "duplicate app name 'alpha'",
    ),
    (
        "overlapping enclave subnets",
        "{subnet: 192.168.31.0/24}",
        "{subnet: 192.168.30.128/25}",
        "192.168.30.128/25",
        "apps[1].subnet.subnet",
        "overlaps 192.168.30.0/24 of app 'alpha'",
    ),
    (
        "enclave subnet overlapping the shared subnet",
        "{subnet: 192.168.31.0/24}",
        "{subnet: 192.168.28.64/26}",
        "192.168.28.64/26",
        "apps[1].subnet.subnet",
        "overlaps 192.168.28.0/24 of shared_subnet",
    ),
    (
        "enclave subnet overlapping the gateway's networks",
        "{subnet: 192.168.31.0/24}",
        "{subnet: 10.77.2.0/25}",
        "10.77.2.0/25",
        "apps[1].subnet.subnet",
        "overlaps the gateway's network 10.77.2.0/24",
    ),
    (
        "shared subnet overlapping the gateway's networks",
        "gateway_networks: [10.77.1.0/24, 10.77.2.0/24]",
        "gateway_networks: [10.77.1.0/24, 10.77.2.0/24]\nshared_subnet: {subnet: 10.77.1.0/24}",
        "shared_subnet:",
        "shared_subnet.subnet",
        "overlaps the gateway's network 10.77.1.0/24",
    ),
    (
        "MRENCLAVE claimed by two apps",
        f"mrenclave: {MR_C}",
        f"mrenclave: [{MR_C}, {MR_A}]",
        f"mrenclave: [{MR_C}",
        "apps[2].mrenclave[1]",
        "already claimed by app 'alpha'",
    ),
    (
        "unknown app",
        "[{app: beta}, 10.1.0.0/16]",
        "[{app: betta}, 10.1.0.0/16]",
        "{app: betta}",
        "apps[0].egress[0].to[0]",
        "unknown app 'betta'",
    ),
    (
        "unknown category of an app",
        "categories: [web]",
        "categories: [web, mail]",
        "categories: [web, mail]",
        "apps[0].categories[1]",
        "unknown category 'mail'",
    ),
    (
        "unknown category as a peer",
        "      - from: {app: alpha}",
        "      - from: [{category: admins}]",
        "{category: admins}",
        "apps[1].ingress[0].from[0]",
        "unknown category 'admins'",
    ),
    (
        "malformed MRENCLAVE",
        f"mrenclave: {MR_B}",
        "mrenclave: 0xabcdefg",
        "0xabcdefg",
        "apps[1].mrenclave[0]",
        "64 hex digits",
    ),
    (
        "malformed MRSIGNER",
        f"mrsigner: {'5' * 64}",
        f"mrsigner: {'5' * 62}",
        "mrsigner:",
        "apps[0].mrsigner",
        "64 hex digits",
    ),
    (
        "malformed prefix (host bits)",
        "10.1.0.0/16]",
        "10.1.0.1/16]",
        "10.1.0.1/16",
        "apps[0].egress[0].to[1]",
        "host bits set",
    ),
    (
        "malformed prefix (length)",
        "  - name: gamma\n    mrenclave: " + MR_C + "\n    hosts: 10.77.1.0/24",
        "  - name: gamma\n    mrenclave: " + MR_C + "\n    hosts: 10.77.1.0/33",
        "10.77.1.0/33",
        "apps[2].hosts[0]",
        "IPv4",
    ),
    (
        "malformed peer",
        "[{app: beta}, 10.1.0.0/16]",
        "[{ap: beta}, 10.1.0.0/16]",
        "{ap: beta}",
        "apps[0].egress[0].to[0]",
        "{app: NAME}, {category: NAME} or {host: PREFIX}",
    ),
    (
        "malformed host selector",
        "[{app: beta}, 10.1.0.0/16]",
        "[{app: beta, host: 10.77.1.1/24}, 10.1.0.0/16]",
        "{app: beta, host: 10.77.1.1/24}",
        "apps[0].egress[0].to[0]",
        "'10.77.1.1/24' is not an IPv4 host prefix: 10.77.1.1/24 has host bits set",
    ),
    (
        "bad port range",
        "ports: [8000-8080]",
        "ports: [8080-8000]",
        "8080-8000",
        "apps[0].egress[0].ports[0]",
        "ports are 1..65535",
    ),
    (
        "port out of range",
        "        ports: 8080",
        "        ports: 70000",
        "70000",
        "apps[1].ingress[0].ports[0]",
        "ports are 1..65535",
    ),
    (
        "ports on a protocol without ports",
        "        protocol: tcp\n        ports: 8080",
        "        protocol: icmp\n        ports: 8080",
        "      - from: {app: alpha}",
        "apps[1].ingress[0]",
        "protocol icmp has no ports",
    ),
    (
        "unknown protocol",
        "        protocol: tcp\n        ports: [80, 443]",
        "        protocol: sctp\n        ports: [80, 443]",
        "sctp",
        "categories.web.egress[0].protocol",
        "must be one of tcp, udp, icmp, any; got 'sctp'",
    ),
    (
        "subnet that leaves no address for enclaves",
        "{subnet: 192.168.31.0/24}",
        "{subnet: 192.168.31.7/32}",
        "192.168.31.7/32",
        "apps[1].subnet",
        "leaves no address for enclaves",
    ),
    (
        "gateway outside its subnet",
        "{subnet: 192.168.31.0/24}",
        "{subnet: 192.168.31.0/24, gateway: 192.168.32.1}",
        "192.168.32.1",
        "apps[1].subnet",
        "not a host address of 192.168.31.0/24",
    ),
    (
        "host selector naming an app with its own subnet",
        "      - from: {app: alpha}",
        "      - from: {app: alpha, host: 10.77.1.0/25}",
        "{app: alpha, host: 10.77.1.0/25}",
        "apps[1].ingress[0].from[0]",
        "app 'alpha' on hosts 10.77.1.0/25 never matches: the app has its own subnet",
    ),
    (
        "on_hosts in a rule of an app with its own subnet",
        "        ports: 8080\n",
        "        ports: 8080\n        on_hosts: 10.77.1.0/25\n",
        "on_hosts: 10.77.1.0/25",
        "apps[1].ingress[0].on_hosts",
        "the app has its own subnet",
    ),
    (
        "exposure inside an enclave subnet",
        "      - address: 10.77.2.1",
        "      - address: 192.168.31.1",
        "192.168.31.1",
        "apps[1].expose[0].address",
        "inside the enclave subnet",
    ),
    (
        "bad category name",
        "categories:\n  web:",
        "categories:\n  Web Mail:",
        "Web Mail:",
        "categories.Web Mail",
        "'Web Mail': a name is a lower-case letter",
    ),
    (
        "duplicate key",
        "    hosts: 10.77.1.0/24\n    subnet: {subnet: 192.168.30.0/24}",
        "    hosts: 10.77.1.0/24\n    hosts: 10.77.9.0/24\n    subnet: {subnet: 192.168.30.0/24}",
        "hosts: 10.77.9.0/24",
        "apps[0].hosts",
        "duplicate key",
    ),
]


@pytest.mark.parametrize(
    ("old", "new", "needle", "field", "message"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_error_names_file_line_and_field(
    tmp_path: Path, old: str, new: str, needle: str, field: str, message: str
) -> None:
    assert old in BASE
    text = BASE.replace(old, new, 1)
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    issues = errors_of(path)
    matching = [issue for issue in issues if issue.field == field]
    assert matching, "\n".join(map(str, issues))
    issue = matching[0]
    assert issue.file == str(path)
    assert issue.line == last_line_of(text, needle), str(issue)
    assert message in issue.message, str(issue)
    assert str(issue).startswith(f"{path}:{issue.line}: {field}: ")


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    text = BASE.replace("{app: betta}", "").replace("[{app: beta}", "[{app: betta}")
    text = text.replace("categories: [web]", "categories: [mail]").replace(
        "ports: 8080", "ports: 0"
    )
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    # Field errors come first; cross-file checks run once every file is valid.
    assert {i.field for i in errors_of(path)} == {"apps[1].ingress[0].ports[0]"}
    path.write_text(text.replace("ports: 0", "ports: 8080"))
    assert {i.field for i in errors_of(path)} == {
        "apps[0].egress[0].to[0]",
        "apps[0].categories[0]",
    }


# --- policies split over several files ---------------------------------------------

SETTINGS = """\
gateway_networks: [10.77.1.0/24]
categories:
  web:
    egress:
      - {to: 0.0.0.0/0, protocol: tcp, ports: 443}
"""
APPS = f"""\
apps:
  - name: alpha
    mrenclave: {MR_A}
    hosts: 10.77.1.0/24
    subnet: {{subnet: 192.168.30.0/24}}
    categories: [web]
"""
MORE_APPS = f"""\
# the second file
apps:
  - name: beta
    mrenclave: {MR_B}
    hosts: 10.77.1.0/24
    egress:
      - {{to: {{app: alpha}}, protocol: any}}
"""


def _split(tmp_path: Path, **files: str) -> Path:
    directory = tmp_path / "policy.d"
    directory.mkdir()
    for name, text in files.items():
        (directory / f"{name}.yaml").write_text(text)
    return directory


def test_directory_is_one_policy(tmp_path: Path) -> None:
    directory = _split(tmp_path, a_settings=SETTINGS, b_apps=APPS, c_more=MORE_APPS)
    (directory / "notes.txt").write_text("not a policy file")
    policy = load_policy(directory)
    assert [app.name for app in policy.apps] == ["alpha", "beta"]
    assert list(policy.categories) == ["web"]
    assert [str(n) for n in policy.gateway_networks] == ["10.77.1.0/24"]


def test_directory_error_names_the_right_file(tmp_path: Path) -> None:
    more = MORE_APPS.replace("{app: alpha}", "{app: alhpa}")
    directory = _split(tmp_path, a_settings=SETTINGS, b_apps=APPS, c_more=more)
    (issue,) = errors_of(directory)
    assert issue.file == str(directory / "c_more.yaml")
    assert issue.line == line_of(more, "alhpa")
    assert issue.field == "apps[0].egress[0].to[0]"


def test_duplicate_app_across_files(tmp_path: Path) -> None:
    more = MORE_APPS.replace("name: beta", "name: alpha")
    directory = _split(tmp_path, a_settings=SETTINGS, b_apps=APPS, c_more=more)
    issue = next(i for i in errors_of(directory) if "duplicate app" in i.message)
    assert issue.file == str(directory / "c_more.yaml")
    assert (issue.line, issue.field) == (line_of(more, "name: alpha"), "apps[0].name")
    # the message points at the first definition
    assert f"{directory / 'b_apps.yaml'}:{line_of(APPS, 'name: alpha')}" in issue.message


def test_duplicate_category_across_files(tmp_path: Path) -> None:
    more = "categories:\n  web: {}\n" + MORE_APPS.replace("# the second file\n", "")
    directory = _split(tmp_path, a_settings=SETTINGS, b_apps=APPS, c_more=more)
    (issue,) = errors_of(directory)
    assert (issue.file, issue.line) == (str(directory / "c_more.yaml"), 2)
    assert issue.field == "categories.web"
    assert "duplicate category 'web'" in issue.message


def test_setting_in_two_files(tmp_path: Path) -> None:
    more = "gateway_networks: [10.77.2.0/24]\n" + MORE_APPS
    directory = _split(tmp_path, a_settings=SETTINGS, b_apps=APPS, c_more=more)
    (issue,) = errors_of(directory)
    assert (issue.file, issue.line, issue.field) == (
        str(directory / "c_more.yaml"),
        1,
        "gateway_networks",
    )
    assert f"already set in {directory / 'a_settings.yaml'}:1" in issue.message


def test_field_errors_of_several_files(tmp_path: Path) -> None:
    directory = _split(
        tmp_path,
        a_settings=SETTINGS.replace("443", "0"),
        b_apps=APPS.replace("hosts:", "hostz:"),
    )
    found = {(Path(i.file).name, i.line, i.field) for i in errors_of(directory)}
    assert found == {
        ("a_settings.yaml", 5, "categories.web.egress[0].ports[0]"),
        ("b_apps.yaml", 2, "apps[0].hosts"),  # the app's line: the field is missing
        ("b_apps.yaml", 4, "apps[0].hostz"),
    }


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (issue,) = errors_of(tmp_path / "empty")
    assert "no *.yaml files" in issue.message


def test_loading_keeps_no_yaml_nodes(tmp_path: Path) -> None:
    """The gateway reloads its policy on every SIGHUP: nothing of the parse may stay
    behind (a shared constructor once kept every node tree, ~40 MB per 1,000 apps)."""
    import gc

    import yaml

    path = tmp_path / "policy.yaml"
    path.write_text(f"apps:\n  - {{name: web, mrenclave: '{'01' * 32}', hosts: 10.0.0.0/8}}\n")
    for _ in range(2):
        assert [app.name for app in load_policy(path).apps] == ["web"]
    gc.collect()
    assert not [obj for obj in gc.get_objects() if isinstance(obj, yaml.Node)]
