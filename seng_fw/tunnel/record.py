"""Our own DTLS 1.2 record layer for established sessions (AES-128-GCM suites).

mbed TLS 2.28 keeps the handshake; once it is over, the session's keys move here and
every application record is sealed and opened by this module, on `cryptography`'s
AESGCM. Why by hand: mbed TLS 2.28's GCM goes one block at a time and its record
reads call back into Python for the timer; OpenSSL's GCM through `cryptography` costs
a fraction of that per packet (see bench/bench_record.py). What is written here is
only the record framing of RFC 6347 4.1 with the AEAD construction of RFC 5288/5246:

    record  = type(1) version(2)=fefd epoch(2) seq(6) length(2) || explicit(8) || C || tag(16)
    nonce   = salt(4, implicit, from the key block) || explicit(8)
    AAD     = epoch(2) seq(6) || type(1) || version(2) || plaintext length(2)

The explicit nonce is epoch || sequence number when we seal, as mbed TLS does; when we
open we take whatever the sender put there (RFC 5288 leaves the choice to it).

`RecordLayer` is sans-I/O: bytes in, bytes out, no sockets, no clocks. Every record is
authenticated; records of another epoch, replays and sequence numbers left of the
RFC 6347 4.1.2.6 sliding window (64 records) are refused before decryption, and the
window moves only for records that authenticate. Nothing that arrives is ever fatal
except an authenticated close_notify or fatal alert: whatever fails is dropped and
counted by reason (`drops`), RFC 6347 4.1.2.7.
"""

from __future__ import annotations

import enum
import hmac
import struct
from typing import Final, TypeAlias

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as chmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

CONTENT_CHANGE_CIPHER_SPEC: Final = 20
CONTENT_ALERT: Final = 21
CONTENT_HANDSHAKE: Final = 22
CONTENT_APPLICATION_DATA: Final = 23

DTLS_1_2: Final = 0xFEFD
HEADER_LEN: Final = 13
EXPLICIT_NONCE_LEN: Final = 8
TAG_LEN: Final = 16
OVERHEAD: Final = HEADER_LEN + EXPLICIT_NONCE_LEN + TAG_LEN  # 37
MAX_PLAINTEXT: Final = 1 << 14  # RFC 5246 6.2.1
# RFC 5246 6.2.3: TLSCiphertext.length must not exceed 2^14 + 2048.
MAX_CIPHERTEXT: Final = MAX_PLAINTEXT + 2048
MAX_SEQUENCE: Final = (1 << 48) - 1
REPLAY_WINDOW: Final = 64

# Key block of the TLS 1.2 AES-128-GCM suites (RFC 5246 6.3, no MAC keys):
# client_write_key(16) server_write_key(16) client_write_IV(4) server_write_IV(4).
KEY_LEN: Final = 16
SALT_LEN: Final = 4
KEY_BLOCK_LEN: Final = 2 * KEY_LEN + 2 * SALT_LEN

ALERT_WARNING: Final = 1
ALERT_FATAL: Final = 2
ALERT_CLOSE_NOTIFY: Final = 0
CLOSE_NOTIFY_ALERT: Final = bytes((ALERT_WARNING, ALERT_CLOSE_NOTIFY))

_MASK48: Final = MAX_SEQUENCE
_MASK64: Final = (1 << 64) - 1
# type, version, epoch||seq, length (the 13-byte header).
_HEADER: Final = struct.Struct(">BHQH")
# The header followed by the explicit nonce (epoch||seq again): what seal() writes first.
_PREFIX: Final = struct.Struct(">BHQHQ")
_EXPLICIT: Final = struct.Struct(">Q")
# epoch||seq, type, version, plaintext length.
_AAD: Final = struct.Struct(">QBHH")

# Python 3.11 has no collections.abc.Buffer.
Buffer: TypeAlias = bytes | bytearray | memoryview


