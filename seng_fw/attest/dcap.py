"""DCAP (ECDSA) attestation: `DcapVerifier`, and `AnyEvidenceVerifier` over EPID and DCAP.

    store = CollateralStore.load([Path("/etc/seng-fw/collateral")])
    roots = load_root_certificates([Path("intel-sgx-root.pem").read_bytes()])
    verifier = DcapVerifier(DcapPolicy(roots=roots, collateral=store))
    identity = verifier.verify_certificate(client_cert_der)  # or raises AttestationRejected

The quote itself is verified by dcap-qvl (`verify_with_root_ca`): quote signature, QE report
signature and its binding of the attestation key, PCK chain to the configured root, CRLs, TCB
info and QE identity signatures and validity, TCB level -> status and advisories. Done here by
hand, because dcap-qvl does not: RA-TLS parsing and key binding (ratls_dcap), picking the
collateral by FMSPC and refusing expired bundles before dcap-qvl is asked (collateral), mapping
dcap-qvl's error text onto our stable check names, and the policy (TCB status allow-list,
refused advisories, DEBUG).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

import dcap_qvl
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from seng_fw.attest.collateral import PER_PLATFORM_FIELD, CollateralBundle, CollateralStore
from seng_fw.attest.ias import resolve_time
from seng_fw.attest.identity import AttestationRejected, Check, EnclaveIdentity, EvidenceVerifier
from seng_fw.attest.policy import check_is_ca
from seng_fw.attest.quote import FLAG_DEBUG, FLAG_INITTED
from seng_fw.attest.ratls_dcap import (
    REPORT_DATA,
    EvidenceFormat,
    check_dcap_key_binding,
    evidence_formats,
    load_leaf,
    parse_dcap_leaf,
)

# dcap-qvl's TCB status names. UpToDate is always accepted; the others describe a genuine
# platform lacking updates or configuration and are accepted only when configured.
# Revoked is never acceptable (dcap-qvl refuses it itself, and so do we).
TCB_UP_TO_DATE = "UpToDate"
ACCEPTABLE_TCB_STATUSES = frozenset(
    {
        TCB_UP_TO_DATE,
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
    }
)

# SGX quote v3 (dcap-qvl accepts only v3 for SGX; see _check_header). Header offsets:
# version 0 (u16), attestation key type 2 (u16), TEE type 4 (u32), then the 384-byte report
# body from 48 with the same offsets as the EPID quote body (DESIGN.md section 2).
_HEADER = struct.Struct("<HHI")
# ATTRIBUTES.FLAGS 96, MRENCLAVE 112, MRSIGNER 176, ISVPRODID 304, ISVSVN 306 (quote offsets).
_BODY = struct.Struct("<96xQ8x32s32x32s96xHH")
_SGX_TEE_TYPE = 0
_ECDSA_P256 = 2

# dcap-qvl reports failures as ValueError("Verification failed: <context>\n\nCaused by:\n ...").
# Its text is the only handle on which check failed; these fragments are pinned by the tests
# against dcap-qvl 0.7 (pyproject pins >=0.7,<0.8). First match wins; order matters (e.g. a
# revoked or expired certificate is reported inside "Failed to verify certificate chain").
_DCAP_ERRORS: tuple[tuple[str, Check], ...] = (
    ("ISV enclave report signature is invalid", Check.QUOTE_SIGNATURE),
    ("Signature is invalid for qe_report", Check.QE_REPORT_SIGNATURE),
    ("QE report hash mismatch", Check.ATTESTATION_KEY_NOT_BOUND),
    ("CertRevoked", Check.CERT_REVOKED),
    ("CrlExpired", Check.COLLATERAL_EXPIRED),
    ("TCBInfo expired", Check.COLLATERAL_EXPIRED),
    ("QE Identity expired", Check.COLLATERAL_EXPIRED),
    ("issue date is in the future", Check.COLLATERAL_NOT_YET_VALID),
    ("CrlNotValidYet", Check.COLLATERAL_NOT_YET_VALID),
    ("CertExpired", Check.CERT_EXPIRED),
    ("CertNotValidYet", Check.CERT_EXPIRED),
    ("UnknownIssuer", Check.UNTRUSTED_ROOT),
    # dcap-qvl checks the root CA CRL against the root first: collateral of another root.
    ("root CA CRL (InvalidCrlSignatureForPublicKey", Check.UNTRUSTED_ROOT),
    ("Failed to load root ca", Check.UNTRUSTED_ROOT),
    ("Signature is invalid for tcb_info", Check.COLLATERAL_INVALID),
    ("Signature is invalid for qe_identity", Check.COLLATERAL_INVALID),
    ("CRL", Check.COLLATERAL_INVALID),  # CRL parse, CRL signature, UnknownRevocationStatus
    ("UnknownRevocationStatus", Check.COLLATERAL_INVALID),
    ("Fmspc mismatch", Check.COLLATERAL_INVALID),
    ("TCB info in the collateral", Check.COLLATERAL_INVALID),
    ("too short for", Check.COLLATERAL_INVALID),
    ("QE Identity", Check.QE_IDENTITY),
    ("QE report", Check.QE_IDENTITY),
    ("QE ISVSVN", Check.QE_IDENTITY),
    ("TCB status is invalid", Check.TCB_STATUS),
    ("No matching TCB level", Check.TCB_STATUS),
    ("Debug mode is enabled", Check.DEBUG_ENCLAVE),
    ("Failed to decode quote", Check.MALFORMED_QUOTE),
    ("quote version", Check.UNSUPPORTED_QUOTE),
    ("must have version", Check.UNSUPPORTED_QUOTE),
    ("attestation key type", Check.UNSUPPORTED_QUOTE),
    ("QE vendor ID", Check.UNSUPPORTED_QUOTE),
    ("PCK cert format", Check.UNSUPPORTED_QUOTE),
    ("Failed to parse PCK certificate", Check.MALFORMED_QUOTE),
    ("Failed to extract PCK certificates", Check.MALFORMED_QUOTE),
)


@dataclass(frozen=True)
class DcapPolicy:
    """Trust anchors (Intel SGX Root CA, or the lab's), collateral, and what quotes must meet."""

    roots: tuple[x509.Certificate, ...]
    collateral: CollateralStore
    allowed_statuses: frozenset[str] = field(default=frozenset({TCB_UP_TO_DATE}))
    refuse_advisories: frozenset[str] = frozenset()
    allow_debug: bool = False

    def __post_init__(self) -> None:
        if not self.roots:
            raise ValueError("at least one trust anchor (SGX root CA certificate) is required")
        for root in self.roots:
            check_is_ca(root)
        unknown = self.allowed_statuses - ACCEPTABLE_TCB_STATUSES
        if unknown:
            raise ValueError(
                f"TCB status(es) {', '.join(sorted(unknown))} can never be accepted; "
                f"choose from {', '.join(sorted(ACCEPTABLE_TCB_STATUSES))}"
            )

    @property
    def root_ders(self) -> tuple[bytes, ...]:
        return tuple(root.public_bytes(serialization.Encoding.DER) for root in self.roots)


@dataclass(frozen=True)
class VerifiedQuote:
    identity: EnclaveIdentity
    bundle: CollateralBundle


def verify_dcap_quote(
    quote: bytes,
    policy: DcapPolicy,
    at: datetime | None = None,
    *,
    pck_cert_der: bytes | None = None,
    pck_chain_pem: bytes | None = None,
) -> VerifiedQuote:
    """Verify a raw SGX quote against the configured roots and collateral as of `at`.

    REPORTDATA is returned in the identity but not checked (the caller binds it to a key).
    `pck_cert_der` and `pck_chain_pem` are the PCK certificate and chain an RA-TLS certificate
    carried: the chain is used only when the quote does not embed one (certification data
    types 2 and 3), the certificate must be the quote's when it does.
    """
    at = resolve_time(at)
    _check_header(quote)
    try:
        parsed = dcap_qvl.parse_quote(quote)
    except BaseException as exc:
        if not _is_qvl_failure(exc):
            raise
        raise AttestationRejected(Check.MALFORMED_QUOTE, _one_line(exc)) from None
    embedded = parsed.cert_chain_pem_bytes()
    chain_pem = embedded if embedded is not None else pck_chain_pem
    if chain_pem is None:
        raise AttestationRejected(
            Check.UNSUPPORTED_QUOTE,
            "the quote carries no PCK certificate chain, and nor does the certificate",
        )
    # sgx-ra-tls sends the PCK certificate (.7) beside the quote that embeds it: two copies
    # of one thing must agree, else the certificate is inconsistent.
    if embedded is not None and pck_cert_der is not None and _pck_leaf(embedded) != pck_cert_der:
        raise AttestationRejected(
            Check.PCK_CERT_MISMATCH,
            "the PCK certificate in the RA-TLS certificate is not the one in the quote",
        )
    try:
        fmspc = dcap_qvl.parse_pck_extension_from_pem(chain_pem).fmspc.hex().upper()
    except BaseException as exc:
        if not _is_qvl_failure(exc):
            raise
        raise AttestationRejected(
            Check.MALFORMED_QUOTE, f"PCK certificate has no usable SGX extension: {_one_line(exc)}"
        ) from None
    bundle = policy.collateral.select(fmspc, lambda: _pck_issuer(chain_pem))
    # dcap-qvl checks the parts' dates too; checking the bundle's window first gives the
    # operator one clear message (which bundle, since when) instead of the first part's.
    bundle.check_valid(at)
    collateral = bundle.collateral
    if embedded is None:
        collateral = _with_pck_chain(bundle, chain_pem)

    now_secs = math.floor(at.timestamp())
    report = _verify_with_roots(quote, collateral, policy.root_ders, now_secs)

    status = report.status
    advisories = tuple(report.advisory_ids)
    if status not in policy.allowed_statuses:
        hint = "" if status == "Revoked" else " (not allowed by policy)"
        raise AttestationRejected(Check.TCB_STATUS, f"TCB status is {status}{hint}")
    refused = sorted(set(advisories) & policy.refuse_advisories)
    if refused:
        raise AttestationRejected(
            Check.ADVISORY_REFUSED, f"platform is affected by refused advisory {', '.join(refused)}"
        )
    flags, mrenclave, mrsigner, isv_prod_id, isv_svn = _BODY.unpack_from(quote, 0)
    report_data = quote[REPORT_DATA]
    # Our reading of the body must be dcap-qvl's (it verified the signature over these bytes).
    sgx_report = parsed.report
    if not isinstance(sgx_report, dcap_qvl.SgxEnclaveReport) or (
        sgx_report.mr_enclave,
        sgx_report.mr_signer,
        sgx_report.report_data,
    ) != (mrenclave, mrsigner, report_data):  # pragma: no cover - defensive
        raise AttestationRejected(Check.MALFORMED_QUOTE, "quote body parsed inconsistently")
    if not flags & FLAG_INITTED:
        raise AttestationRejected(Check.MALFORMED_QUOTE, "ATTRIBUTES.INITTED is not set")
    debug = bool(flags & FLAG_DEBUG)
    if debug and not policy.allow_debug:
        raise AttestationRejected(Check.DEBUG_ENCLAVE, "enclave runs in DEBUG mode")
    identity = EnclaveIdentity(
        mrenclave=mrenclave,
        mrsigner=mrsigner,
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        debug=debug,
        quote_status=status,
        # A DCAP quote carries no time. The identity must be the same each time the quote is
        # presented (the gateway pairs an enclave's two tunnels by it), so not the
        # verification time: the issue time of the collateral it was judged by.
        timestamp=bundle.not_before,
        report_data=report_data,
        advisory_ids=advisories,
        evidence="dcap",
        fmspc=fmspc,
        collateral_expires=bundle.expires,
    )
    return VerifiedQuote(identity, bundle)


class DcapVerifier:
    """Verifies DCAP RA-TLS client certificates (sgx-ra-tls ECDSA or Gramine layout)."""

    def __init__(self, policy: DcapPolicy) -> None:
        self.policy = policy

    def verify_certificate(self, cert_der: bytes, at: datetime | None = None) -> EnclaveIdentity:
        return self.verify_leaf(load_leaf(cert_der), at)

    def verify_leaf(self, cert: x509.Certificate, at: datetime | None = None) -> EnclaveIdentity:
        """The same, for a leaf already loaded with `load_leaf` (the dispatcher's)."""
        evidence = parse_dcap_leaf(cert)
        verified = verify_dcap_quote(
            evidence.quote,
            self.policy,
            at,
            pck_cert_der=evidence.pck_cert_der,
            pck_chain_pem=evidence.pck_chain_pem,
        )
        check_dcap_key_binding(evidence, verified.identity.report_data)
        return verified.identity


class AnyEvidenceVerifier:
    """Picks the verifier for the one evidence format the leaf certificate carries.

    A certificate with extensions of two formats (EPID and DCAP, or sgx-ra-tls's and
    Gramine's DCAP layouts) is refused: which evidence would be judged would otherwise depend
    on our order of trying, and the other could vouch for something else.
    """

    def __init__(self, epid: EvidenceVerifier | None, dcap: DcapVerifier | None) -> None:
        if epid is None and dcap is None:
            raise ValueError("at least one evidence verifier is required")
        self.epid = epid
        self.dcap = dcap

    def verify_certificate(self, cert_der: bytes, at: datetime | None = None) -> EnclaveIdentity:
        cert = load_leaf(cert_der)
        formats = evidence_formats(cert)
        if len(formats) > 1:
            raise AttestationRejected(
                Check.MULTIPLE_EVIDENCE_FORMATS,
                f"certificate carries more than one evidence format ({', '.join(sorted(formats))})",
            )
        if not formats:
            raise AttestationRejected(
                Check.MISSING_EXTENSION, "certificate carries no attestation evidence"
            )
        if EvidenceFormat.EPID in formats:
            if self.epid is None:
                raise AttestationRejected(
                    Check.EVIDENCE_FORMAT_NOT_ALLOWED, "EPID evidence is not configured here"
                )
            return self.epid.verify_certificate(cert_der, at)
        if self.dcap is None:
            raise AttestationRejected(
                Check.EVIDENCE_FORMAT_NOT_ALLOWED, "DCAP evidence is not configured here"
            )
        return self.dcap.verify_leaf(cert, at)


def _check_header(quote: bytes) -> None:
    if len(quote) < 48 + 384 + 4:
        raise AttestationRejected(Check.MALFORMED_QUOTE, f"quote is only {len(quote)} bytes")
    version, key_type, tee_type = _HEADER.unpack_from(quote)
    if tee_type != _SGX_TEE_TYPE:
        raise AttestationRejected(
            Check.UNSUPPORTED_QUOTE, f"not an SGX quote (TEE type {tee_type:#x})"
        )
    if version != 3:
        # SGX quotes v4 (same body) exist in Intel's spec; dcap-qvl 0.7 refuses SGX quotes
        # other than v3 ("SGX TEE quote must have version 3"), so we cannot verify them.
        raise AttestationRejected(
            Check.UNSUPPORTED_QUOTE, f"SGX quote version {version} (only 3 is supported)"
        )
    if key_type != _ECDSA_P256:
        raise AttestationRejected(
            Check.UNSUPPORTED_QUOTE, f"attestation key type {key_type} (only ECDSA P-256)"
        )


def _pck_leaf(chain_pem: bytes) -> bytes:
    """DER of the first certificate of a PEM chain (the only one parsed)."""
    try:
        return x509.load_pem_x509_certificate(chain_pem).public_bytes(serialization.Encoding.DER)
    except ValueError as exc:
        raise AttestationRejected(Check.MALFORMED_QUOTE, f"bad PCK chain: {exc}") from None


def _pck_issuer(chain_pem: bytes) -> x509.Name:
    try:
        return x509.load_pem_x509_certificate(chain_pem).issuer
    except ValueError as exc:
        raise AttestationRejected(Check.MALFORMED_QUOTE, f"bad PCK chain: {exc}") from None


def _with_pck_chain(bundle: CollateralBundle, chain_pem: bytes) -> dcap_qvl.QuoteCollateralV3:
    fields = json.loads(bundle.json_text)
    fields[PER_PLATFORM_FIELD] = chain_pem.decode("ascii")
    return dcap_qvl.QuoteCollateralV3.from_json(json.dumps(fields))


def _verify_with_roots(
    quote: bytes,
    collateral: dcap_qvl.QuoteCollateralV3,
    root_ders: Iterable[bytes],
    now_secs: int,
) -> dcap_qvl.VerifiedReport:
    """dcap-qvl's verdict with the first configured root it chains to."""
    failure = AttestationRejected(Check.UNTRUSTED_ROOT, "no trust anchor configured")
    for root_der in root_ders:
        try:
            return dcap_qvl.verify_with_root_ca(quote, collateral, root_der, now_secs)
        except BaseException as exc:
            if not _is_qvl_failure(exc):
                raise
            message = _one_line(exc)
            check = _dcap_check(message)
            if check == Check.DEBUG_ENCLAVE:
                # dcap-qvl 0.7 refuses DEBUG enclaves itself and its Python API has no switch
                # for it (the Rust QuoteVerifier has allow_debug), so allow_debug cannot work.
                message = "enclave runs in DEBUG mode (dcap-qvl refuses DEBUG enclaves)"
            failure = AttestationRejected(check, message)
        # Another root may be the one; any error but "not this root" is the verdict.
        if failure.check != Check.UNTRUSTED_ROOT:
            break
    raise failure


def _is_qvl_failure(exc: BaseException) -> bool:
    """dcap-qvl reports failures as ValueError; a Rust panic surfaces as pyo3's
    PanicException, a BaseException (not importable by name): that too must be a rejection,
    never an escape from the handshake path."""
    return isinstance(exc, ValueError) or type(exc).__name__ == "PanicException"


def _dcap_check(message: str) -> Check:
    for fragment, check in _DCAP_ERRORS:
        if fragment in message:
            return check
    return Check.DCAP_VERIFICATION


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text.replace("Caused by: ", "(") + (")" if "Caused by:" in str(exc) else "")
