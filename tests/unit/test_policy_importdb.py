"""`seng-fw import-db`: databases of the original SENG server -> YAML policies."""

from __future__ import annotations

import sqlite3
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from seng_fw.compile.cli import main
from seng_fw.policy.importdb import (
    DbImportError,
    DbUnreadable,
    import_db,
    le_address,
    le_network,
    policy_name,
)
from seng_fw.policy.loader import load_policy
from tests.golden.seng_demo_db import (
    DEMO_SIGNER,
    NETFILTER_SCHEMA,
    PLAIN_SCHEMA,
    make_db,
    netfilter_demo,
    plain_demo,
)


def test_addresses_are_little_endian_integers_of_network_order_bytes() -> None:
    assert le_address(0x021CA8C0) == IPv4Address("192.168.28.2")  # DESIGN.md's example
    assert le_address(0x0100007F) == IPv4Address("127.0.0.1")
    assert le_network(0x001C10AC, 0xC0FFFFFF) == IPv4Network("172.16.28.0/26")
    # the original masks the host part away (subnet & submask)
    assert le_network(0x0100007F, 0xC0FFFFFF) == IPv4Network("127.0.0.0/26")
    with pytest.raises(DbImportError, match="netmask"):
        le_network(0, 0x00FF00FF)


def test_names() -> None:
    taken: set[str] = set()
    assert policy_name("DemoEnclave", taken) == "demo-enclave"
    assert policy_name("SDK-NGINX", taken) == "sdk-nginx"
    assert policy_name("SDK NGINX", taken) == "sdk-nginx-2"
    assert policy_name("42 things", taken) == "app-42-things"
    assert policy_name("x" * 40, taken) == "x" * 31


def test_plain_demo_database(tmp_path: Path) -> None:
    out = tmp_path / "policy.yaml"
    out.write_text(import_db(plain_demo(tmp_path / "seng.db")))
    policy = load_policy(out)
    demo, nginx = policy.apps
    assert (demo.name, nginx.name) == ("demo-enclave", "sdk-nginx")
    assert demo.mrenclave[0].hex().startswith("8795db4c")
    assert demo.mrsigner is not None and demo.mrsigner.hex() == DEMO_SIGNER
    assert demo.hosts == [IPv4Network("127.0.0.0/26")]
    assert demo.subnet is not None and demo.subnet.subnet == IPv4Network("192.168.28.0/24")
    assert demo.subnet.gateway == IPv4Address("192.168.28.1")
    assert nginx.subnet is not None and nginx.subnet.subnet == IPv4Network("172.16.28.0/26")
    assert nginx.subnet.gateway == IPv4Address("172.16.28.1")
    # no DB subnet is shared: the shared subnet is a free one, used by no app
    assert policy.shared_subnet.subnet == IPv4Network("192.168.29.0/24")
    assert not demo.allow_debug and not demo.egress
    assert "holds no firewall rules" in out.read_text()


def test_netfilter_demo_database(tmp_path: Path) -> None:
    out = tmp_path / "policy.yaml"
    out.write_text(import_db(netfilter_demo(tmp_path / "seng.db"), allow_debug=True))
    policy = load_policy(out)
    assert [a.name for a in policy.apps] == ["demo-enclave", "seng-nginx"]
    assert list(policy.categories) == ["demo", "server"]
    assert [a.categories for a in policy.apps] == [["demo"], ["server"]]
    assert all(a.subnet is None and a.allow_debug for a in policy.apps)
    assert policy.apps[0].hosts == [IPv4Network("0.0.0.0/0")]
    assert policy.shared_subnet.subnet == IPv4Network("192.168.28.0/24")


def _row(app_id: int, name: str, mr: str, host: int, subnet_id: int) -> str:
    return (
        f"INSERT INTO apps VALUES({app_id}, '{name}', x'{mr * 64}', x'{'5' * 64}', "
        f"{host}, 0x00ffffff, {subnet_id});"
    )


