"""Write the seed corpora under tests/fuzz/<target>/: `python -m tests.fuzz.seeds`.

Genuine samples where the repository has them (Intel's IAS reports and DCAP quote and
collateral from tests/fixtures, the golden and example policies, `seng-fw init`'s
gateway.yaml), and for the rest inputs made here with the lab CAs and the encoders the
product itself uses. Seeds are named `seed-*`; inputs that once crashed a target are
named `crash-*` and are never rewritten. The lab certificates are test material only
(no private keys are written).
"""

from __future__ import annotations

import base64
import json
import struct
from ipaddress import IPv4Address, IPv4Network

from seng_fw.attest.ratls import EvidenceEncoding
from seng_fw.lab.ca import LabCA
from seng_fw.lab.dcap import LabDcapCA
from seng_fw.label.registry import Added, EnclaveRecord, Removed, Scope, Snapshot, encode_change
from seng_fw.ops.cli import CONFIG_TEMPLATE
from seng_fw.tunnel.messages import IpAssignAck
from seng_fw.tunnel.packets import inet_checksum
from seng_fw.tunnel.record import CONTENT_ALERT, CONTENT_HANDSHAKE, RecordLayer
from tests.fuzz.targets import _ASSIGNMENT, FIXTURES, FUZZ_DIR, RECORD_KEY, RECORD_SALT, TARGETS

REPO = FUZZ_DIR.parent.parent


def _ipv4(options: bytes, protocol: int = 17, payload: bytes = b"\0" * 8) -> bytes:
    header_length = 20 + len(options)
    assert header_length % 4 == 0 and header_length <= 60
    total = header_length + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | header_length // 4, 0, total, 1, 0, 64, protocol, 0,
        IPv4Address("10.1.0.2").packed, IPv4Address("192.0.2.1").packed,
    ) + options  # fmt: skip
    checksum = inet_checksum(header)
    return header[:10] + checksum.to_bytes(2, "big") + header[12:] + payload


def ipv4_seeds() -> dict[str, bytes]:
    seeds = {
        "udp": _ipv4(b""),
        "icmp-echo": _ipv4(b"", 1, b"\x08\x00\xf7\xff\x00\x00\x00\x00"),
        "tcp-syn": _ipv4(b"", 6, b"\0" * 20),
        "nop-eol": _ipv4(b"\x01\x01\x01\x00"),
        "record-route": _ipv4(b"\x07\x27\x04" + b"\0" * 36 + b"\0"),  # 40 bytes: IHL 15
        "timestamp": _ipv4(b"\x44\x0c\x05\x00" + b"\0" * 8),
        "lsrr": _ipv4(b"\x83\x07\x04" + IPv4Address("198.51.100.1").packed + b"\0"),
        "router-alert": _ipv4(b"\x94\x04\x00\x00"),
        "fragment": _ipv4(b"")[:6] + b"\x20\x00" + _ipv4(b"")[8:],
    }
    for ihl in range(5, 16):  # every header length, options padded with NOPs
        seeds[f"ihl-{ihl}"] = _ipv4(b"\x01" * (ihl * 4 - 20))
    return seeds


def record_seeds() -> dict[str, bytes]:
    layer = RecordLayer(RECORD_KEY, RECORD_SALT, RECORD_KEY, RECORD_SALT)
    one = layer.seal(_ipv4(b""))
    two = layer.seal(b"\x45" + b"\0" * 27) + layer.seal(IpAssignAck(_ASSIGNMENT.ip).encode())
    return {
        "one-record": one,
        "two-records": two,
        "handshake-record": layer.seal(b"\x00" * 12, CONTENT_HANDSHAKE),
        "warning-alert": layer.seal(b"\x01\x64", CONTENT_ALERT),
        "close-notify": layer.seal(b"\x01\x00", CONTENT_ALERT),
        # Issue 14 item 1: a discarded record followed by stray bytes.
        "forged-epoch0": bytes.fromhex("17fefd0000000000000000010000") + b"\0\0",
        "epoch0-handshake": bytes.fromhex("16fefd000000000000000000020000") + b"\0" * 2,
    }


def control_seeds() -> dict[str, bytes]:
    lines = {
        "status": {"command": "status"},
        "enclaves": {"command": "enclaves", "args": {}},
        "revoke": {"command": "revoke", "args": {"app": "web", "address": "10.1.0.2"}},
        "revoke-clear": {"command": "revoke", "args": {"mrenclave": "00" * 32, "clear": True}},
        "reload": {"command": "reload"},
        "unknown": {"command": "shutdown"},
    }
    return {name: json.dumps(line).encode() + b"\n" for name, line in lines.items()}


