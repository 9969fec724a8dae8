"""Our DTLS 1.2 AES-128-GCM record layer, without sockets or mbed TLS sessions:
known-answer vectors, framing, the replay window, alerts, key hygiene, fuzzing.
(Interoperability with mbed TLS's record layer is tested in test_dtls.py.)"""

from __future__ import annotations

import ctypes
import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from seng_fw.tunnel import record
from seng_fw.tunnel.dtls_native import PRF_SHA256, bridge
from seng_fw.tunnel.record import (
    CONTENT_ALERT,
    CONTENT_APPLICATION_DATA,
    CONTENT_CHANGE_CIPHER_SPEC,
    CONTENT_HANDSHAKE,
    DropReason,
    RecordLayer,
    SequenceExhausted,
    check_framing,
    derive_key_block,
    tls12_prf_sha256,
)

KEY_BLOCK = bytes(range(40))


def pair(epoch: int = 1) -> tuple[RecordLayer, RecordLayer]:
    """(client, server) layers of one session."""
    return (
        RecordLayer.from_key_block(KEY_BLOCK, is_client=True, epoch=epoch),
        RecordLayer.from_key_block(KEY_BLOCK, is_client=False, epoch=epoch),
    )


def dropped(layer: RecordLayer) -> dict[DropReason, int]:
    return {reason: n for reason, n in layer.drops.items() if n}


def with_seq(datagram: bytes, seq: int, epoch: int = 1) -> bytes:
    return datagram[:3] + struct.pack(">Q", epoch << 48 | seq) + datagram[11:]


# ----------------------------------------------------------------- known answers


def test_tls12_prf_sha256_published_vector() -> None:
    # The TLS 1.2 PRF (P_SHA256) vector posted to the IETF TLS list (msg03416), also
    # used by the PKCS#11 TC.
    out = tls12_prf_sha256(
        bytes.fromhex("9bbe436ba940f017b17652849a71db35"),
        b"test label",
        bytes.fromhex("a0ba9f936cda311827a6f796ffd5198c"),
        100,
    )
    assert out.hex() == (
        "e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a"
        "6b301791e90d35c9c9a46b4e14baf9af0fa022f7077def17abfd3797c0564bab"
        "4fbc91666e9def9b97fce34f796789baa48082d122ee42c5a72e5a5110fff701"
        "87347b66"
    )


@pytest.mark.parametrize("length", [1, 32, 40, 64, 100, 256])
def test_tls12_prf_matches_mbedtls(length: int) -> None:
    # mbed TLS's own PRF (the library our sessions' handshakes run in) as a second opinion.
    prf = bridge().ssl.mbedtls_ssl_tls_prf
    prf.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                    ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]  # fmt: skip
    prf.restype = ctypes.c_int
    secret, seed = os.urandom(48), os.urandom(64)
    out = ctypes.create_string_buffer(length)
    assert prf(PRF_SHA256, secret, 48, b"key expansion", seed, 64, out, length) == 0
    assert tls12_prf_sha256(secret, b"key expansion", seed, length) == out.raw
    # The key block: server random first (RFC 5246 6.3).
    assert derive_key_block(secret, seed[32:], seed[:32], length) == out.raw


# The AES-128 cases of the GCM specification (McGrew and Viega), also in NIST's GCMVS.
GCM_VECTORS = [
    # key, iv, plaintext, aad, ciphertext, tag
    ("00000000000000000000000000000000", "000000000000000000000000", "", "", "",
     "58e2fccefa7e3061367f1d57a4e7455a"),
    ("00000000000000000000000000000000", "000000000000000000000000",
     "00000000000000000000000000000000", "", "0388dace60b6a392f328c2b971b2fe78",
     "ab6e47d42cec13bdf53a67b21257bddf"),
    ("feffe9928665731c6d6a8f9467308308", "cafebabefacedbaddecaf888",
     "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
     "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255", "",
     "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
     "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091473f5985",
     "4d5c2af327cd64a62cf35abd2ba6fab4"),
    ("feffe9928665731c6d6a8f9467308308", "cafebabefacedbaddecaf888",
     "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
     "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
     "feedfacedeadbeeffeedfacedeadbeefabaddad2",
     "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
     "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091",
     "5bc94fbc3221a5db94fae95ae7121a47"),
]  # fmt: skip


@pytest.mark.parametrize(("key", "iv", "pt", "aad", "ct", "tag"), GCM_VECTORS)
def test_aes128_gcm_known_answers(key: str, iv: str, pt: str, aad: str, ct: str, tag: str) -> None:
    aead = AESGCM(bytes.fromhex(key))
    sealed = aead.encrypt(bytes.fromhex(iv), bytes.fromhex(pt), bytes.fromhex(aad))
    assert sealed.hex() == ct + tag
    assert aead.decrypt(bytes.fromhex(iv), sealed, bytes.fromhex(aad)).hex() == pt


