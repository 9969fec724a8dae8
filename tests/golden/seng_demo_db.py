"""The demo databases of the original SENG server, built the way its SQL scripts build
them (sengsgx/sengsgx seng_server/double_tunnel_openssl/seng_db_creator.sql and
seng_netfilter_db_creator.sql): same schemas, same demo rows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

PLAIN_SCHEMA = """
CREATE TABLE "enclave_subnets" (
    "id" INTEGER, "subnet" INTEGER NOT NULL, "submask" INTEGER NOT NULL, "gateway" INTEGER,
    UNIQUE(subnet, submask), PRIMARY KEY("id"));
CREATE TABLE "apps" (
    "id" INTEGER, "name" TEXT NOT NULL, "mr_enclave" BLOB NOT NULL, "mr_signer" BLOB NOT NULL,
    "host_subnet" INTEGER NOT NULL, "host_submask" INTEGER NOT NULL,
    "enc_subnet_id" INTEGER NOT NULL,
    FOREIGN KEY("enc_subnet_id") REFERENCES "enclave_subnets",
    UNIQUE(mr_enclave, host_subnet, host_submask), PRIMARY KEY("id"));
"""
DEMO_SIGNER = "be7403a5952075531158572a50b7eb613821df2e18bf6c8b6e1d646dbf42d1a0"
# Addresses: the network-order bytes read as a little-endian integer.
PLAIN_DEMO = f"""
INSERT INTO enclave_subnets VALUES(1, 0x001ca8c0, 0x00ffffff, 0x011ca8c0);
INSERT INTO enclave_subnets VALUES(2, 0x001c10ac, 0xc0ffffff, 0x011c10ac);
INSERT INTO apps VALUES(1, 'DemoEnclave',
    x'8795db4ce3df2a3964a91d4fb058f67b02b351f327439b073a113c7326929716',
    x'{DEMO_SIGNER}', 0x0100007f, 0xc0ffffff, 1);
INSERT INTO apps VALUES(2, 'SDK-NGINX',
    x'7c6ca940d705e8ffc9614c86526bf24dab2890e7711324694375e9b644e396ea',
    x'{DEMO_SIGNER}', 0x0100007f, 0xc0ffffff, 2);
"""

NETFILTER_SCHEMA = """
CREATE TABLE "apps" (
    "id" INTEGER, "name" TEXT NOT NULL, "mr_enclave" BLOB NOT NULL, "mr_signer" BLOB NOT NULL,
    PRIMARY KEY("id"), UNIQUE(mr_enclave));
CREATE TABLE "categories" (
    "id" INTEGER, "name" TEXT NOT NULL, "apps_id" INTEGER NOT NULL,
    FOREIGN KEY("apps_id") REFERENCES "apps", UNIQUE(name, apps_id));
"""
NETFILTER_DEMO = """
INSERT INTO apps VALUES(1, 'DemoEnclave',
    x'd9237809ab399aa541e42ad54146a2a1bde310dd7dc9fccc1e964dacf4c5c3b0',
    x'100dbba6e9bee19a237cb6be1e79ba6ec5c9b77aa46c1b221dcb67d34edcce2a');
INSERT INTO apps VALUES(2, 'SENG-NGINX',
    x'd5876e37d31ad62d4eafd36997820b18fdea7b104a0e2d3f81873230be2af792',
    x'ad373d1d526e45e3683aeaaf217ba2925024f05a626b0372da855ff4df057c6f');
INSERT INTO categories VALUES(1, 'Demo', 1);
INSERT INTO categories VALUES(2, 'Server', 2);
"""


def make_db(path: Path, *scripts: str) -> Path:
    db = sqlite3.connect(path)
    try:
        for script in scripts:
            db.executescript(script)
        db.commit()
    finally:
        db.close()
    return path


def plain_demo(path: Path) -> Path:
    return make_db(path, PLAIN_SCHEMA, PLAIN_DEMO)


def netfilter_demo(path: Path) -> Path:
    return make_db(path, NETFILTER_SCHEMA, NETFILTER_DEMO)