SUBNETS = """
INSERT INTO enclave_subnets VALUES(1, 0x001ca8c0, 0x00ffffff, NULL);
INSERT INTO enclave_subnets VALUES(2, 0x001da8c0, 0x00ffffff, 0x0a1da8c0);
INSERT INTO enclave_subnets VALUES(3, 0x001ea8c0, 0x00ffffff, NULL);
"""


def test_rows_of_one_app_are_merged_and_shared_subnet_found(tmp_path: Path) -> None:
    rows = [
        _row(1, "Web", "a", 0x00014D0A, 2),  # 10.77.1.0/24
        _row(2, "Web", "b", 0x00014D0A, 2),  # a second build
        _row(3, "Web", "b", 0x00024D0A, 2),  # ... from a second host subnet
        _row(4, "Mail", "c", 0x00014D0A, 1),
        _row(5, "News", "d", 0x00014D0A, 1),
    ]
    db = make_db(tmp_path / "seng.db", PLAIN_SCHEMA, SUBNETS, *rows)
    out = tmp_path / "policy.yaml"
    out.write_text(import_db(db))
    policy = load_policy(out)
    web, mail, news = policy.apps
    assert len(web.mrenclave) == 2
    assert web.hosts == [IPv4Network("10.77.1.0/24"), IPv4Network("10.77.2.0/24")]
    assert web.subnet is not None and web.subnet.gateway == IPv4Address("192.168.29.10")
    # subnet 1 is used by two apps: it is the shared subnet
    assert policy.shared_subnet.subnet == IPv4Network("192.168.28.0/24")
    assert mail.subnet is None and news.subnet is None
    assert "id 3 (192.168.30.0/24) is used by no app" in out.read_text()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([_row(1, "A", "a", 1, 1), _row(2, "A", "b", 2, 2)], "several enclave subnets"),
        (
            [
                _row(1, "A", "a", 1, 1),
                _row(2, "B", "b", 1, 1),
                _row(3, "C", "c", 1, 2),
                _row(4, "D", "d", 1, 2),
            ],
            "one shared subnet",
        ),
        ([_row(1, "A", "a", 1, 9)], "subnet id 9 does not exist"),
        ([_row(1, "A", "a", 1, 1), _row(2, "B", "a", 2, 2)], "already claimed"),
    ],
)
def test_databases_that_cannot_be_expressed(tmp_path: Path, rows: list[str], message: str) -> None:
    db = make_db(tmp_path / "seng.db", PLAIN_SCHEMA, SUBNETS, *rows)
    with pytest.raises(DbImportError, match=message):
        import_db(db)


def test_unreadable_databases(tmp_path: Path) -> None:
    (tmp_path / "text.db").write_text("not sqlite at all, just text " * 100)
    with pytest.raises(DbUnreadable):
        import_db(tmp_path / "text.db")
    with pytest.raises(DbUnreadable, match="no `apps` table"):
        import_db(make_db(tmp_path / "other.db", "CREATE TABLE x (y INTEGER);"))
    with pytest.raises(DbUnreadable, match="no such file"):
        import_db(tmp_path / "missing.db")


def test_import_db_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = netfilter_demo(tmp_path / "seng.db")
    assert main(["import-db", str(db), "-o", str(tmp_path / "out.yaml")]) == 0
    assert load_policy(tmp_path / "out.yaml").apps
    assert main(["import-db", str(db)]) == 0
    assert "seng-nginx" in capsys.readouterr().out
    assert main(["import-db", str(tmp_path / "missing.db")]) == 2
    bad = make_db(tmp_path / "bad.db", NETFILTER_SCHEMA, "INSERT INTO categories VALUES(1,'x',7);")
    assert main(["import-db", str(bad)]) == 1
    assert "app id 7" in capsys.readouterr().err


def test_database_is_opened_read_only(tmp_path: Path) -> None:
    db = plain_demo(tmp_path / "seng.db")
    before = db.read_bytes()
    import_db(db)
    assert db.read_bytes() == before
    assert sqlite3.connect(db).execute("SELECT count(*) FROM apps").fetchone() == (2,)
