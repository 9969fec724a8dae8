"""The EPID quote body (`sgx_quote_t` without its signature) that IAS reports carry.

Parsed with `struct` by hand: no maintained Python library parses `sgx_quote_t`, and the
layout is fixed (432 bytes, little-endian; offsets in DESIGN.md section 2).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from seng_fw.attest.identity import AttestationRejected, Check

QUOTE_BODY_SIZE = 432
REPORT_DATA_SIZE = 64

# ATTRIBUTES.FLAGS bits (sgx_attributes.h).
FLAG_INITTED = 0x01
FLAG_DEBUG = 0x02
FLAG_MODE64BIT = 0x04

# EPID quote versions (IAS only ever sees 1 or 2; 3 and later are DCAP quotes) and sign types.
_QUOTE_VERSIONS = frozenset({1, 2})
SIGN_TYPE_UNLINKABLE = 0
SIGN_TYPE_LINKABLE = 1

# sgx_quote_t up to the signature: the 48-byte header, then the 384-byte sgx_report_body_t.
# Header: version, sign_type, epid_group_id, qe_svn, pce_svn, xeid, basename.
# Report body: cpu_svn, misc_select, reserved1, isv_ext_prod_id, attributes.flags,
# attributes.xfrm, mr_enclave, reserved2, mr_signer, reserved3, config_id, isv_prod_id,
# isv_svn, config_svn, reserved4, isv_family_id, report_data.
_LAYOUT = struct.Struct("<HH4sHHI32s16sI12s16sQQ32s32s32s32s64sHHH42s16s64s")
assert _LAYOUT.size == QUOTE_BODY_SIZE
# struct pads or cuts "Ns" fields silently; to_bytes checks these lengths instead.
_BYTES_FIELDS = {
    "epid_group_id": 4,
    "basename": 32,
    "cpu_svn": 16,
    "mrenclave": 32,
    "mrsigner": 32,
    "report_data": 64,
    "isv_ext_prod_id": 16,
    "config_id": 64,
    "isv_family_id": 16,
    "reserved1": 12,
    "reserved2": 32,
    "reserved3": 32,
    "reserved4": 42,
}


@dataclass(frozen=True)
class QuoteBody:
    """The fields of a quote body; reserved fields are kept so `to_bytes` round-trips."""

    version: int
    sign_type: int
    epid_group_id: bytes
    qe_svn: int
    pce_svn: int
    xeid: int
    basename: bytes
    cpu_svn: bytes
    misc_select: int
    attributes_flags: int
    xfrm: int
    mrenclave: bytes
    mrsigner: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes
    isv_ext_prod_id: bytes = bytes(16)
    config_id: bytes = bytes(64)
    config_svn: int = 0
    isv_family_id: bytes = bytes(16)
    reserved1: bytes = bytes(12)
    reserved2: bytes = bytes(32)
    reserved3: bytes = bytes(32)
    reserved4: bytes = bytes(42)

    @property
    def debug(self) -> bool:
        return bool(self.attributes_flags & FLAG_DEBUG)

    def to_bytes(self) -> bytes:
        """The 432-byte encoding (used by the lab CA to make quotes)."""
        for name, size in _BYTES_FIELDS.items():
            if len(getattr(self, name)) != size:
                raise ValueError(f"quote field {name} must be {size} bytes")
        try:
            return _LAYOUT.pack(
                self.version,
                self.sign_type,
                self.epid_group_id,
                self.qe_svn,
                self.pce_svn,
                self.xeid,
                self.basename,
                self.cpu_svn,
                self.misc_select,
                self.reserved1,
                self.isv_ext_prod_id,
                self.attributes_flags,
                self.xfrm,
                self.mrenclave,
                self.reserved2,
                self.mrsigner,
                self.reserved3,
                self.config_id,
                self.isv_prod_id,
                self.isv_svn,
                self.config_svn,
                self.reserved4,
                self.isv_family_id,
                self.report_data,
            )
        except struct.error as exc:
            raise ValueError(f"quote field out of range: {exc}") from None


def parse_quote_body(data: bytes) -> QuoteBody:
    """Parse exactly 432 bytes; anything else, or a non-EPID header, is `malformed_quote`."""
    if len(data) != QUOTE_BODY_SIZE:
        raise AttestationRejected(
            Check.MALFORMED_QUOTE, f"quote body is {len(data)} bytes, expected {QUOTE_BODY_SIZE}"
        )
    (
        version,
        sign_type,
        epid_group_id,
        qe_svn,
        pce_svn,
        xeid,
        basename,
        cpu_svn,
        misc_select,
        reserved1,
        isv_ext_prod_id,
        flags,
        xfrm,
        mrenclave,
        reserved2,
        mrsigner,
        reserved3,
        config_id,
        isv_prod_id,
        isv_svn,
        config_svn,
        reserved4,
        isv_family_id,
        report_data,
    ) = _LAYOUT.unpack(data)
    if version not in _QUOTE_VERSIONS:
        raise AttestationRejected(Check.MALFORMED_QUOTE, f"unexpected quote version {version}")
    if sign_type not in (SIGN_TYPE_UNLINKABLE, SIGN_TYPE_LINKABLE):
        raise AttestationRejected(Check.MALFORMED_QUOTE, f"unexpected quote sign type {sign_type}")
    if not flags & FLAG_INITTED:
        # Every report of a running enclave has INITTED set; a quote without it is not real.
        raise AttestationRejected(Check.MALFORMED_QUOTE, "ATTRIBUTES.INITTED is not set")
    return QuoteBody(
        version=version,
        sign_type=sign_type,
        epid_group_id=epid_group_id,
        qe_svn=qe_svn,
        pce_svn=pce_svn,
        xeid=xeid,
        basename=basename,
        cpu_svn=cpu_svn,
        misc_select=misc_select,
        attributes_flags=flags,
        xfrm=xfrm,
        mrenclave=mrenclave,
        mrsigner=mrsigner,
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        report_data=report_data,
        isv_ext_prod_id=isv_ext_prod_id,
        config_id=config_id,
        config_svn=config_svn,
        isv_family_id=isv_family_id,
        reserved1=reserved1,
        reserved2=reserved2,
        reserved3=reserved3,
        reserved4=reserved4,
    )