def test_gcm_record_vector_through_the_record_layer() -> None:
    # GCM case 4's key, nonce and AAD set up as a DTLS record: salt cafebabe, explicit
    # nonce facedbaddecaf888 (as epoch||seq), and the AAD our header would give.
    layer = RecordLayer(
        bytes.fromhex("feffe9928665731c6d6a8f9467308308"),
        bytes.fromhex("cafebabe"),
        bytes.fromhex("feffe9928665731c6d6a8f9467308308"),
        bytes.fromhex("cafebabe"),
        epoch=0xFACE,
        write_seq=0xDBADDECAF888,
    )
    _key, _iv, pt, _aad, ct, tag = GCM_VECTORS[3]
    sealed = layer.seal(bytes.fromhex(pt))
    header = (
        bytes.fromhex("17fefd") + bytes.fromhex("facedbaddecaf888") + struct.pack(">H", 8 + 60 + 16)
    )
    assert sealed[:13] == header
    assert sealed[13:21] == bytes.fromhex("facedbaddecaf888")  # explicit nonce = epoch||seq
    aad = bytes.fromhex("facedbaddecaf888") + bytes.fromhex("17fefd") + struct.pack(">H", 60)
    expected = AESGCM(bytes.fromhex(_key)).encrypt(bytes.fromhex(_iv), bytes.fromhex(pt), aad)
    assert sealed[21:] == expected
    assert len(sealed) == 60 + record.OVERHEAD
    # Same key both ways here, so the layer opens its own record.
    assert layer.open(sealed) == [bytes.fromhex(pt)]
    assert ct and tag  # (the vector's own ciphertext uses another AAD)


def test_from_key_block_splits_keys_per_side() -> None:
    block = bytes(range(40))
    client, server = pair()
    c2s = client.seal(b"up")
    s2c = server.seal(b"down")
    # client_write_key = block[0:16], client_write_IV = block[32:36]
    nonce = block[32:36] + c2s[13:21]
    assert (
        AESGCM(block[0:16]).decrypt(nonce, c2s[21:], c2s[3:11] + b"\x17\xfe\xfd\x00\x02") == b"up"
    )
    nonce = block[36:40] + s2c[13:21]
    assert (
        AESGCM(block[16:32]).decrypt(nonce, s2c[21:], s2c[3:11] + b"\x17\xfe\xfd\x00\x04")
        == b"down"
    )
    assert server.open(c2s) == [b"up"] and client.open(s2c) == [b"down"]
    assert client.open(client.seal(b"own")) == []  # the client cannot open its own records
    assert dropped(client) == {DropReason.BAD_TAG: 1}


# ----------------------------------------------------------------- framing


def test_several_records_in_one_datagram() -> None:
    client, server = pair()
    datagram = client.seal(b"one") + client.seal(b"two") + client.seal(b"three")
    assert server.open(datagram) == [b"one", b"two", b"three"]
    assert server.records_opened == 3 and dropped(server) == {}


def test_a_bad_record_does_not_spoil_its_neighbours() -> None:
    client, server = pair()
    first, second, third = client.seal(b"one"), bytearray(client.seal(b"two")), client.seal(b"3")
    second[-1] ^= 0x80
    assert server.open(first + bytes(second) + third) == [b"one", b"3"]
    assert dropped(server) == {DropReason.BAD_TAG: 1}