class DropReason(enum.StrEnum):
    """Why a record (or the rest of a datagram) was dropped."""

    MALFORMED = "malformed"  # truncated header, length past the datagram or out of range
    BAD_VERSION = "bad_version"  # not DTLS 1.2 (fefd)
    UNEXPECTED_TYPE = "unexpected_type"  # content type other than alert/handshake/data
    WRONG_EPOCH = "wrong_epoch"  # not the session's epoch (stale handshake records, forgeries)
    TOO_OLD = "too_old"  # sequence number left of the replay window
    REPLAY = "replay"  # sequence number already seen in the window
    BAD_TAG = "bad_tag"  # authentication failed (tampered, forged, wrong key)
    EMPTY = "empty"  # authenticated application record without data
    BAD_ALERT = "bad_alert"  # authenticated alert record that is not one alert
    WARNING_ALERT = "warning_alert"  # authenticated warning alert other than close_notify
    HANDSHAKE = "handshake"  # authenticated handshake record after the handshake: refused
    CLOSED = "closed"  # arrived after the session ended


class SequenceExhausted(RuntimeError):
    """2^48 records sealed in one epoch: the session must end (RFC 6347 4.1)."""


def tls12_prf_sha256(secret: Buffer, label: bytes, seed: bytes, length: int) -> bytearray:
    """PRF(secret, label, seed) of RFC 5246 section 5 with P_SHA256, `length` bytes.

    By hand because `cryptography` has no public TLS 1.2 PRF; it is four lines of HMAC."""
    label_seed = label + seed
    out = bytearray()
    a = label_seed  # A(0)
    while len(out) < length:
        mac = chmac.HMAC(secret, hashes.SHA256())
        mac.update(a)
        a = mac.finalize()  # A(i) = HMAC(secret, A(i-1))
        mac = chmac.HMAC(secret, hashes.SHA256())
        mac.update(a + label_seed)
        out += mac.finalize()
    del out[length:]
    return out


def derive_key_block(
    master_secret: Buffer, client_random: bytes, server_random: bytes, length: int = KEY_BLOCK_LEN
) -> bytearray:
    """RFC 5246 6.3: PRF(master_secret, "key expansion", server_random + client_random)."""
    return tls12_prf_sha256(master_secret, b"key expansion", server_random + client_random, length)


def zero(buffer: bytearray) -> None:
    """Overwrite key material we own (bytes objects cannot be wiped, so keys live in
    bytearrays until AESGCM has copied them into OpenSSL)."""
    buffer[:] = bytes(len(buffer))


