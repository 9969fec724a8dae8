"""Convert a database of the original SENG server into a YAML policy (`seng-fw import-db`).

Two schemas exist (sengsgx/sengsgx, `seng_server/double_tunnel_openssl/`):

- plain (`seng_db_creator.sql`):
  `enclave_subnets(id, subnet, submask, gateway)` and
  `apps(id, name, mr_enclave BLOB, mr_signer BLOB, host_subnet, host_submask,
  enc_subnet_id)`. An app name may have several rows (one per MRENCLAVE and client
  host subnet). Addresses and masks are INTEGERs holding the four network-order
  bytes read as a little-endian number (x86 `s_addr`): 192.168.28.0 is 0x001ca8c0.
- netfilter extension (`seng_netfilter_db_creator.sql`):
  `apps(id, name, mr_enclave, mr_signer)` and `categories(id, name, apps_id)`.
  That server leases every enclave an address of its default subnet
  192.168.28.0/24 and admits any client host; per-app rules were iptables rules
  (`-m seng --src-app ...`), which are not in the database.

Neither database holds firewall rules, so the imported apps may reach nothing until
egress/ingress rules are added (seng-fw denies by default); the output says so.
"""

from __future__ import annotations

import re
import sqlite3
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pydantic
import yaml

from seng_fw.policy import ipam
from seng_fw.policy.models import NAME_PATTERN, Policy, cross_check


class DbImportError(Exception):
    """What the database says cannot be expressed as a policy."""


class DbUnreadable(DbImportError):
    """Not a readable SENG database."""


def le_address(value: int) -> IPv4Address:
    """An address stored as the little-endian integer of its network-order bytes."""
    return IPv4Address(struct.pack("<I", value & 0xFFFFFFFF))


def le_network(address: int, mask: int) -> IPv4Network:
    netmask = le_address(mask)
    try:
        return IPv4Network(f"{le_address(address)}/{netmask}", strict=False)
    except ValueError as exc:
        raise DbImportError(f"bad netmask {netmask} (0x{mask:08x}): {exc}") from None


def policy_name(original: str, taken: set[str]) -> str:
    """A seng-fw name (`^[a-z][a-z0-9_-]{0,30}$`) for an original name: DemoEnclave ->
    demo-enclave, SDK-NGINX -> sdk-nginx; made unique with a number if needed."""
    text = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", original.strip()).lower()
    text = re.sub(r"[^a-z0-9_-]+", "-", text).strip("-_") or "app"
    if not text[0].isalpha():
        text = f"app-{text}"
    base, name, number = text[:28], text[:31], 2
    while name in taken:
        name, number = f"{base}-{number}", number + 1
    assert re.match(NAME_PATTERN, name)
    taken.add(name)
    return name


