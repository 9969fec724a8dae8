"""Property tests of DCAP evidence parsing: on any extension value, any mutated certificate,
quote or CBOR, the DCAP verifier and the dispatcher either succeed or raise
`AttestationRejected` (one of our `Check` names), never anything else."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import cbor2
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seng_fw.attest.collateral import CollateralError, CollateralStore, parse_bundle
from seng_fw.attest.dcap import AnyEvidenceVerifier, DcapPolicy, DcapVerifier, verify_dcap_quote
from seng_fw.attest.identity import AttestationRejected, Check
from seng_fw.attest.policy import AttestationPolicy
from seng_fw.attest.ratls_dcap import (
    CBOR_TAG_TEE_QUOTE,
    GRAMINE_OIDS,
    SGX_RA_TLS_DCAP_OIDS,
    check_dice_claims,
    parse_dice_evidence,
)
from seng_fw.attest.verifier import IasVerifier
from seng_fw.lab.ca import LabCA, build_ratls_certificate, generate_client_key
from seng_fw.lab.dcap import DcapEnclaveCert, LabDcapCA

FUZZ = settings(
    max_examples=int(os.environ.get("SENG_FUZZ_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
CHECKS = {str(check) for check in Check}
FIXTURES = Path(__file__).parent.parent / "fixtures" / "dcap"
GENUINE_QUOTE = (FIXTURES / "dcap-qvl-sgx-quote.bin").read_bytes()


@cache
def _dcap() -> LabDcapCA:
    return LabDcapCA.generate()


@cache
def _verifier() -> AnyEvidenceVerifier:
    ca = _dcap()
    store = CollateralStore([parse_bundle(ca.collateral_json())])
    dcap = DcapVerifier(
        DcapPolicy(
            roots=(ca.root_cert,), collateral=store, allowed_statuses=frozenset({"UpToDate"})
        )
    )
    epid = IasVerifier(AttestationPolicy(roots=(LabCA.generate().root_cert,)))
    return AnyEvidenceVerifier(epid, dcap)


@cache
def _key() -> object:
    return generate_client_key()


@cache
def _enclaves() -> tuple[DcapEnclaveCert, ...]:
    ca = _dcap()
    zero = bytes(32)
    return (
        ca.issue_enclave_cert(mrenclave=zero, mrsigner=zero),
        ca.issue_enclave_cert(mrenclave=zero, mrsigner=zero, layout="gramine"),
        ca.issue_enclave_cert(mrenclave=zero, mrsigner=zero, layout="gramine", dice=True),
    )


def _accepts_or_rejects(call: Callable[[], object]) -> None:
    try:
        call()
    except AttestationRejected as exc:
        assert exc.check in CHECKS


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    buf = bytearray(data)
    for position, mask in flips:
        buf[position % len(buf)] ^= mask
    return bytes(buf[:cut] if cut is not None else buf)


flips = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(1, 255)), min_size=1, max_size=6)
cuts = st.none() | st.integers(0, 6000)
evidence_oids = st.sampled_from([*SGX_RA_TLS_DCAP_OIDS, *GRAMINE_OIDS])

# CBOR values of the shapes the parser looks for, nested and mixed with junk.
cbor_leaves = (
    st.none() | st.booleans() | st.integers() | st.binary(max_size=64) | st.text(max_size=16)
)
cbor_values = st.recursive(
    cbor_leaves,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=12) | st.integers(), inner, max_size=3)
        | st.builds(cbor2.CBORTag, st.sampled_from([CBOR_TAG_TEE_QUOTE, 1, 24]), inner)
    ),
    max_leaves=12,
)


@FUZZ
@given(values=st.dictionaries(evidence_oids, st.binary(max_size=600), min_size=1, max_size=4))
def test_any_extension_values(values: dict[x509.ObjectIdentifier, bytes]) -> None:
    cert = build_ratls_certificate(_key(), values)  # type: ignore[arg-type]
    _accepts_or_rejects(lambda: _verifier().verify_certificate(cert))


@FUZZ
@given(oid=evidence_oids, value=cbor_values)
def test_any_cbor_in_any_extension(oid: x509.ObjectIdentifier, value: object) -> None:
    cert = build_ratls_certificate(_key(), {oid: cbor2.dumps(value)})  # type: ignore[arg-type]
    _accepts_or_rejects(lambda: _verifier().verify_certificate(cert))


@FUZZ
@given(quote=st.binary(max_size=64), claims=cbor_values, junk=st.binary(max_size=8))
def test_any_dice_evidence(quote: bytes, claims: object, junk: bytes) -> None:
    quote = GENUINE_QUOTE[: len(GENUINE_QUOTE) - len(quote)] + quote
    claims_bytes = cbor2.dumps(claims)
    evidence = cbor2.dumps(cbor2.CBORTag(CBOR_TAG_TEE_QUOTE, [quote, claims_bytes])) + junk
    _accepts_or_rejects(lambda: parse_dice_evidence(evidence))
    _accepts_or_rejects(lambda: check_dice_claims(claims_bytes, b"spki"))
    _accepts_or_rejects(lambda: check_dice_claims(cbor2.dumps({"pubkey-hash": claims_bytes}), b"k"))


@FUZZ
@given(which=st.integers(0, 2), flips=flips, cut=cuts)
def test_mutated_certificates(which: int, flips: list[tuple[int, int]], cut: int | None) -> None:
    cert = _mutate(_enclaves()[which].cert_der, flips, cut)
    _accepts_or_rejects(lambda: _verifier().verify_certificate(cert))


@FUZZ
@given(flips=flips, cut=cuts)
def test_mutated_quotes(flips: list[tuple[int, int]], cut: int | None) -> None:
    policy = _verifier().dcap
    assert policy is not None
    quote = _mutate(_enclaves()[0].quote, flips, cut)
    at = datetime.now(UTC)
    _accepts_or_rejects(lambda: verify_dcap_quote(quote, policy.policy, at))


GENUINE_FIELDS: dict[str, str] = json.loads((FIXTURES / "dcap-qvl-sgx-collateral.json").read_text())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=16),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@FUZZ
@given(
    name=st.sampled_from(sorted(GENUINE_FIELDS)),
    value=json_values | st.text(max_size=64),
    flips=flips,
)
def test_any_collateral_bundle(name: str, value: object, flips: list[tuple[int, int]]) -> None:
    # A field replaced by anything, or the bundle's bytes flipped: parsed, or CollateralError.
    for text in (
        json.dumps({**GENUINE_FIELDS, name: value}),
        _mutate(json.dumps(GENUINE_FIELDS).encode(), flips, None),
    ):
        with contextlib.suppress(CollateralError):
            parse_bundle(text)


def _with_serial_byte(cert_der: bytes, first: int) -> bytes:
    """The certificate with the first octet of its serial number replaced."""
    cert = x509.load_der_x509_certificate(cert_der)
    serial = cert.serial_number.to_bytes((cert.serial_number.bit_length() + 8) // 8, "big")
    at = cert_der.index(bytes([0x02, len(serial)]) + serial)  # INTEGER serialNumber
    return cert_der[: at + 2] + bytes([first]) + cert_der[at + 3 :]


def test_a_certificate_whose_serial_is_not_positive_is_refused_without_a_warning() -> None:
    """Seen by the fuzzer: cryptography only warns about a negative or zero serial
    (RFC 5280 forbids it); the verifier refuses it as malformed."""
    for first in (0x80, 0xFF):  # negative serials
        cert = _with_serial_byte(_enclaves()[0].cert_der, first)
        try:
            _verifier().verify_certificate(cert)
        except AttestationRejected as exc:
            assert exc.check == Check.MALFORMED_CERTIFICATE, exc
        else:
            raise AssertionError("a negative serial number was accepted")
