"""Property tests: on any input the parsers and the verifier either succeed or raise
`AttestationRejected`, never anything else (fail closed, no crash on the handshake path)."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from functools import cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seng_fw.attest import AttestationPolicy, AttestationRejected, IasVerifier
from seng_fw.attest.ias import b64decode_strict, parse_report, verify_ias_report
from seng_fw.attest.identity import Check
from seng_fw.attest.quote import parse_quote_body
from seng_fw.attest.ratls import EVIDENCE_OIDS, EvidenceEncoding, encode_evidence
from seng_fw.lab.ca import EnclaveCert, LabCA, build_ratls_certificate

# SENG_FUZZ_EXAMPLES=5000 for a longer campaign; the default keeps the unit suite fast.
FUZZ = settings(
    max_examples=int(os.environ.get("SENG_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@cache
def _ca() -> LabCA:
    return LabCA.generate()


@cache
def _verifier() -> IasVerifier:
    policy = AttestationPolicy(
        roots=(_ca().root_cert,),
        allowed_statuses=frozenset({"OK", "GROUP_OUT_OF_DATE"}),
        allow_debug=True,
        max_age=None,
    )
    return IasVerifier(policy)


@cache
def _enclaves() -> tuple[EnclaveCert, ...]:
    ca = _ca()
    zero = bytes(32)
    return (
        ca.issue_enclave_cert(
            mrenclave=zero, mrsigner=zero, key_size=256, encoding=EvidenceEncoding.V2018
        ),
        ca.issue_enclave_cert(
            mrenclave=zero, mrsigner=zero, status="GROUP_OUT_OF_DATE", debug=True
        ),
        ca.issue_enclave_cert(
            mrenclave=zero, mrsigner=zero, key_type="rsa", encoding=EvidenceEncoding.V2019
        ),
    )


def _accepts_or_rejects(call: Callable[[], object]) -> None:
    try:
        call()
    except AttestationRejected as exc:
        assert isinstance(exc.check, str) and exc.check == exc.check.lower()


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    buf = bytearray(data)
    for position, mask in flips:
        buf[position % len(buf)] ^= mask
    return bytes(buf[:cut] if cut is not None else buf)


flips_strategy = st.lists(
    st.tuples(st.integers(min_value=0, max_value=1 << 16), st.integers(min_value=1, max_value=255)),
    min_size=1,
    max_size=6,
)
cut_strategy = st.none() | st.integers(min_value=0, max_value=6000)
enclave_index = st.integers(min_value=0, max_value=2)


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_as_certificate(data: bytes) -> None:
    _accepts_or_rejects(lambda: _verifier().verify_certificate(data))


@FUZZ
@given(enclave_index, flips_strategy, cut_strategy)
def test_flipped_bytes_in_a_valid_certificate(
    index: int, flips: list[tuple[int, int]], cut: int | None
) -> None:
    cert = _mutate(_enclaves()[index].cert_der, flips, cut)
    _accepts_or_rejects(lambda: _verifier().verify_certificate(cert))


@FUZZ
@given(enclave_index, st.integers(min_value=0, max_value=3), flips_strategy, cut_strategy)
def test_mutated_evidence_in_a_validly_signed_certificate(
    index: int, which: int, flips: list[tuple[int, int]], cut: int | None
) -> None:
    # Re-signed after the mutation, so the damage reaches the evidence decoders rather than
    # stopping at the certificate's own signature.
    enclave = _enclaves()[index]
    ca = _ca()
    evidence = encode_evidence(
        enclave.encoding, enclave.report, enclave.signature_b64, ca.signing_cert, ca.root_cert
    )
    oid = EVIDENCE_OIDS[which]
    evidence[oid] = _mutate(evidence[oid], flips, cut)
    cert = build_ratls_certificate(enclave.private_key, evidence)
    _accepts_or_rejects(lambda: _verifier().verify_certificate(cert))


@FUZZ
@given(enclave_index, flips_strategy, cut_strategy)
def test_mutated_report_with_a_valid_signature(
    index: int, flips: list[tuple[int, int]], cut: int | None
) -> None:
    # Signed after the mutation, so the damage reaches the JSON and quote parsers.
    ca = _ca()
    report = _mutate(_enclaves()[index].report, flips, cut)
    signature = ca.sign_report(report)
    _accepts_or_rejects(
        lambda: verify_ias_report(report, signature, ca.signing_cert, _verifier().policy)
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
report_keys = st.sampled_from(
    [
        "id",
        "timestamp",
        "version",
        "isvEnclaveQuoteStatus",
        "isvEnclaveQuoteBody",
        "advisoryIDs",
        "advisoryURL",
        "platformInfoBlob",
        "revocationReason",
        "nonce",
    ]
)


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_as_report(data: bytes) -> None:
    _accepts_or_rejects(lambda: parse_report(data))


@FUZZ
@given(st.dictionaries(report_keys, json_values, max_size=10))
def test_report_fields_of_any_type(fields: dict[str, object]) -> None:
    _accepts_or_rejects(lambda: parse_report(json.dumps(fields).encode()))


@FUZZ
@given(st.dictionaries(report_keys, json_values, max_size=4))
def test_valid_report_with_fields_replaced(changes: dict[str, object]) -> None:
    fields = json.loads(_enclaves()[1].report)
    fields.update(changes)
    _accepts_or_rejects(lambda: parse_report(json.dumps(fields).encode()))


@FUZZ
@given(st.binary(max_size=600))
def test_arbitrary_quote_bodies(data: bytes) -> None:
    _accepts_or_rejects(lambda: parse_quote_body(data))


@FUZZ
@given(st.text(max_size=64) | st.binary(max_size=64))
def test_strict_base64_round_trips_or_rejects(data: str | bytes) -> None:
    try:
        decoded = b64decode_strict(data, Check.MALFORMED_EXTENSION)
    except AttestationRejected:
        return
    raw = data.encode() if isinstance(data, str) else data
    assert base64.b64encode(decoded) == raw  # one value, one accepted encoding
