"""The DCAP collateral store: strict bundle parsing, per-FMSPC selection, expiry, time left."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import univ
from pyasn1_modules import rfc5280

from seng_fw.attest.collateral import CollateralError, CollateralStore, parse_bundle
from seng_fw.attest.identity import AttestationRejected, Check
from seng_fw.lab.dcap import LabDcapCA

FIXTURES = Path(__file__).parent.parent / "fixtures" / "dcap"
GENUINE = FIXTURES / "dcap-qvl-sgx-collateral.json"


@pytest.fixture(scope="module")
def lab() -> LabDcapCA:
    return LabDcapCA.generate()


def test_genuine_bundle_window_is_the_shortest_of_its_parts() -> None:
    bundle = parse_bundle(GENUINE.read_text(), "genuine")
    assert bundle.fmspc == "00A067110000" and bundle.tcb_type == "SGX"
    assert bundle.not_before == datetime(2025, 6, 19, 10, 56, 11, tzinfo=UTC)  # TCB info issue
    assert bundle.expires == datetime(2025, 7, 19, 10, 1, 18, tzinfo=UTC)  # QE identity next
    assert "PCK Processor CA" in bundle.pck_crl_issuer.rfc4514_string()
    at = datetime(2025, 7, 18, 10, 1, 18, tzinfo=UTC)
    assert bundle.time_left(at) == timedelta(days=1)
    bundle.check_valid(at)
    with pytest.raises(AttestationRejected) as info:
        bundle.check_valid(bundle.expires + timedelta(seconds=1))
    assert info.value.check == Check.COLLATERAL_EXPIRED


def test_store_loads_files_and_directories(tmp_path: Path, lab: LabDcapCA) -> None:
    directory = tmp_path / "bundles"
    directory.mkdir()
    (directory / "lab.json").write_text(lab.collateral_json())
    (directory / "ignored.txt").write_text("not a bundle")
    store = CollateralStore.load([directory, GENUINE])
    assert len(store) == 2
    assert [b.fmspc for b in store.bundles()] == ["00A0655E0000", "00A067110000"]
    assert store.select("00a067110000").source == str(GENUINE)
    with pytest.raises(AttestationRejected) as info:
        store.select("FFFFFFFFFFFF")
    assert info.value.check == Check.NO_COLLATERAL
    at = datetime(2025, 7, 18, 10, 1, 18, tzinfo=UTC)
    left = store.time_left(at)
    assert left["00A067110000"] == timedelta(days=1)
    assert left["00A0655E0000"] > timedelta(days=29)


def test_two_bundles_for_one_platform_family_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(GENUINE.read_text())
    (tmp_path / "b.json").write_text(GENUINE.read_text())
    with pytest.raises(CollateralError, match="second bundle"):
        CollateralStore.load([tmp_path])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.pop("pck_crl"), "missing pck_crl"),
        (lambda f: f.update(tcb_info_sigature="00"), "unknown field"),
        (lambda f: f.update(pck_crl="zz"), "hex"),
        (lambda f: f.update(pck_crl="3000"), "not a DER CRL"),
        (lambda f: f.update(tcb_info="[]"), "tcb_info is not a JSON object"),
        (lambda f: f.update(qe_identity="{}"), "no issueDate"),
        (lambda f: f.update(root_ca_crl=1), "must be a string"),
    ],
)
def test_broken_bundles(change: object, message: str) -> None:
    fields = json.loads(GENUINE.read_text())
    change(fields)  # type: ignore[operator]
    with pytest.raises(CollateralError, match=message):
        parse_bundle(json.dumps(fields), "broken")


def test_a_crl_without_next_update_is_refused(lab: LabDcapCA) -> None:
    # Revocation data that never goes stale; Intel's CRLs always have nextUpdate. (dcap-qvl
    # refuses such a CRL too, with an opaque parse error; the store says why, at load time.)
    now = datetime.now(UTC)
    # cryptography cannot build a CRL without nextUpdate: drop it from a lab CRL and re-sign.
    crl, _ = der_decoder.decode(lab.pck_crl(now), asn1Spec=rfc5280.CertificateList())
    tbs = crl["tbsCertList"]
    tbs["nextUpdate"] = univ.noValue
    tbs_der = der_encoder.encode(tbs)
    crl["signature"] = univ.BitString.fromOctetString(
        lab.pck_ca_key.sign(tbs_der, ec.ECDSA(hashes.SHA256()))
    )
    stripped = der_encoder.encode(crl)
    assert x509.load_der_x509_crl(stripped).next_update_utc is None
    assert x509.load_der_x509_crl(stripped).is_signature_valid(lab.pck_ca_cert.public_key())
    fields = lab.collateral(now)
    fields["pck_crl"] = stripped.hex()
    with pytest.raises(CollateralError, match="nextUpdate"):
        parse_bundle(json.dumps(fields))


def test_unreadable_and_empty(tmp_path: Path) -> None:
    with pytest.raises(CollateralError, match="cannot read"):
        CollateralStore.load([tmp_path / "missing.json"])
    with pytest.raises(CollateralError, match=r"no \*\.json"):
        CollateralStore.load([tmp_path])
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(CollateralError, match="not JSON"):
        CollateralStore.load([tmp_path])


def test_a_per_platform_pck_chain_is_refused() -> None:
    # dcap-qvl prefers a bundle's pck_certificate_chain over the quote's own chain: a bundle
    # holding one would judge every platform of the FMSPC by one platform's PCK.
    fields = json.loads(GENUINE.read_text())
    fields["pck_certificate_chain"] = fields["pck_crl_issuer_chain"]
    with pytest.raises(CollateralError, match="pck_certificate_chain"):
        parse_bundle(json.dumps(fields))
