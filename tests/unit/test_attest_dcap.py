"""DCAP verification: genuine third-party evidence, tampering, and one test per rejection.

Genuine data (tests/fixtures/dcap, from dcap-qvl's samples) gives what only Intel can sign:
a real quote, Intel's PCK chain and collateral. The lab DCAP CA (seng_fw.lab.dcap) gives
what genuine data cannot: a revoked PCK, a DEBUG enclave, every TCB status, fresh collateral.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dcap_qvl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from seng_fw.attest.collateral import CollateralStore, parse_bundle
from seng_fw.attest.dcap import (
    ACCEPTABLE_TCB_STATUSES,
    AnyEvidenceVerifier,
    DcapPolicy,
    DcapVerifier,
    verify_dcap_quote,
)
from seng_fw.attest.identity import AttestationRejected, Check
from seng_fw.attest.policy import AttestationPolicy
from seng_fw.attest.ratls import EvidenceEncoding, encode_evidence, report_data_for_key
from seng_fw.attest.ratls_dcap import (
    OID_DCAP_QUOTE,
    OID_GRAMINE_LEGACY_QUOTE,
    OID_TCG_DICE_TAGGED_EVIDENCE,
    dice_claims,
    encode_dice_evidence,
    encode_sgx_ra_tls_dcap,
)
from seng_fw.attest.verifier import IasVerifier
from seng_fw.lab.ca import LabCA, build_ratls_certificate, generate_client_key
from seng_fw.lab.dcap import (
    QE_SVN_OUT_OF_DATE,
    LabDcapCA,
    LabPlatform,
    TcbStatus,
    dice_report_data,
    dice_tagged_evidence,
    gramine_claims,
    gramine_extensions,
    gramine_report_data,
    sgx_ra_tls_extensions,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "dcap"
GENUINE_QUOTE = (FIXTURES / "dcap-qvl-sgx-quote.bin").read_bytes()
GENUINE_COLLATERAL = (FIXTURES / "dcap-qvl-sgx-collateral.json").read_text()
INTEL_ROOT = x509.load_pem_x509_certificate((FIXTURES / "intel-sgx-root-ca.pem").read_bytes())
GENUINE_STATUS = "ConfigurationAndSWHardeningNeeded"
GENUINE_ADVISORIES = ("INTEL-SA-00289", "INTEL-SA-00615")
INSIDE = datetime(2025, 6, 20, tzinfo=UTC)  # inside the collateral's window
AFTER = datetime(2025, 7, 20, tzinfo=UTC)  # QE identity, TCB info and PCK CRL expired
BEFORE = datetime(2025, 6, 19, tzinfo=UTC)  # TCB info not issued yet

# Offsets in a quote v3: header 48, ISV report body 384, signature data length 4, then the
# ISV report signature 64, attestation key 64, QE report 384, QE report signature 64, ...
ISV_BODY_BYTE = 48 + 100
ATTESTATION_KEY_BYTE = 436 + 64 + 10
QE_REPORT_SIGNATURE_BYTE = 436 + 64 + 64 + 384 + 10

MRENCLAVE = bytes(range(32))
MRSIGNER = bytes(range(32, 64))


def genuine_policy(**kwargs: Any) -> DcapPolicy:
    settings: dict[str, Any] = {
        "roots": (INTEL_ROOT,),
        "collateral": CollateralStore([parse_bundle(GENUINE_COLLATERAL, "genuine")]),
        "allowed_statuses": frozenset({"UpToDate", GENUINE_STATUS}),
    }
    settings.update(kwargs)
    return DcapPolicy(**settings)


def tampered(data: bytes, offset: int) -> bytes:
    changed = bytearray(data)
    changed[offset] ^= 0x01
    return bytes(changed)


def rejected(check: Check, call: Callable[[], object]) -> AttestationRejected:
    with pytest.raises(AttestationRejected) as info:
        call()
    assert info.value.check == check, info.value.message
    return info.value


# --- genuine evidence ---


def test_genuine_quote_verifies_inside_its_collateral_validity() -> None:
    identity = verify_dcap_quote(GENUINE_QUOTE, genuine_policy(), INSIDE).identity
    assert identity.evidence == "dcap"
    assert identity.tcb_status == identity.quote_status == GENUINE_STATUS
    assert identity.advisory_ids == GENUINE_ADVISORIES
    assert identity.fmspc == "00A067110000"
    assert identity.mrenclave.hex().startswith("33d8736db756ed49")
    assert identity.report_data == b"Hello, world!".ljust(64, b"\0")
    assert not identity.debug
    assert identity.collateral_expires == datetime(2025, 7, 19, 10, 1, 18, tzinfo=UTC)
    # No time in a quote: the timestamp is the collateral's issue time, not the check's, so
    # the same quote gives the same identity (the gateway pairs tunnels #1 and #2 by it).
    assert identity.timestamp == datetime(2025, 6, 19, 10, 56, 11, tzinfo=UTC)
    later = verify_dcap_quote(GENUINE_QUOTE, genuine_policy(), INSIDE + timedelta(days=3))
    assert later.identity == identity
    document = identity.to_json()
    assert document["evidence"] == "dcap" and document["fmspc"] == "00A067110000"
    assert document["collateral_expires"] == "2025-07-19T10:01:18+00:00"


def test_genuine_quote_refused_after_its_collateral_expired() -> None:
    rejected(
        Check.COLLATERAL_EXPIRED, lambda: verify_dcap_quote(GENUINE_QUOTE, genuine_policy(), AFTER)
    )


def test_genuine_quote_refused_before_its_collateral_was_issued() -> None:
    rejected(
        Check.COLLATERAL_NOT_YET_VALID,
        lambda: verify_dcap_quote(GENUINE_QUOTE, genuine_policy(), BEFORE),
    )


def test_dcap_qvl_itself_fails_closed_on_expired_collateral_and_missing_crls() -> None:
    # Our store refuses expired bundles before asking dcap-qvl; dcap-qvl must refuse them
    # too (defence in depth), and must not skip revocation checking when a CRL is missing.
    root = INTEL_ROOT.public_bytes(serialization.Encoding.DER)
    collateral = dcap_qvl.QuoteCollateralV3.from_json(GENUINE_COLLATERAL)
    inside = int(INSIDE.timestamp())
    assert dcap_qvl.verify_with_root_ca(GENUINE_QUOTE, collateral, root, inside).status
    with pytest.raises(ValueError, match="expired"):
        dcap_qvl.verify_with_root_ca(GENUINE_QUOTE, collateral, root, int(AFTER.timestamp()))
    # Past every part but the root CA CRL: the CRL's own nextUpdate is enforced.
    with pytest.raises(ValueError, match="CrlExpired"):
        dcap_qvl.verify_with_root_ca(
            GENUINE_QUOTE, collateral, root, int(datetime(2026, 12, 2, tzinfo=UTC).timestamp())
        )
    fields = json.loads(GENUINE_COLLATERAL)
    for name in ("pck_crl", "root_ca_crl"):
        broken = dcap_qvl.QuoteCollateralV3.from_json(json.dumps({**fields, name: ""}))
        with pytest.raises(ValueError, match="CRL"):
            dcap_qvl.verify_with_root_ca(GENUINE_QUOTE, broken, root, inside)
    # A CRL of the wrong issuer leaves the PCK's revocation status unknown: refused.
    wrong = dcap_qvl.QuoteCollateralV3.from_json(
        json.dumps({**fields, "pck_crl": fields["root_ca_crl"]})
    )
    with pytest.raises(ValueError, match="UnknownRevocationStatus"):
        dcap_qvl.verify_with_root_ca(GENUINE_QUOTE, wrong, root, inside)
    with pytest.raises(ValueError):
        dcap_qvl.QuoteCollateralV3.from_json(
            json.dumps({k: v for k, v in fields.items() if k != "pck_crl"})
        )


def test_tcb_status_not_allowed() -> None:
    error = rejected(
        Check.TCB_STATUS,
        lambda: verify_dcap_quote(
            GENUINE_QUOTE, genuine_policy(allowed_statuses=frozenset({"UpToDate"})), INSIDE
        ),
    )
    assert GENUINE_STATUS in error.message


def test_refused_advisory() -> None:
    policy = genuine_policy(refuse_advisories=frozenset({"INTEL-SA-00615"}))
    error = rejected(
        Check.ADVISORY_REFUSED, lambda: verify_dcap_quote(GENUINE_QUOTE, policy, INSIDE)
    )
    assert "INTEL-SA-00615" in error.message
    # An advisory that does not apply refuses nothing.
    policy = genuine_policy(refuse_advisories=frozenset({"INTEL-SA-00334"}))
    assert verify_dcap_quote(GENUINE_QUOTE, policy, INSIDE).identity.advisory_ids


def test_tampered_report_body_breaks_the_quote_signature() -> None:
    quote = tampered(GENUINE_QUOTE, ISV_BODY_BYTE)
    rejected(Check.QUOTE_SIGNATURE, lambda: verify_dcap_quote(quote, genuine_policy(), INSIDE))


def test_tampered_qe_report_signature() -> None:
    quote = tampered(GENUINE_QUOTE, QE_REPORT_SIGNATURE_BYTE)
    rejected(Check.QE_REPORT_SIGNATURE, lambda: verify_dcap_quote(quote, genuine_policy(), INSIDE))


def test_attestation_key_not_bound_by_the_qe_report() -> None:
    quote = tampered(GENUINE_QUOTE, ATTESTATION_KEY_BYTE)
    rejected(
        Check.ATTESTATION_KEY_NOT_BOUND, lambda: verify_dcap_quote(quote, genuine_policy(), INSIDE)
    )


def test_every_tampered_byte_of_the_signed_part_is_refused() -> None:
    # Header and report body are what the attestation key signs; a sample of offsets.
    for offset in range(0, 432, 7):
        with pytest.raises(AttestationRejected):
            verify_dcap_quote(tampered(GENUINE_QUOTE, offset), genuine_policy(), INSIDE)


def test_tampered_collateral_signature() -> None:
    fields = json.loads(GENUINE_COLLATERAL)
    for name in ("tcb_info_signature", "qe_identity_signature"):
        signature = bytearray(bytes.fromhex(fields[name]))
        signature[3] ^= 1
        bundle = parse_bundle(json.dumps({**fields, name: signature.hex()}))
        policy = genuine_policy(collateral=CollateralStore([bundle]))
        rejected(
            Check.COLLATERAL_INVALID, lambda p=policy: verify_dcap_quote(GENUINE_QUOTE, p, INSIDE)
        )


def test_pck_chain_to_another_root(lab_dcap: LabDcapCA) -> None:
    # Intel's genuine chain judged against the lab root: not a configured trust anchor.
    policy = genuine_policy(roots=(lab_dcap.root_cert,))
    rejected(Check.UNTRUSTED_ROOT, lambda: verify_dcap_quote(GENUINE_QUOTE, policy, INSIDE))
    # ... and a lab quote judged against Intel's root.
    enclave = lab_dcap.issue_enclave_cert(mrenclave=MRENCLAVE, mrsigner=MRSIGNER)
    policy = lab_policy(lab_dcap, roots=(INTEL_ROOT,))
    rejected(
        Check.UNTRUSTED_ROOT, lambda: DcapVerifier(policy).verify_certificate(enclave.cert_der)
    )


def test_any_configured_root_may_be_the_one(lab_dcap: LabDcapCA) -> None:
    policy = genuine_policy(roots=(lab_dcap.root_cert, INTEL_ROOT))
    assert verify_dcap_quote(GENUINE_QUOTE, policy, INSIDE).identity.fmspc == "00A067110000"


def test_no_collateral_for_the_platform() -> None:
    policy = genuine_policy(collateral=CollateralStore())
    error = rejected(Check.NO_COLLATERAL, lambda: verify_dcap_quote(GENUINE_QUOTE, policy, INSIDE))
    assert "00A067110000" in error.message


def test_unsupported_and_malformed_quotes() -> None:
    v4 = struct.pack("<H", 4) + GENUINE_QUOTE[2:]
    rejected(Check.UNSUPPORTED_QUOTE, lambda: verify_dcap_quote(v4, genuine_policy(), INSIDE))
    tdx = GENUINE_QUOTE[:4] + struct.pack("<I", 0x81) + GENUINE_QUOTE[8:]
    rejected(Check.UNSUPPORTED_QUOTE, lambda: verify_dcap_quote(tdx, genuine_policy(), INSIDE))
    rejected(
        Check.MALFORMED_QUOTE,
        lambda: verify_dcap_quote(GENUINE_QUOTE[:400], genuine_policy(), INSIDE),
    )
    rejected(
        Check.MALFORMED_QUOTE,
        lambda: verify_dcap_quote(GENUINE_QUOTE[:1000], genuine_policy(), INSIDE),
    )


def test_policy_never_allows_revoked() -> None:
    with pytest.raises(ValueError, match="Revoked"):
        genuine_policy(allowed_statuses=frozenset({"Revoked"}))
    assert "Revoked" not in ACCEPTABLE_TCB_STATUSES


# --- genuine quote in RA-TLS certificates made here: REPORTDATA binds another key ---


@pytest.mark.parametrize("layout", ["sgx-ra-tls", "gramine-legacy", "gramine-dice"])
def test_genuine_quote_in_a_certificate_of_another_key(layout: str) -> None:
    key = generate_client_key()
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if layout == "sgx-ra-tls":
        extensions = encode_sgx_ra_tls_dcap(GENUINE_QUOTE)
    elif layout == "gramine-legacy":
        extensions = {OID_GRAMINE_LEGACY_QUOTE: GENUINE_QUOTE}
    else:
        evidence = encode_dice_evidence(GENUINE_QUOTE, dice_claims(spki))
        extensions = {OID_TCG_DICE_TAGGED_EVIDENCE: evidence}
    cert = build_ratls_certificate(key, extensions, now=INSIDE)
    verifier = DcapVerifier(genuine_policy())
    # Every check up to the key binding passes (the quote is genuine)...
    error = rejected(Check.REPORT_DATA_MISMATCH, lambda: verifier.verify_certificate(cert, INSIDE))
    assert "REPORTDATA" in error.message
    # ... and after the collateral's validity it is the collateral that fails first.
    rejected(Check.COLLATERAL_EXPIRED, lambda: verifier.verify_certificate(cert, AFTER))


def test_sgx_ra_tls_pck_certificate_must_match_the_quotes(lab_dcap: LabDcapCA) -> None:
    # The genuine quote embeds Intel's PCK chain; .7/.8 naming a lab PCK contradict it.
    platform = lab_dcap.platform()
    extensions = sgx_ra_tls_extensions(
        GENUINE_QUOTE,
        platform,
        tcb_info_body=lab_dcap.pcs_tcb_info_body(),
        tcb_issuer_chain=lab_dcap.tcb_issuer_chain_pem,
    )
    cert = build_ratls_certificate(generate_client_key(), extensions, now=INSIDE)
    rejected(
        Check.PCK_CERT_MISMATCH,
        lambda: DcapVerifier(genuine_policy()).verify_certificate(cert, INSIDE),
    )


# --- lab evidence: what genuine data cannot give ---


@pytest.fixture(scope="module")
def lab_dcap() -> LabDcapCA:
    return LabDcapCA.generate()


def lab_policy(ca: LabDcapCA, **kwargs: Any) -> DcapPolicy:
    settings: dict[str, Any] = {
        "roots": (ca.root_cert,),
        "collateral": CollateralStore([parse_bundle(ca.collateral_json(), "lab")]),
    }
    settings.update(kwargs)
    return DcapPolicy(**settings)


@pytest.mark.parametrize(
    ("layout", "dice"), [("sgx-ra-tls", False), ("gramine", False), ("gramine", True)]
)
@pytest.mark.parametrize("key_type", ["ecdsa", "rsa"])
def test_lab_certificate_admitted(
    lab_dcap: LabDcapCA, layout: str, dice: bool, key_type: str
) -> None:
    enclave = lab_dcap.issue_enclave_cert(
        mrenclave=MRENCLAVE,
        mrsigner=MRSIGNER,
        layout=layout,
        dice=dice,
        key_type=key_type,  # type: ignore[arg-type]
        isv_prod_id=7,
        isv_svn=3,
    )
    identity = DcapVerifier(lab_policy(lab_dcap)).verify_certificate(enclave.cert_der)
    assert (identity.mrenclave, identity.mrsigner) == (MRENCLAVE, MRSIGNER)
    assert (identity.isv_prod_id, identity.isv_svn) == (7, 3)
    assert identity.tcb_status == "UpToDate" and identity.evidence == "dcap"
    assert identity.fmspc == "00A0655E0000"


@pytest.mark.parametrize("status", sorted(ACCEPTABLE_TCB_STATUSES - {"UpToDate"}))
def test_each_tcb_status_only_when_allowed(lab_dcap: LabDcapCA, status: str) -> None:
    enclave = lab_dcap.issue_enclave_cert(mrenclave=MRENCLAVE, mrsigner=MRSIGNER, tcb_status=status)
    refusing = DcapVerifier(lab_policy(lab_dcap))
    error = rejected(Check.TCB_STATUS, lambda: refusing.verify_certificate(enclave.cert_der))
    assert status in error.message
    allowing = DcapVerifier(lab_policy(lab_dcap, allowed_statuses=frozenset({"UpToDate", status})))
    identity = allowing.verify_certificate(enclave.cert_der)
    assert identity.tcb_status == status
    assert identity.advisory_ids  # every lab level below UpToDate names advisories


def test_revoked_tcb_level_is_never_accepted(lab_dcap: LabDcapCA) -> None:
    enclave = lab_dcap.issue_enclave_cert(
        mrenclave=MRENCLAVE, mrsigner=MRSIGNER, tcb_status=TcbStatus.REVOKED
    )
    everything = lab_policy(lab_dcap, allowed_statuses=ACCEPTABLE_TCB_STATUSES)
    error = rejected(
        Check.TCB_STATUS, lambda: DcapVerifier(everything).verify_certificate(enclave.cert_der)
    )
    assert "Revoked" in error.message


def test_revoked_pck_certificate() -> None:
    ca = LabDcapCA.generate()
    enclave = ca.issue_enclave_cert(mrenclave=MRENCLAVE, mrsigner=MRSIGNER, revoked_pck=True)
    rejected(
        Check.CERT_REVOKED,
        lambda: DcapVerifier(lab_policy(ca)).verify_certificate(enclave.cert_der),
    )


def test_debug_enclave(lab_dcap: LabDcapCA) -> None:
    enclave = lab_dcap.issue_enclave_cert(mrenclave=MRENCLAVE, mrsigner=MRSIGNER, debug=True)
    for allow in (False, True):  # dcap-qvl 0.7 refuses DEBUG enclaves whatever we allow
        verifier = DcapVerifier(lab_policy(lab_dcap, allow_debug=allow))
        rejected(Check.DEBUG_ENCLAVE, lambda v=verifier: v.verify_certificate(enclave.cert_der))


def test_out_of_date_quoting_enclave(lab_dcap: LabDcapCA) -> None:
    enclave = lab_dcap.issue_enclave_cert(
        mrenclave=MRENCLAVE, mrsigner=MRSIGNER, qe_svn=QE_SVN_OUT_OF_DATE
    )
    error = rejected(
        Check.TCB_STATUS,
        lambda: DcapVerifier(lab_policy(lab_dcap)).verify_certificate(enclave.cert_der),
    )
    assert "OutOfDate" in error.message


def test_expired_lab_collateral_and_an_expired_pck_crl_alone(lab_dcap: LabDcapCA) -> None:
    now = datetime.now(UTC)
    enclave = lab_dcap.issue_enclave_cert(mrenclave=MRENCLAVE, mrsigner=MRSIGNER)
    verifier = DcapVerifier(lab_policy(lab_dcap))
    rejected(
        Check.COLLATERAL_EXPIRED,
        lambda: verifier.verify_certificate(enclave.cert_der, now + timedelta(days=31)),
    )
    # Only the PCK CRL expires early: the bundle's window is the shortest of its parts'.
    fields = lab_dcap.collateral(now)
    fields["pck_crl"] = lab_dcap.pck_crl(now, timedelta(days=1)).hex()
    bundle = parse_bundle(json.dumps(fields))
    assert bundle.expires < now + timedelta(days=1, minutes=1)
    later = now + timedelta(days=2)
    policy = lab_policy(lab_dcap, collateral=CollateralStore([bundle]))
    rejected(
        Check.COLLATERAL_EXPIRED,
        lambda: DcapVerifier(policy).verify_certificate(enclave.cert_der, later),
    )
    # dcap-qvl alone refuses it too: an expired PCK CRL is not silently ignored.
    with pytest.raises(ValueError, match="CrlExpired"):
        dcap_qvl.verify_with_root_ca(
            enclave.quote, bundle.collateral, lab_dcap.root_der, int(later.timestamp())
        )


def test_report_data_of_another_key(lab_dcap: LabDcapCA) -> None:
    other = generate_client_key().public_key()
    for layout in ("sgx-ra-tls", "gramine"):
        enclave = lab_dcap.issue_enclave_cert(
            mrenclave=MRENCLAVE,
            mrsigner=MRSIGNER,
            layout=layout,
            report_data_override=report_data_for_key(other),
        )
        rejected(
            Check.REPORT_DATA_MISMATCH,
            lambda e=enclave: DcapVerifier(lab_policy(lab_dcap)).verify_certificate(e.cert_der),
        )


def test_sgx_ra_tls_binding_is_not_gramines(lab_dcap: LabDcapCA) -> None:
    # A quote bound the Gramine way, carried under sgx-ra-tls's (correctly encoded) .6 OID,
    # is judged as sgx-ra-tls evidence: its binding does not match.
    key = generate_client_key()
    platform = lab_dcap.platform()
    quote = platform.quote(
        mrenclave=MRENCLAVE, mrsigner=MRSIGNER, report_data=gramine_report_data(key.public_key())
    )
    cert = build_ratls_certificate(key, {OID_DCAP_QUOTE: quote})
    rejected(
        Check.REPORT_DATA_MISMATCH,
        lambda: DcapVerifier(lab_policy(lab_dcap)).verify_certificate(cert),
    )
    # The same quote under Gramine's mis-encoded OID is accepted.
    cert = build_ratls_certificate(key, gramine_extensions(quote))
    assert DcapVerifier(lab_policy(lab_dcap)).verify_certificate(cert).mrenclave == MRENCLAVE


def test_gramine_legacy_oid_is_matched_by_its_raw_bytes(lab_dcap: LabDcapCA) -> None:
    enclave = lab_dcap.issue_enclave_cert(mrenclave=MRENCLAVE, mrsigner=MRSIGNER, layout="gramine")
    # On the wire: OID tag 06, length 0B, then Gramine's 11 bytes (with their own 06 09).
    assert bytes.fromhex("060b06092a864886f84d8a3906") in enclave.cert_der
    assert DcapVerifier(lab_policy(lab_dcap)).verify_certificate(enclave.cert_der)


def test_gramine_dice_claims_of_another_key(lab_dcap: LabDcapCA) -> None:
    key = generate_client_key()
    claims = gramine_claims(generate_client_key().public_key())
    quote = lab_dcap.platform().quote(
        mrenclave=MRENCLAVE, mrsigner=MRSIGNER, report_data=dice_report_data(claims)
    )
    cert = build_ratls_certificate(
        key, {OID_TCG_DICE_TAGGED_EVIDENCE: dice_tagged_evidence(quote, claims)}
    )
    # Genuine lab evidence whose REPORTDATA matches its claims, but the claims name another key.
    rejected(
        Check.REPORT_DATA_MISMATCH,
        lambda: DcapVerifier(lab_policy(lab_dcap)).verify_certificate(cert),
    )


def test_gramine_legacy_and_dice_must_attest_the_same_enclave(lab_dcap: LabDcapCA) -> None:
    key = generate_client_key()
    platform = lab_dcap.platform()
    claims = gramine_claims(key.public_key())
    dice_quote = platform.quote(
        mrenclave=MRENCLAVE, mrsigner=MRSIGNER, report_data=dice_report_data(claims)
    )
    other_enclave = platform.quote(
        mrenclave=bytes(32), mrsigner=MRSIGNER, report_data=gramine_report_data(key.public_key())
    )
    cert = build_ratls_certificate(
        key, gramine_extensions(other_enclave, dice_tagged_evidence(dice_quote, claims))
    )
    rejected(
        Check.MALFORMED_EXTENSION,
        lambda: DcapVerifier(lab_policy(lab_dcap)).verify_certificate(cert),
    )


# --- the dispatcher ---


@pytest.fixture(scope="module")
def lab_epid(tmp_path_factory: pytest.TempPathFactory) -> LabCA:
    return LabCA.create(tmp_path_factory.mktemp("lab-epid"))


def any_verifier(lab_epid: LabCA, lab_dcap: LabDcapCA) -> AnyEvidenceVerifier:
    epid = IasVerifier(AttestationPolicy(roots=(lab_epid.root_cert,)))
    return AnyEvidenceVerifier(epid, DcapVerifier(lab_policy(lab_dcap)))


def test_dispatcher_picks_the_format_the_certificate_carries(
    lab_epid: LabCA, lab_dcap: LabDcapCA
) -> None:
    verifier = any_verifier(lab_epid, lab_dcap)
    epid_cert = lab_epid.issue_enclave_cert(mrenclave=MRENCLAVE, mrsigner=MRSIGNER)
    assert verifier.verify_certificate(epid_cert.cert_der).evidence == "epid"
    for layout in ("sgx-ra-tls", "gramine"):
        dcap_cert = lab_dcap.issue_enclave_cert(
            mrenclave=MRENCLAVE, mrsigner=MRSIGNER, layout=layout
        )
        assert verifier.verify_certificate(dcap_cert.cert_der).evidence == "dcap"


def test_both_dcap_layouts_in_one_certificate(lab_epid: LabCA, lab_dcap: LabDcapCA) -> None:
    enclave = lab_dcap.issue_enclave_cert(mrenclave=MRENCLAVE, mrsigner=MRSIGNER)
    key = generate_client_key()
    cert = build_ratls_certificate(
        key, {OID_DCAP_QUOTE: enclave.quote, OID_GRAMINE_LEGACY_QUOTE: enclave.quote}
    )
    for verifier in (any_verifier(lab_epid, lab_dcap), DcapVerifier(lab_policy(lab_dcap))):
        rejected(Check.MULTIPLE_EVIDENCE_FORMATS, lambda v=verifier: v.verify_certificate(cert))


def test_epid_and_dcap_in_one_certificate(lab_epid: LabCA, lab_dcap: LabDcapCA) -> None:
    epid = lab_epid.issue_enclave_cert(mrenclave=MRENCLAVE, mrsigner=MRSIGNER)
    dcap = lab_dcap.issue_enclave_cert(mrenclave=MRENCLAVE, mrsigner=MRSIGNER)
    values = encode_evidence(
        EvidenceEncoding.V2019,
        epid.report,
        epid.signature_b64,
        lab_epid.signing_cert,
        lab_epid.root_cert,
    )
    cert = build_ratls_certificate(generate_client_key(), {**values, OID_DCAP_QUOTE: dcap.quote})
    rejected(
        Check.MULTIPLE_EVIDENCE_FORMATS,
        lambda: any_verifier(lab_epid, lab_dcap).verify_certificate(cert),
    )


def test_dispatcher_without_dcap_or_without_evidence(lab_epid: LabCA, lab_dcap: LabDcapCA) -> None:
    only_epid = AnyEvidenceVerifier(
        IasVerifier(AttestationPolicy(roots=(lab_epid.root_cert,))), None
    )
    dcap = lab_dcap.issue_enclave_cert(mrenclave=MRENCLAVE, mrsigner=MRSIGNER)
    rejected(Check.EVIDENCE_FORMAT_NOT_ALLOWED, lambda: only_epid.verify_certificate(dcap.cert_der))
    plain = build_ratls_certificate(generate_client_key(), {})
    rejected(Check.MISSING_EXTENSION, lambda: only_epid.verify_certificate(plain))


def test_trust_anchors_must_be_ca_certificates(lab_dcap: LabDcapCA) -> None:
    with pytest.raises(ValueError, match="not a CA"):
        genuine_policy(roots=(lab_dcap.tcb_signing_cert,))


def _without_embedded_chain(quote: bytes, platform: LabPlatform) -> bytes:
    """The quote with certification data type 3 (encrypted PPID, CPUSVN, PCESVN, PCEID)
    instead of 5: what a platform without a PCK cache sends. The ISV signature covers header
    and body only, the QE report the attestation key and QE auth data: both stay valid."""
    offset = 436 + 64 + 64 + 384 + 64  # QE auth data length
    (size,) = struct.unpack_from("<H", quote, offset)
    offset += 2 + size
    body = bytes(384) + platform.cpu_svn + struct.pack("<H", platform.pce_svn) + bytes(2)
    auth = quote[436:offset] + struct.pack("<HI", 3, len(body)) + body
    return quote[:432] + struct.pack("<I", len(auth)) + auth


def test_pck_chain_from_the_certificate_when_the_quote_has_none(lab_dcap: LabDcapCA) -> None:
    key = generate_client_key()
    platform = lab_dcap.platform()
    quote = _without_embedded_chain(
        platform.quote(
            mrenclave=MRENCLAVE,
            mrsigner=MRSIGNER,
            report_data=report_data_for_key(key.public_key()),
        ),
        platform,
    )
    assert dcap_qvl.parse_quote(quote).cert_chain_pem_bytes() is None
    verifier = DcapVerifier(lab_policy(lab_dcap))

    def cert(pck_platform: LabPlatform, *, with_chain: bool = True) -> bytes:
        extensions = sgx_ra_tls_extensions(
            quote,
            pck_platform,
            tcb_info_body=lab_dcap.pcs_tcb_info_body(),
            tcb_issuer_chain=lab_dcap.tcb_issuer_chain_pem,
        )
        if not with_chain:
            extensions = {OID_DCAP_QUOTE: quote}
        return build_ratls_certificate(key, extensions)

    assert verifier.verify_certificate(cert(platform)).mrenclave == MRENCLAVE
    rejected(
        Check.UNSUPPORTED_QUOTE,
        lambda: verifier.verify_certificate(cert(platform, with_chain=False)),
    )
    # Another platform's PCK certificate did not sign this QE report.
    rejected(
        Check.QE_REPORT_SIGNATURE, lambda: verifier.verify_certificate(cert(lab_dcap.platform()))
    )
