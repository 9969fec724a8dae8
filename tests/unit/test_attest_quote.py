"""The 432-byte EPID quote body: offsets (DESIGN.md section 2) and strict parsing."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from seng_fw.attest.identity import AttestationRejected
from seng_fw.attest.quote import QUOTE_BODY_SIZE, QuoteBody, parse_quote_body

FIXTURES = Path(__file__).parent.parent / "fixtures" / "attest"


def _body(version: int = 2, sign_type: int = 1, flags: int = 0x07) -> bytearray:
    """A quote body written by offset, independently of the module's struct layout."""
    buf = bytearray(QUOTE_BODY_SIZE)
    struct.pack_into("<HH", buf, 0, version, sign_type)
    buf[4:8] = b"\xaa\xbb\xcc\xdd"  # EPID group
    struct.pack_into("<HH", buf, 8, 11, 10)  # QE SVN, PCE SVN
    buf[48:64] = b"\x0f" * 16  # CPUSVN
    struct.pack_into("<Q", buf, 96, flags)
    struct.pack_into("<Q", buf, 104, 0x1F)  # XFRM
    buf[112:144] = bytes(range(32))  # MRENCLAVE
    buf[176:208] = bytes(range(100, 132))  # MRSIGNER
    struct.pack_into("<HH", buf, 304, 0x1234, 0x0506)  # ISVPRODID, ISVSVN
    buf[368:432] = bytes(range(64))  # REPORTDATA
    return buf


def test_fields_at_the_documented_offsets() -> None:
    quote = parse_quote_body(bytes(_body()))
    assert quote.version == 2
    assert quote.sign_type == 1
    assert quote.epid_group_id == b"\xaa\xbb\xcc\xdd"
    assert (quote.qe_svn, quote.pce_svn) == (11, 10)
    assert quote.cpu_svn == b"\x0f" * 16
    assert quote.attributes_flags == 0x07
    assert quote.xfrm == 0x1F
    assert quote.debug is True
    assert quote.mrenclave == bytes(range(32))
    assert quote.mrsigner == bytes(range(100, 132))
    assert quote.isv_prod_id == 0x1234
    assert quote.isv_svn == 0x0506
    assert quote.report_data == bytes(range(64))


def test_round_trip() -> None:
    data = bytes(_body())
    assert parse_quote_body(data).to_bytes() == data


def test_debug_flag() -> None:
    assert parse_quote_body(bytes(_body(flags=0x05))).debug is False
    assert parse_quote_body(bytes(_body(flags=0x07))).debug is True


@pytest.mark.parametrize("size", [0, 48, 431, 433, 436, 1116])
def test_wrong_length_is_rejected(size: int) -> None:
    data = bytes(_body()) + bytes(4)
    with pytest.raises(AttestationRejected) as exc:
        parse_quote_body(data[:size] if size <= len(data) else data.ljust(size, b"\0"))
    assert exc.value.check == "malformed_quote"


@pytest.mark.parametrize(
    "body",
    [_body(version=3), _body(version=0), _body(sign_type=2), _body(flags=0x06)],
    ids=["dcap-version", "version-0", "sign-type", "not-initted"],
)
def test_non_epid_or_uninitialised_quote_is_rejected(body: bytearray) -> None:
    with pytest.raises(AttestationRejected) as exc:
        parse_quote_body(bytes(body))
    assert exc.value.check == "malformed_quote"


def test_genuine_quote_body() -> None:
    report = json.loads((FIXTURES / "ias-report-v4-sw-hardening-needed.json").read_bytes())
    quote = parse_quote_body(base64.b64decode(report["isvEnclaveQuoteBody"]))
    assert (quote.version, quote.sign_type) == (2, 1)  # linkable EPID quote
    assert quote.mrenclave.hex() == (
        "92143ea742e1628677b5a8e280173b7264470bfb0611d520c2474aab9846168e"
    )
    assert quote.mrsigner.hex() == (
        "9affcfae47b848ec2caf1c49b4b283531e1cc425f93582b36806e52a43d78d1a"
    )
    assert quote.debug is True


def test_to_bytes_refuses_out_of_range_fields() -> None:
    quote = parse_quote_body(bytes(_body()))
    bad = QuoteBody(**{**quote.__dict__, "isv_svn": 70000})
    with pytest.raises(ValueError):
        bad.to_bytes()


@given(st.binary(max_size=600))
def test_arbitrary_bytes_parse_or_reject(data: bytes) -> None:
    try:
        parse_quote_body(data)
    except AttestationRejected as exc:
        assert exc.check == "malformed_quote"