@pytest.mark.parametrize(
    ("mangle", "reason", "delivered"),
    [
        (lambda d: d + b"x", DropReason.MALFORMED, [b"data"]),  # stray byte after the record
        (lambda d: d + b"x" * 12, DropReason.MALFORMED, [b"data"]),
        (lambda d: d[:-1], DropReason.MALFORMED, []),  # length beyond the datagram
        (lambda d: d[:12], DropReason.MALFORMED, []),  # truncated header
        (lambda d: d[:11] + b"\x00\x10" + d[13:29], DropReason.MALFORMED, []),  # < nonce + tag
        (lambda d: d[:1] + b"\xfe\xff" + d[3:], DropReason.BAD_VERSION, []),  # DTLS 1.0
        (lambda d: d[:1] + b"\x03\x03" + d[3:], DropReason.BAD_VERSION, []),  # TLS 1.2
        (lambda d: b"\x18" + d[1:], DropReason.UNEXPECTED_TYPE, []),  # heartbeat
        (lambda d: b"\x14" + d[1:], DropReason.UNEXPECTED_TYPE, []),  # ChangeCipherSpec
        (lambda d: d[:3] + b"\x00\x00" + d[5:], DropReason.WRONG_EPOCH, []),
        (lambda d: d[:3] + b"\x00\x02" + d[5:], DropReason.WRONG_EPOCH, []),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), DropReason.BAD_TAG, []),  # tag
        (lambda d: d[:25] + bytes([d[25] ^ 1]) + d[26:], DropReason.BAD_TAG, []),  # ciphertext
        (lambda d: d[:14] + bytes([d[14] ^ 1]) + d[15:], DropReason.BAD_TAG, []),  # nonce
        (lambda d: b"\x16" + d[1:], DropReason.BAD_TAG, []),  # type is authenticated
        (lambda d: d[:10] + bytes([d[10] ^ 1]) + d[11:], DropReason.BAD_TAG, []),  # seq too
    ],
)
def test_framing_and_authentication_failures_are_dropped_by_reason(
    mangle: object, reason: DropReason, delivered: list[bytes]
) -> None:
    client, server = pair()
    datagram = client.seal(b"data")
    assert callable(mangle)
    assert server.open(mangle(datagram)) == delivered
    assert dropped(server) == {reason: 1}
    assert not server.closed
    # The genuine record still opens afterwards, unless it was just delivered.
    assert server.open(datagram) == ([] if delivered else [b"data"])


def test_empty_records_and_datagrams() -> None:
    client, server = pair()
    assert server.open(b"") == []
    assert server.open(client.seal(b"")) == []
    assert dropped(server) == {DropReason.EMPTY: 1}


def test_check_framing() -> None:
    client, _ = pair()
    one = client.seal(b"a")
    assert check_framing(one) and check_framing(one + client.seal(b"b"))
    assert not check_framing(b"")
    assert not check_framing(one + b"x")
    assert not check_framing(one[:-1])
    assert not check_framing(bytes.fromhex("17fefd0000000000000000010000") + b"x")
    assert not check_framing(b"\x17\x03\x03" + one[3:])


# ----------------------------------------------------------------- replay window


def test_replays_are_refused_and_reordering_within_the_window_is_not() -> None:
    client, server = pair()
    sealed = [client.seal(bytes([i])) for i in range(200)]
    assert server.open(sealed[100]) == [bytes([100])]
    assert server.open(sealed[100]) == []  # replay of the newest
    assert server.open(sealed[37]) == [bytes([37])]  # 63 behind: inside the window
    assert server.open(sealed[37]) == []  # replay inside the window
    assert server.open(sealed[36]) == []  # 64 behind: left of the window
    assert dropped(server) == {DropReason.REPLAY: 2, DropReason.TOO_OLD: 1}
    assert server.open(sealed[99]) == [bytes([99])]
    # A jump beyond the window's width forgets everything older.
    assert server.open(sealed[199]) == [bytes([199])]
    assert server.open(sealed[136]) == [bytes([136])]
    assert server.open(sealed[136]) == []
    assert server.open(sealed[101]) == []
    assert dropped(server) == {DropReason.REPLAY: 3, DropReason.TOO_OLD: 2}


def test_a_forged_record_does_not_move_the_window() -> None:
    client, server = pair()
    sealed = [client.seal(bytes([i])) for i in range(3)]
    forged = with_seq(sealed[0], 10_000)  # unauthenticated: fails the tag
    assert server.open(forged) == []
    assert [server.open(d) for d in sealed] == [[b"\x00"], [b"\x01"], [b"\x02"]]
    assert dropped(server) == {DropReason.BAD_TAG: 1}


def test_window_in_one_datagram() -> None:
    client, server = pair()
    datagram = client.seal(b"a")
    assert server.open(datagram + datagram) == [b"a"]
    assert dropped(server) == {DropReason.REPLAY: 1}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=60))
def test_window_matches_a_model(order: list[int]) -> None:
    client, server = pair()
    sealed = [client.seal(i.to_bytes(2, "big")) for i in range(301)]
    seen: set[int] = set()
    highest = -1
    for i in order:
        expect = i not in seen and i > highest - 64
        assert server.open(sealed[i]) == ([i.to_bytes(2, "big")] if expect else [])
        if expect:
            seen.add(i)
            highest = max(highest, i)


# ----------------------------------------------------------------- alerts, handshake


ALERTS = [(b"\x01\x00", True), (b"\x02\x28", True), (b"\x02\x00", True), (b"\x01\x64", False)]