class RecordLayer:
    """Seals and opens DTLS 1.2 AES-128-GCM records of one established session, one
    epoch. Sans-I/O and not thread-safe.

    `open(datagram)` returns the application data of the datagram's records, in order.
    Authenticated non-data records are handled here as far as this layer can: an
    alert that ends the session (close_notify, any fatal alert) is kept in
    `peer_alert` (level, description) and ends the layer (it then drops everything and
    has wiped its keys); authenticated handshake messages are kept in `handshake` for
    the session to judge (a DTLS peer repeats its last flight when ours was lost), and
    cleared by the next `open`.
    """

    __slots__ = (
        "_epoch",
        "_max_seq",
        "_open_aead",
        "_read_salt",
        "_seal_aead",
        "_window",
        "_write_salt",
        "_write_seq",
        "closed",
        "drops",
        "handshake",
        "peer_alert",
        "records_opened",
        "records_sealed",
    )

    def __init__(
        self,
        write_key: Buffer,
        write_salt: Buffer,
        read_key: Buffer,
        read_salt: Buffer,
        *,
        epoch: int = 1,
        write_seq: int = 0,
    ) -> None:
        if len(memoryview(write_key)) != KEY_LEN or len(memoryview(read_key)) != KEY_LEN:
            raise ValueError("AES-128-GCM keys are 16 bytes")
        if len(memoryview(write_salt)) != SALT_LEN or len(memoryview(read_salt)) != SALT_LEN:
            raise ValueError("GCM implicit salts are 4 bytes")
        if not 0 < epoch < 1 << 16 or not 0 <= write_seq <= MAX_SEQUENCE:
            raise ValueError("epoch or sequence number out of range")
        # AESGCM copies the key into an OpenSSL context (checked by a unit test), so the
        # caller may zero its buffers after this.
        self._seal_aead = AESGCM(write_key)
        self._open_aead = AESGCM(read_key)
        self._write_salt = bytearray(write_salt)
        self._read_salt = bytearray(read_salt)
        self._epoch = epoch
        self._write_seq = write_seq
        # Replay window (RFC 6347 4.1.2.6): highest authenticated sequence number, and a
        # bitmap of the 64 numbers ending at it (bit i: max - i was received).
        self._max_seq = -1
        self._window = 0
        self.closed = False
        self.peer_alert: tuple[int, int] | None = None
        self.handshake: list[bytes] = []
        self.drops: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        self.records_sealed = 0
        self.records_opened = 0

    @classmethod
    def from_key_block(
        cls, key_block: Buffer, *, is_client: bool, epoch: int = 1, write_seq: int = 0
    ) -> RecordLayer:
        """The layer of one side from the 40-byte key block of RFC 5246 6.3."""
        kb = memoryview(key_block)
        if len(kb) < KEY_BLOCK_LEN:
            raise ValueError("key block too short for AES-128-GCM")
        client_key, server_key = kb[0:16], kb[16:32]
        client_salt, server_salt = kb[32:36], kb[36:40]
        if is_client:
            return cls(client_key, client_salt, server_key, server_salt, epoch=epoch,
                       write_seq=write_seq)  # fmt: skip
        return cls(server_key, server_salt, client_key, client_salt, epoch=epoch,
                   write_seq=write_seq)  # fmt: skip

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def next_write_seq(self) -> int:
        return self._write_seq

    def __repr__(self) -> str:  # never the keys
        state = "closed" if self.closed else "open"
        return f"<RecordLayer epoch={self._epoch} next_seq={self._write_seq} {state}>"

    # ---------------------------------------------------------------- sealing

    def seal(self, plaintext: Buffer, content_type: int = CONTENT_APPLICATION_DATA) -> bytes:
        """One record carrying `plaintext`, with the next sequence number."""
        if self.closed:
            raise RuntimeError("record layer is closed")
        n = plaintext.nbytes if isinstance(plaintext, memoryview) else len(plaintext)
        if n > MAX_PLAINTEXT:
            raise ValueError(f"record of {n} bytes exceeds {MAX_PLAINTEXT}")
        seq = self._write_seq
        if seq > MAX_SEQUENCE:
            raise SequenceExhausted("sequence numbers of this epoch are used up")
        self._write_seq = seq + 1
        es = (self._epoch << 48) | seq
        # Header + explicit nonce, then ciphertext + tag. Measured (bench_record.py's
        # figures, cryptography 50): encrypt() and one concatenation beat encrypt_into()
        # into a preallocated record, whose bytearray, memoryview and final bytes()
        # copy cost more than the copy they save.
        sealed = _PREFIX.pack(content_type, DTLS_1_2, es, n + 24, es) + self._seal_aead.encrypt(
            self._write_salt + _EXPLICIT.pack(es),
            plaintext,
            _AAD.pack(es, content_type, DTLS_1_2, n),
        )
        self.records_sealed += 1
        return sealed

    # ---------------------------------------------------------------- opening

    def open(self, datagram: bytes | memoryview) -> list[bytes]:
        """Application data of every valid record in `datagram`, in order (a view of a
        reused buffer is fine: what comes back is copied out of it)."""
        if self.handshake:
            self.handshake = []
        if self.closed:
            self.drops[DropReason.CLOSED] += 1
            return []
        out: list[bytes] = []
        end = len(datagram)
        offset = 0
        view = memoryview(datagram)
        drops = self.drops
        while offset < end:
            if end - offset < HEADER_LEN:
                drops[DropReason.MALFORMED] += 1  # stray bytes after the last record
                break
            content_type, version, es, length = _HEADER.unpack_from(datagram, offset)
            body = offset + HEADER_LEN
            offset = body + length
            if offset > end:
                # Record boundaries are lost: the rest of the datagram goes.
                drops[DropReason.MALFORMED] += 1
                break
            if version != DTLS_1_2:
                drops[DropReason.BAD_VERSION] += 1
                continue
            if not CONTENT_ALERT <= content_type <= CONTENT_APPLICATION_DATA:
                drops[DropReason.UNEXPECTED_TYPE] += 1
                continue
            if es >> 48 != self._epoch:
                drops[DropReason.WRONG_EPOCH] += 1
                continue
            if not 24 <= length <= MAX_CIPHERTEXT:
                drops[DropReason.MALFORMED] += 1
                continue
            seq = es & _MASK48
            # Replay check before decryption (cheap), window update after it.
            max_seq = self._max_seq
            if seq <= max_seq:
                age = max_seq - seq
                if age >= REPLAY_WINDOW:
                    drops[DropReason.TOO_OLD] += 1
                    continue
                if (self._window >> age) & 1:
                    drops[DropReason.REPLAY] += 1
                    continue
            try:
                plaintext = self._open_aead.decrypt(
                    self._read_salt + view[body : body + 8],
                    view[body + 8 : offset],
                    _AAD.pack(es, content_type, version, length - 24),
                )
            except InvalidTag:
                drops[DropReason.BAD_TAG] += 1
                continue
            if seq > max_seq:
                shift = seq - max_seq
                self._window = ((self._window << shift) | 1) & _MASK64 if shift < 64 else 1
                self._max_seq = seq
            else:
                self._window |= 1 << (max_seq - seq)
            self.records_opened += 1
            if content_type == CONTENT_APPLICATION_DATA:
                if plaintext:
                    out.append(plaintext)
                else:
                    drops[DropReason.EMPTY] += 1
            elif content_type == CONTENT_ALERT:
                if self._on_alert(plaintext):
                    break
            else:
                self.handshake.append(plaintext)
        return out

    def _on_alert(self, alert: bytes) -> bool:
        """True if the alert ends the session."""
        if len(alert) != 2:
            self.drops[DropReason.BAD_ALERT] += 1
            return False
        level, description = alert[0], alert[1]
        if description == ALERT_CLOSE_NOTIFY or level == ALERT_FATAL:
            self.peer_alert = (level, description)
            self.wipe()
            return True
        # Other warnings (e.g. no_renegotiation) change nothing here.
        self.drops[DropReason.WARNING_ALERT] += 1
        return False

    # ---------------------------------------------------------------- end

    def wipe(self) -> None:
        """End the layer: release the AEAD contexts (OpenSSL cleanses their keys when
        they are freed), zero the salts we own. Idempotent."""
        self.closed = True
        if self._write_salt:
            zero(self._write_salt)
            zero(self._read_salt)
        # Replace the keyed contexts with unkeyed placeholders; the real ones are freed
        # with their last reference, which is this one.
        self._seal_aead = self._open_aead = _WIPED


def check_framing(datagram: bytes) -> bool:
    """Whether `datagram` is a whole number of DTLS 1.2 record headers and bodies,
    nothing before, between or after them. The mbed TLS record path screens
    established-session datagrams with it: mbed TLS 2.28 fails the session on a
    discarded record followed by stray bytes."""
    end = len(datagram)
    offset = 0
    while offset < end:
        if end - offset < HEADER_LEN:
            return False
        if datagram[offset + 1] != 0xFE:
            return False
        offset += HEADER_LEN + int.from_bytes(datagram[offset + 11 : offset + 13], "big")
    return offset == end and end > 0


def same_secret(a: Buffer, b: Buffer) -> bool:
    """Constant-time comparison of key material."""
    return hmac.compare_digest(memoryview(a), memoryview(b))


# A context keyed with zeros: what a wiped layer holds instead of its keys (never used,
# seal and open check `closed` first).
_WIPED: Final = AESGCM(bytes(KEY_LEN))