def label_seeds() -> dict[str, bytes]:
    record = EnclaveRecord(
        address=IPv4Address("10.1.0.2"), app="web", label=3, host=IPv4Address("192.168.56.11"),
        categories=("web",), mrenclave=bytes(32), mrsigner=bytes(32), since=1.5,
    )  # fmt: skip
    scope = Scope(IPv4Network("10.2.0.0/24"), frozenset({IPv4Address("10.2.0.1")}))
    stats = {"type": "stats", "queues": [0, 1], "counters": {"labelled": 3}}
    return {
        "snapshot": encode_change(Snapshot(scope, (record,))),
        "snapshot-empty": encode_change(Snapshot(None, ())),
        "add": encode_change(Added(record)),
        "remove": encode_change(Removed(record.address)),
        "stats": json.dumps(stats).encode() + b"\n",
    }


def attestation_seeds() -> dict[str, dict[str, bytes]]:
    epid, dcap = LabCA.generate(), LabDcapCA.generate()
    zero = bytes(32)
    epid_certs = {
        "v2019-ecdsa": epid.issue_enclave_cert(mrenclave=zero, mrsigner=zero),
        "v2018-p256": epid.issue_enclave_cert(
            mrenclave=zero, mrsigner=zero, key_size=256, encoding=EvidenceEncoding.V2018
        ),
        "v2019-rsa": epid.issue_enclave_cert(mrenclave=zero, mrsigner=zero, key_type="rsa"),
    }
    dcap_certs = {
        "sgx-ra-tls": dcap.issue_enclave_cert(mrenclave=zero, mrsigner=zero),
        "gramine": dcap.issue_enclave_cert(mrenclave=zero, mrsigner=zero, layout="gramine"),
        "gramine-dice": dcap.issue_enclave_cert(
            mrenclave=zero, mrsigner=zero, layout="gramine", dice=True
        ),
    }
    genuine_reports = {
        p.stem: p.read_bytes() for p in sorted((FIXTURES / "attest").glob("ias-report-*.json"))
    }
    quote_bodies = {
        f"genuine-{name}": base64.b64decode(json.loads(report)["isvEnclaveQuoteBody"])
        for name, report in genuine_reports.items()
    }
    quote_bodies |= {f"lab-{name}": c.quote.to_bytes() for name, c in epid_certs.items()}
    return {
        "ratls_epid": {name: c.cert_der for name, c in epid_certs.items()},
        "ratls_dcap": {name: c.cert_der for name, c in dcap_certs.items()},
        "ias_report": {"genuine-" + k: v for k, v in genuine_reports.items()}
        | {f"lab-{name}": c.report for name, c in epid_certs.items()},
        "epid_quote_body": quote_bodies,
        "dcap_quote": {
            "genuine-intel": (FIXTURES / "dcap" / "dcap-qvl-sgx-quote.bin").read_bytes(),
            "lab-sgx-ra-tls": dcap_certs["sgx-ra-tls"].quote,
        },
        "dcap_collateral": {
            "genuine-intel": (FIXTURES / "dcap" / "dcap-qvl-sgx-collateral.json").read_bytes(),
            "lab": dcap.collateral_json().encode(),
        },
    }


def config_seeds() -> dict[str, dict[str, bytes]]:
    policies = [
        REPO / "policies" / "example.yaml",
        *sorted((REPO / "policies" / "lab").glob("*.yaml")),
        *sorted((REPO / "policies" / "split-example").glob("*.yaml")),
        *sorted((REPO / "tests" / "golden").glob("*.yaml")),
    ]
    init = CONFIG_TEMPLATE.format(
        address="192.168.56.10", port=4433, roots="    - ca/root.pem", tun="tunFA",
        mode="per_app", hook="in_process", metrics="null",
    )  # fmt: skip
    minimal = "tls: {certificate: s.pem, key: s.key}\nattestation: {roots: [r.pem]}\npolicy: p\n"
    return {
        "policy": {f"{p.parent.name}-{p.stem}": p.read_bytes() for p in policies},
        "gateway_config": {"init-template": init.encode(), "minimal": minimal.encode()},
    }


def all_seeds() -> dict[str, dict[str, bytes]]:
    return {
        **attestation_seeds(),
        **config_seeds(),
        "dtls_record": record_seeds(),
        "setup_messages": {
            "assignment": _ASSIGNMENT.encode(),
            "ack": IpAssignAck(_ASSIGNMENT.ip).encode(),
        },
        "ipv4": ipv4_seeds(),
        "control_request": control_seeds(),
        "label_registry": label_seeds(),
    }


def main() -> None:
    seeds = all_seeds()
    assert set(seeds) == set(TARGETS), set(seeds) ^ set(TARGETS)
    for name, files in seeds.items():
        directory = FUZZ_DIR / name
        directory.mkdir(exist_ok=True)
        for old in directory.glob("seed-*"):
            old.unlink()
        for stem, data in files.items():
            (directory / f"seed-{stem}").write_bytes(data)
        print(f"{name}: {len(files)} seeds")


if __name__ == "__main__":
    main()