@pytest.mark.parametrize(("alert", "ends"), ALERTS)
def test_alerts(alert: bytes, ends: bool) -> None:
    client, server = pair()
    datagram = client.seal(b"before") + client.seal(alert, CONTENT_ALERT) + client.seal(b"after")
    delivered = server.open(datagram)
    if ends:
        assert delivered == [b"before"]  # nothing after the alert
        assert server.peer_alert == (alert[0], alert[1]) and server.closed
        assert server.open(client.seal(b"late")) == []
        assert dropped(server) == {DropReason.CLOSED: 1}
        with pytest.raises(RuntimeError):
            server.seal(b"x")
    else:
        assert delivered == [b"before", b"after"]
        assert server.peer_alert is None and not server.closed
        assert dropped(server) == {DropReason.WARNING_ALERT: 1}


def test_malformed_alert_is_dropped() -> None:
    client, server = pair()
    assert server.open(client.seal(b"\x01\x00\x01", CONTENT_ALERT)) == []
    assert server.open(client.seal(b"\x02", CONTENT_ALERT)) == []
    assert not server.closed and dropped(server) == {DropReason.BAD_ALERT: 2}


def test_an_unauthenticated_alert_changes_nothing() -> None:
    client, server = pair()
    alert = bytearray(client.seal(b"\x01\x00", CONTENT_ALERT))
    alert[-3] ^= 1
    assert server.open(bytes(alert)) == [] and not server.closed


def test_authenticated_handshake_records_are_handed_up_until_the_next_open() -> None:
    client, server = pair()
    finished = b"\x14" + bytes(11) + b"v" * 12
    assert server.open(client.seal(finished, CONTENT_HANDSHAKE) + client.seal(b"d")) == [b"d"]
    assert server.handshake == [finished]
    assert server.open(client.seal(b"e")) == [b"e"] and server.handshake == []


def test_change_cipher_spec_is_unexpected_after_the_handshake() -> None:
    client, server = pair()
    assert server.open(client.seal(b"\x01", CONTENT_CHANGE_CIPHER_SPEC)) == []
    assert dropped(server) == {DropReason.UNEXPECTED_TYPE: 1}


# ----------------------------------------------------------------- sealing, keys


def test_sequence_numbers_and_their_end() -> None:
    layer = RecordLayer.from_key_block(KEY_BLOCK, is_client=True, write_seq=record.MAX_SEQUENCE)
    last = layer.seal(b"x")
    assert last[3:11] == b"\x00\x01" + b"\xff" * 6
    with pytest.raises(SequenceExhausted):
        layer.seal(b"y")
    fresh = RecordLayer.from_key_block(KEY_BLOCK, is_client=True, write_seq=5)
    assert [fresh.seal(b"")[5:11] for _ in range(2)] == [b"\0" * 5 + b"\5", b"\0" * 5 + b"\6"]
    with pytest.raises(ValueError, match="exceeds"):
        fresh.seal(bytes(record.MAX_PLAINTEXT + 1))


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        RecordLayer(bytes(15), bytes(4), bytes(16), bytes(4))
    with pytest.raises(ValueError):
        RecordLayer(bytes(16), bytes(12), bytes(16), bytes(4))
    with pytest.raises(ValueError):
        RecordLayer(bytes(16), bytes(4), bytes(16), bytes(4), epoch=0)
    with pytest.raises(ValueError):
        RecordLayer.from_key_block(bytes(39), is_client=True)


def test_aesgcm_keeps_its_own_copy_of_the_key() -> None:
    # The session zeroes the key block right after building the layer: that is only
    # sound if AESGCM copied the key (a future `cryptography` that keeps a reference
    # would silently encrypt under zeros).
    block = bytearray(os.urandom(40))
    reference = RecordLayer.from_key_block(bytes(block), is_client=False)
    layer = RecordLayer.from_key_block(block, is_client=True)
    record.zero(block)
    assert block == bytes(40)
    assert reference.open(layer.seal(b"still keyed")) == [b"still keyed"]


def test_wipe_drops_the_keys() -> None:
    client, server = pair()
    server.wipe()
    assert server.closed and repr(server).endswith("closed>")
    assert bytes(server._write_salt) == bytes(4) and bytes(server._read_salt) == bytes(4)
    assert server._seal_aead is record._WIPED and server._open_aead is record._WIPED
    assert server.open(client.seal(b"x")) == []
    server.wipe()  # idempotent
    assert "key" not in repr(client).lower()


# ----------------------------------------------------------------- fuzz


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_open_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    _, server = pair()
    assert server.open(data) == []
    assert sum(server.drops.values()) <= len(data) // 13 + 1


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_open_never_raises_on_mutated_records(data: st.DataObject) -> None:
    client, server = pair()
    datagram = bytearray(client.seal(b"payload") + client.seal(b"two", CONTENT_APPLICATION_DATA))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(datagram) - 1))
        datagram[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(datagram)))
    out = server.open(bytes(datagram[:cut]))
    assert set(out) <= {b"payload", b"two"}
