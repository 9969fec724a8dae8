"""Record-layer benchmark (issue 12, lever 1). No root, no network:

    .venv/bin/python bench/bench_record.py [--records 20000] [--rounds 5]

Prints the CPU time per packet (µs, process time, median of alternating rounds) to
seal and to open one DTLS 1.2 AES-128-GCM application record of 64 and 1,400 bytes:

- mbedtls:  today's mbed TLS record path, DtlsClientSession/DtlsServerSession with
  record_layer=False, in memory (send_record + datagrams_to_send on one side,
  receive_datagram + events on the other): the baseline;
- session:  the same sessions on our record layer (the default): what the gateway and
  the emulator pay per packet;
- record:   RecordLayer.seal/open alone (what a flat fast path would pay);

and the ratios to the baseline, measured in the same run. These machines are shared
and noisy: compare the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import statistics
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from seng_fw.tunnel.dtls import (
    DtlsClientSession,
    DtlsServerSession,
    make_client_config,
    make_server_config,
    peer_id,
)
from seng_fw.tunnel.record import RecordLayer

SIZES = (64, 1400)
PEER = peer_id(("127.0.0.1", 40000))


@functools.cache
def _identity(cn: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def connected(record_layer: bool) -> tuple[DtlsClientSession, DtlsServerSession]:
    server_cert, server_key = _identity("gateway")
    client_cert, client_key = _identity("enclave")
    server_config = make_server_config(server_cert, server_key)
    der = x509.load_pem_x509_certificate(server_cert).public_bytes(serialization.Encoding.DER)
    client_config = make_client_config(client_cert, client_key, der)
    client = DtlsClientSession(client_config, 0.0, record_layer=record_layer)
    server = DtlsServerSession(server_config, PEER, 0.0, record_layer=record_layer)
    for _ in range(50):
        moved = False
        for src, dst in ((client, server), (server, client)):
            for datagram in src.datagrams_to_send():
                dst.receive_datagram(datagram, 0.0)
                moved = True
        if not moved:
            break
    assert client.established and server.established
    client.events()
    server.events()
    # Keep the configurations alive with the sessions (they are, through _config).
    return client, server


def cpu_us(fn: Callable[[], None], count: int) -> float:
    start = time.process_time_ns()
    fn()
    return (time.process_time_ns() - start) / 1000 / count


def measure_sessions(
    client: DtlsClientSession, server: DtlsServerSession, size: int, count: int
) -> tuple[float, float]:
    packet = b"\x45" + bytes(size - 1)
    sealed: list[bytes] = []

    def seal() -> None:
        send, take = client.send_record, client.datagrams_to_send
        for _ in range(count):
            send(packet)
            sealed.extend(take())

    def open_() -> None:
        receive, events = server.receive_datagram, server.events
        for datagram in sealed:
            receive(datagram, 1.0)
            events()

    seal_us = cpu_us(seal, count)
    open_us = cpu_us(open_, count)
    assert server.records_in >= count
    return seal_us, open_us


def measure_record_layer(size: int, count: int, round_no: int) -> tuple[float, float]:
    key_block = bytes((round_no + i) % 256 for i in range(40))
    sender = RecordLayer.from_key_block(key_block, is_client=True)
    receiver = RecordLayer.from_key_block(key_block, is_client=False)
    packet = b"\x45" + bytes(size - 1)
    sealed: list[bytes] = []

    def seal() -> None:
        seal_one, append = sender.seal, sealed.append
        for _ in range(count):
            append(seal_one(packet))

    opened = 0

    def open_() -> None:
        nonlocal opened
        open_one = receiver.open
        for datagram in sealed:
            opened += len(open_one(datagram))

    seal_us = cpu_us(seal, count)
    open_us = cpu_us(open_, count)
    assert opened == count
    return seal_us, open_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000, help="records per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    args = parser.parse_args()
    count = args.records
    results: dict[tuple[str, int, str], list[float]] = {}

    def add(contender: str, size: int, figures: tuple[float, float]) -> None:
        results.setdefault((contender, size, "seal"), []).append(figures[0])
        results.setdefault((contender, size, "open"), []).append(figures[1])

    for round_no in range(args.rounds):
        for size in SIZES:
            # Fresh sessions each round: sequence numbers and replay windows start over.
            add("mbedtls", size, measure_sessions(*connected(False), size, count))
            add("session", size, measure_sessions(*connected(True), size, count))
            add("record", size, measure_record_layer(size, count, round_no))

    print(f"CPU µs per packet, median of {args.rounds} rounds of {count} records")
    print(f"{'payload':>8} {'op':>5} {'mbedtls':>8} {'session':>8} {'record':>8}"
          f" {'mbedtls/session':>16} {'mbedtls/record':>15}")  # fmt: skip
    for size in SIZES:
        for op in ("seal", "open"):
            base, sess, rec = (
                statistics.median(results[(c, size, op)]) for c in ("mbedtls", "session", "record")
            )
            print(f"{size:>7}B {op:>5} {base:8.2f} {sess:8.2f} {rec:8.2f}"
                  f" {base / sess:15.2f}x {base / rec:14.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