@dataclass
class _App:
    original: str
    ids: list[int] = field(default_factory=list)
    mrenclave: list[bytes] = field(default_factory=list)
    mrsigner: set[bytes] = field(default_factory=set)
    hosts: list[IPv4Network] = field(default_factory=list)
    subnet_ids: set[int] = field(default_factory=set)
    categories: list[str] = field(default_factory=list)


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _blob_hex(value: object, what: str, app: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != 32:
        raise DbImportError(f"app {app!r}: {what} is not a 32-byte blob: {value!r}")
    return value


def import_db(path: Path, *, allow_debug: bool = False) -> str:
    """The YAML policy equivalent to the SENG database at `path`."""
    if not path.is_file():
        raise DbUnreadable(f"{path}: {'is a directory' if path.is_dir() else 'no such file'}")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        with db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
            if "apps" not in tables:
                raise DbUnreadable(f"{path}: not a SENG database (no `apps` table)")
            if "enc_subnet_id" in _columns(db, "apps"):
                return _plain(db, path, allow_debug)
            if "categories" in tables:
                return _netfilter(db, path, allow_debug)
            raise DbUnreadable(f"{path}: unknown SENG schema (tables: {sorted(tables)})")
    except sqlite3.Error as exc:
        raise DbUnreadable(f"{path}: {exc}") from None


def _group(rows: Iterable[tuple[object, ...]]) -> dict[str, _App]:
    """Rows (id, name, mr_enclave, mr_signer, ...) grouped by app name, in id order."""
    apps: dict[str, _App] = {}
    for row in rows:
        app_id, name = int(str(row[0])), str(row[1])
        app = apps.setdefault(name, _App(name))
        app.ids.append(app_id)
        measurement = _blob_hex(row[2], "mr_enclave", name)
        if measurement not in app.mrenclave:
            app.mrenclave.append(measurement)
        app.mrsigner.add(_blob_hex(row[3], "mr_signer", name))
    for app in apps.values():
        if len(app.mrsigner) > 1:
            raise DbImportError(f"app {app.original!r} has rows with different mr_signer values")
    return apps


def _plain(db: sqlite3.Connection, path: Path, allow_debug: bool) -> str:
    subnets: dict[int, ipam.EnclaveSubnet] = {}
    for sid, net, mask, gateway in db.execute(
        "SELECT id, subnet, submask, gateway FROM enclave_subnets ORDER BY id"
    ):
        network = le_network(int(net), int(mask))
        try:
            subnets[int(sid)] = ipam.EnclaveSubnet.parse(
                network, None if gateway is None else le_address(int(gateway))
            )
        except ValueError as exc:
            raise DbImportError(f"enclave_subnets id {sid}: {exc}") from None
    rows = list(
        db.execute(
            "SELECT id, name, mr_enclave, mr_signer, host_subnet, host_submask, enc_subnet_id "
            "FROM apps ORDER BY id"
        )
    )
    apps = _group(rows)
    for row in rows:
        app = apps[str(row[1])]
        host = le_network(int(str(row[4])), int(str(row[5])))
        if host not in app.hosts:
            app.hosts.append(host)
        if int(str(row[6])) not in subnets:
            raise DbImportError(f"app {app.original!r}: enclave subnet id {row[6]} does not exist")
        app.subnet_ids.add(int(str(row[6])))
    for app in apps.values():
        if len(app.subnet_ids) > 1:
            raise DbImportError(
                f"app {app.original!r} takes addresses from several enclave subnets "
                f"(ids {sorted(app.subnet_ids)}) depending on the client host; a seng-fw app "
                "has one subnet"
            )
    users: dict[int, list[str]] = {sid: [] for sid in subnets}
    for app in apps.values():
        users[next(iter(app.subnet_ids))].append(app.original)
    shared_ids = [sid for sid, names in users.items() if len(names) > 1]
    if len(shared_ids) > 1:
        raise DbImportError(
            f"enclave subnets {shared_ids} are each used by several apps; a seng-fw policy "
            "has one shared subnet (give the other apps subnets of their own)"
        )
    notes: list[str] = []
    if shared_ids:
        shared = subnets[shared_ids[0]]
    else:
        unused = [sid for sid, names in users.items() if not names]
        if unused:
            shared = subnets[unused[0]]
        else:
            shared = _free_subnet([s.network for s in subnets.values()])
            notes += [
                "No enclave subnet of the database is shared by several apps, so this",
                "shared subnet is new and no imported app uses it: make it a free range.",
            ]
    shared_id = next((sid for sid, s in subnets.items() if s == shared), None)
    lines = _header(path, "plain SENG schema", notes)
    lines += ["gateway_networks: []  # add the gateway's own networks (LAN, external side)", ""]
    lines += [
        "shared_subnet:",
        f"  subnet: {shared.network}",
        f"  gateway: {shared.gateway}",
        "",
    ]
    for sid, names in users.items():
        if not names and sid != shared_id:
            lines.append(f"# enclave_subnets id {sid} ({subnets[sid].network}) is used by no app")
    lines.append("apps:" if apps else "apps: []")
    taken: set[str] = set()
    for app in apps.values():
        sid = next(iter(app.subnet_ids))
        own = None if sid == shared_id else subnets[sid]
        lines += _app_lines(app, policy_name(app.original, taken), own, allow_debug)
    return _validated("\n".join(lines) + "\n")


def _netfilter(db: sqlite3.Connection, path: Path, allow_debug: bool) -> str:
    apps = _group(db.execute("SELECT id, name, mr_enclave, mr_signer FROM apps ORDER BY id"))
    by_id = {app_id: app for app in apps.values() for app_id in app.ids}
    taken: set[str] = set()
    category_names: dict[str, str] = {}
    for name, app_id in db.execute("SELECT name, apps_id FROM categories ORDER BY id"):
        category = category_names.setdefault(str(name), policy_name(str(name), taken))
        app = by_id.get(int(app_id))
        if app is None:
            raise DbImportError(f"category {name!r} names app id {app_id}, which does not exist")
        if category not in app.categories:
            app.categories.append(category)
    notes = [
        "Netfilter-extension schema: its server leased every enclave an address of",
        "192.168.28.0/24 and admitted any client host (`hosts: 0.0.0.0/0`); its per-app",
        "iptables rules are not in the database. Apps on the shared subnet are told apart",
        "by the labeller's conntrack marks; give an app a `subnet` to match it by address.",
    ]
    lines = _header(path, "SENG netfilter-extension schema", notes)
    lines += ["gateway_networks: []  # add the gateway's own networks (LAN, external side)", ""]
    lines += [
        "shared_subnet:",
        f"  subnet: {ipam.DEFAULT_SUBNET}",
        f"  gateway: {ipam.DEFAULT_GATEWAY}",
        "",
    ]
    if category_names:
        lines.append("categories:")
        for original, name in category_names.items():
            lines.append(f"  {name}:")
            lines.append(f"    description: {_quote(f'imported category {original}')}")
        lines.append("")
    lines.append("apps:" if apps else "apps: []")
    app_taken: set[str] = set()
    for app in apps.values():
        app.hosts = [IPv4Network("0.0.0.0/0")]
        lines += _app_lines(app, policy_name(app.original, app_taken), None, allow_debug)
    return _validated("\n".join(lines) + "\n")


def _header(path: Path, schema: str, notes: list[str]) -> list[str]:
    lines = [
        f"# seng-fw policy imported from {path.name} ({schema}) by `seng-fw import-db`.",
        "#",
        "# The original database only says which enclaves may connect and where their",
        "# addresses come from: it holds no firewall rules. seng-fw refuses everything",
        "# that is not allowed, so add `egress` / `ingress` rules to each app (see",
        "# policies/example.yaml) before `seng-fw apply`.",
    ]
    if notes:
        lines += ["#", *(f"# {note}" for note in notes)]
    return [*lines, ""]


def _app_lines(
    app: _App, name: str, subnet: ipam.EnclaveSubnet | None, allow_debug: bool
) -> list[str]:
    lines = [f"  # original name {app.original!r}, apps.id {', '.join(map(str, app.ids))}"]
    lines.append(f"  - name: {name}")
    lines.append("    mrenclave:")
    lines += [f'      - "{m.hex()}"' for m in app.mrenclave]
    lines.append(f'    mrsigner: "{next(iter(app.mrsigner)).hex()}"')
    if allow_debug:
        lines.append("    allow_debug: true  # as the original server")
    else:
        lines.append(
            "    allow_debug: false  # the original admitted DEBUG enclaves (--allow-debug)"
        )
    if app.categories:
        lines.append(f"    categories: [{', '.join(app.categories)}]")
    lines.append(f"    hosts: [{', '.join(str(h) for h in app.hosts)}]")
    if subnet is not None:
        lines.append(f"    subnet: {{subnet: {subnet.network}, gateway: {subnet.gateway}}}")
    return lines


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _free_subnet(used: list[IPv4Network]) -> ipam.EnclaveSubnet:
    """The first 192.168.N.0/24 (from the SENG default up) that overlaps nothing used."""
    for third in [*range(28, 256), *range(0, 28)]:
        candidate = IPv4Network(f"192.168.{third}.0/24")
        if not any(candidate.overlaps(net) for net in used):
            return ipam.EnclaveSubnet.parse(candidate)
    raise DbImportError("no free 192.168.N.0/24 for the shared subnet")


def _validated(text: str) -> str:
    """Check the generated policy like `seng-fw check` would."""
    try:
        policy = Policy.model_validate(yaml.safe_load(text))
    except pydantic.ValidationError as exc:
        raise DbImportError(f"the imported policy is not valid: {exc}") from None
    problems = cross_check(policy)
    if problems:
        details = "; ".join(f"{'.'.join(map(str, where))}: {msg}" for where, msg in problems)
        raise DbImportError(f"the imported policy is not valid: {details}")
    return text
