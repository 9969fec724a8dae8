"""ctypes bridge to the mbed TLS 2.28 library that python-mbedtls 2.10 loads.

python-mbedtls 2.10 does not expose two settings the SENG tunnels need:

* the ECDHE curve list (`mbedtls_ssl_conf_curves`). Its default is every curve
  compiled in, strongest first, so a python-mbedtls server negotiates P-521 with
  any client that offers it (SENG clients do), which costs several times P-256;
* the DTLS timer callbacks (`mbedtls_ssl_set_timer_cb`). python-mbedtls installs
  mbed TLS's wall-clock timer, which a sans-I/O session cannot drive with an
  explicit `now` (tests, simulated time, one clock per event loop).

and a third that our own record layer (`record.py`) needs:

* the key export (`mbedtls_ssl_conf_export_keys_ext_cb`): master secret, key block,
  client and server random and PRF type of each handshake, so that established
  sessions can seal and open their records without mbed TLS.

All are public mbed TLS functions exported by the shared library the python-mbedtls
wheel ships (`python_mbedtls.libs/libmbedtls-*.so`). What python-mbedtls hides is
the address of its C structs; we find them in the Cython object and verify every
address through mbed TLS itself before using it (see `_locate`), so a different
python-mbedtls layout fails loudly at start-up instead of corrupting memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

from mbedtls import tls
from mbedtls import version as mbedtls_version

# mbedtls_ecp_group_id values (mbedtls/ecp.h, 2.x).
ECP_GROUP_IDS: dict[str, int] = {"secp256r1": 3, "secp384r1": 4, "secp521r1": 5}

_SET_TIMER = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32)
_GET_TIMER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
# mbedtls_ssl_export_keys_ext_t (mbed TLS 2.28 ssl.h): p_expkey, ms, kb, maclen, keylen,
# ivlen, client_random[32], server_random[32], mbedtls_tls_prf_types.
_EXPORT_KEYS = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_int,
)
# mbedtls_tls_prf_types: NONE, SSL3, TLS1, SHA384, SHA256.
PRF_SHA256 = 4
MASTER_SECRET_LEN = 48
_MAX_KEY_BLOCK = 256  # mbed TLS's own keyblk[256]


class NativeBridgeError(RuntimeError):
    """The installed python-mbedtls does not look like the one this bridge was checked against."""


class HandshakeClock:
    """Timer state behind mbed TLS's `f_set_timer`/`f_get_timer` callbacks, on the
    session's own clock. `now` is set by the session before each call into mbed TLS.

    After the handshake `running_forever` is set: mbed TLS 2.28 turns an expired timer
    on an established connection into MBEDTLS_ERR_SSL_TIMEOUT, which python-mbedtls
    answers by resetting the session, so established sessions report "running, not
    expired" (0) and never time out inside mbed TLS.
    """

    __slots__ = ("__weakref__", "fin_at", "int_at", "now", "running_forever")

    def __init__(self, now: float) -> None:
        self.now = now
        self.int_at: float | None = None
        self.fin_at: float | None = None
        self.running_forever = False

    def set(self, int_ms: int, fin_ms: int) -> None:
        if fin_ms == 0:
            self.int_at = self.fin_at = None  # mbed TLS cancels the timer
        else:
            self.int_at = self.now + int_ms / 1000.0
            self.fin_at = self.now + fin_ms / 1000.0

    def get(self) -> int:
        # mbed TLS protocol: -1 cancelled, 0 running, 1 intermediate delay passed, 2 expired.
        if self.running_forever:
            return 0
        if self.fin_at is None:
            return -1
        if self.now >= self.fin_at:
            return 2
        if self.int_at is not None and self.now >= self.int_at:
            return 1
        return 0


# mbed TLS gets an integer key as `p_timer`, never a pointer to a Python object: the
# callbacks live for the whole process and look the clock up here, so a session freed
# in any order relative to its ssl context can never leave a dangling pointer behind.
_CLOCKS: weakref.WeakValueDictionary[int, HandshakeClock] = weakref.WeakValueDictionary()
_clock_keys = itertools.count(1)


def _set_timer(key: int | None, int_ms: int, fin_ms: int) -> None:
    clock = _CLOCKS.get(key or 0)
    if clock is not None:
        clock.set(int_ms, fin_ms)


def _get_timer(key: int | None) -> int:
    clock = _CLOCKS.get(key or 0)
    return -1 if clock is None else clock.get()


# Module-level C thunks: they must outlive every ssl context that points at them.
_set_timer_cb = _SET_TIMER(_set_timer)
_get_timer_cb = _GET_TIMER(_get_timer)


class ExportedKeys:
    """What mbed TLS handed over for one handshake (see `NativeHandle.capture_keys`).
    Secrets live in bytearrays so that `wipe()` can zero them; repr never shows them."""

    __slots__ = (
        "client_random",
        "ivlen",
        "key_block",
        "keylen",
        "maclen",
        "master_secret",
        "prf_type",
        "server_random",
    )

    def __init__(self) -> None:
        self.master_secret = bytearray()
        self.key_block = bytearray()
        self.client_random = b""
        self.server_random = b""
        self.prf_type = 0
        self.maclen = self.keylen = self.ivlen = 0

    @property
    def captured(self) -> bool:
        return bool(self.master_secret)

    def wipe(self) -> None:
        for secret in (self.master_secret, self.key_block):
            secret[:] = bytes(len(secret))
        self.master_secret = bytearray()
        self.key_block = bytearray()

    def __repr__(self) -> str:
        return f"<ExportedKeys captured={self.captured} prf={self.prf_type}>"


# The key-export callback is set on the configuration that all sessions of a context
# share, and mbed TLS gives it no pointer to the session. It runs synchronously inside
# the do_handshake() call that derives the keys, on the calling thread: the session
# names itself as this thread's sink for the duration of its mbed TLS calls.
_capture = threading.local()


def _export_keys(
    _p: int | None,
    ms: int | None,
    kb: int | None,
    maclen: int,
    keylen: int,
    ivlen: int,
    client_random: int | None,
    server_random: int | None,
    prf_type: int,
) -> int:
    sink: ExportedKeys | None = getattr(_capture, "sink", None)
    kb_len = 2 * (maclen + keylen + ivlen)
    if sink is None or not (ms and kb and client_random and server_random):
        return 0  # not a session of ours (mbed TLS 2.28 ignores the return value)
    if kb_len > _MAX_KEY_BLOCK:
        return 0
    sink.wipe()
    master = bytearray(MASTER_SECRET_LEN)
    block = bytearray(kb_len)
    ctypes.memmove((ctypes.c_char * MASTER_SECRET_LEN).from_buffer(master), ms, MASTER_SECRET_LEN)
    if kb_len:
        ctypes.memmove((ctypes.c_char * kb_len).from_buffer(block), kb, kb_len)
    sink.master_secret, sink.key_block = master, block
    sink.client_random = ctypes.string_at(client_random, 32)
    sink.server_random = ctypes.string_at(server_random, 32)
    sink.prf_type, sink.maclen, sink.keylen, sink.ivlen = prf_type, maclen, keylen, ivlen
    return 0


_export_keys_cb = _EXPORT_KEYS(_export_keys)


def _loaded_library(stem: str) -> str:
    """Path of the mbed TLS library the python-mbedtls extension loaded (the wheel's
    own copy under python_mbedtls.libs when there is one)."""
    maps = Path("/proc/self/maps")
    paths = []
    if maps.exists():
        for line in maps.read_text().splitlines():
            path = line.split(maxsplit=5)[-1]
            if f"/{stem}" in path and ".so" in path and path not in paths:
                paths.append(path)
    if not paths:
        raise NativeBridgeError(f"{stem} is not loaded as a shared library")
    wheel_copies = [p for p in paths if "python_mbedtls" in p]
    return (wheel_copies or paths)[0]


class _Bridge:
    def __init__(self) -> None:
        if mbedtls_version.version_info.major != 2:
            raise NativeBridgeError(f"expected mbed TLS 2.x, found {mbedtls_version.version}")
        self.ssl = ssl = ctypes.CDLL(_loaded_library("libmbedtls"))
        crypto = ctypes.CDLL(_loaded_library("libmbedcrypto"))
        self.drbg_random = ctypes.cast(crypto.mbedtls_ctr_drbg_random, ctypes.c_void_p).value
        ssl.mbedtls_ssl_conf_curves.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        ssl.mbedtls_ssl_conf_curves.restype = None
        ssl.mbedtls_ssl_set_timer_cb.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            _SET_TIMER,
            _GET_TIMER,
        ]
        ssl.mbedtls_ssl_set_timer_cb.restype = None
        ssl.mbedtls_ssl_get_max_out_record_payload.argtypes = [ctypes.c_void_p]
        ssl.mbedtls_ssl_get_max_out_record_payload.restype = ctypes.c_int
        ssl.mbedtls_ssl_check_pending.argtypes = [ctypes.c_void_p]
        ssl.mbedtls_ssl_check_pending.restype = ctypes.c_int
        self.check_pending = ssl.mbedtls_ssl_check_pending
        if not hasattr(ssl, "mbedtls_ssl_conf_export_keys_ext_cb"):
            raise NativeBridgeError("mbed TLS was built without MBEDTLS_SSL_EXPORT_KEYS")
        ssl.mbedtls_ssl_conf_export_keys_ext_cb.argtypes = [
            ctypes.c_void_p,
            _EXPORT_KEYS,
            ctypes.c_void_p,
        ]
        ssl.mbedtls_ssl_conf_export_keys_ext_cb.restype = None
        # Self-test on a throwaway context before touching a real one.
        self._locate(tls.ServerContext(tls.DTLSConfiguration()).wrap_buffers(), 1000)

    def _locate(self, buffer: Any, mtu: int) -> tuple[int, int]:
        """(address of the buffer's mbedtls_ssl_context, address of its mbedtls_ssl_config).

        Layout of python-mbedtls's `MbedTLSBuffer`: PyObject header, then the
        `_context` object pointer, then the embedded `mbedtls_ssl_context`, whose first
        member is the `conf` pointer. Each guess is checked through mbed TLS.
        """
        base = id(buffer)
        words = (ctypes.c_void_p * 8).from_address(base)
        context_id = id(buffer.context)
        for index in range(2, 8):
            if words[index] == context_id:
                ssl_addr = base + ctypes.sizeof(ctypes.c_void_p) * (index + 1)
                break
        else:
            raise NativeBridgeError("cannot find the ssl context in MbedTLSBuffer")
        # The real context answers with the MTU set through python-mbedtls (payload =
        # MTU - 13-byte record header while no transform is active).
        buffer.setmtu(mtu)
        payload = self.ssl.mbedtls_ssl_get_max_out_record_payload(ssl_addr)
        if payload != mtu - 13:
            raise NativeBridgeError(f"ssl context check failed ({payload})")
        conf_addr = ctypes.c_void_p.from_address(ssl_addr).value
        if not conf_addr:
            raise NativeBridgeError("ssl context has no configuration")
        # An mbedtls_ssl_config holds python-mbedtls's RNG callback near its start.
        conf_words = (ctypes.c_void_p * 32).from_address(conf_addr)
        if self.drbg_random not in list(conf_words):
            raise NativeBridgeError("ssl configuration check failed")
        return ssl_addr, conf_addr


_bridge: _Bridge | None = None


def bridge() -> _Bridge:
    global _bridge
    if _bridge is None:
        _bridge = _Bridge()
    return _bridge


class NativeHandle:
    """The mbed TLS addresses behind one python-mbedtls buffer, whose DTLS MTU this
    sets (it doubles as the address check). Keep the buffer alive as long as this
    handle is used."""

    __slots__ = ("clock", "conf_addr", "ssl_addr")

    def __init__(self, buffer: Any, mtu: int) -> None:
        self.ssl_addr, self.conf_addr = bridge()._locate(buffer, mtu)
        self.clock: HandshakeClock | None = None

    def install_clock(self, clock: HandshakeClock) -> None:
        key = next(_clock_keys)
        _CLOCKS[key] = clock
        self.clock = clock
        bridge().ssl.mbedtls_ssl_set_timer_cb(
            self.ssl_addr, ctypes.c_void_p(key), _set_timer_cb, _get_timer_cb
        )

    def install_key_export(self) -> None:
        """Have mbed TLS export the keys of every handshake on this buffer's
        configuration (shared by the context's buffers; setting it again is harmless)."""
        bridge().ssl.mbedtls_ssl_conf_export_keys_ext_cb(self.conf_addr, _export_keys_cb, None)

    @staticmethod
    @contextlib.contextmanager
    def capture_keys(sink: ExportedKeys) -> Iterator[None]:
        """Keys that mbed TLS exports on this thread meanwhile go to `sink`."""
        previous = getattr(_capture, "sink", None)
        _capture.sink = sink
        try:
            yield
        finally:
            _capture.sink = previous

    def has_pending(self) -> bool:
        """Whether mbed TLS still holds unread records of the current datagram."""
        return bool(bridge().check_pending(self.ssl_addr))


def handshake_state(buffer: tls.TLSWrappedBuffer) -> tls.HandshakeStep:
    """Where a buffer's handshake stands: python-mbedtls keeps it in a private
    attribute, read here and nowhere else."""
    state: tls.HandshakeStep = cast(Any, buffer)._handshake_state
    return state


def reset_session(buffer: tls.TLSWrappedBuffer) -> None:
    """Forget the handshake under way on `buffer` (mbedtls_ssl_session_reset, which
    python-mbedtls only exposes as a private method)."""
    cast(Any, buffer)._reset()


def set_curves(context: tls.ServerContext | tls.ClientContext, curves: Sequence[str]) -> object:
    """Restrict the ECDHE curves (and, client side, the supported_groups offered) of
    every buffer of `context`, in preference order. Returns the C array: the caller
    must keep it alive as long as the context (mbed TLS keeps the pointer)."""
    try:
        ids = [ECP_GROUP_IDS[name] for name in curves]
    except KeyError as exc:
        raise ValueError(f"unsupported curve {exc.args[0]!r}") from None
    if not ids:
        raise ValueError("at least one ECDHE curve is required")
    array = (ctypes.c_int * (len(ids) + 1))(*ids, 0)  # MBEDTLS_ECP_DP_NONE terminates
    # Every buffer of a context shares the context's configuration; a probe finds it.
    handle = NativeHandle(
        context.wrap_buffers(None)
        if isinstance(context, tls.ClientContext)
        else context.wrap_buffers(),
        1000,
    )
    bridge().ssl.mbedtls_ssl_conf_curves(handle.conf_addr, array)
    return array
