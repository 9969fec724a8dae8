"""RA-TLS client certificates carrying DCAP (ECDSA) evidence: sgx-ra-tls and Gramine layouts.

sgx-ra-tls, ECDSA variant (1.2.840.113741.1337.*): .6 the raw SGX quote (v3), .7 the PCK
certificate (PEM), .8 the PCK signing chain, .9 the TCB info (the PCS JSON body), .10 the TCB
signing chain; the chains are PEM, or URL-encoded PEM as in the PCS response headers. Only .6
is required; .7 and .8 come together, as do .9 and .10. REPORTDATA binds the key as for EPID
(DESIGN.md section 2: SHA-256 of the PKCS#1 RSAPublicKey or of the point 04||X||Y).

Gramine: the legacy quote extension, whose OID bytes Gramine writes with a stray ASN.1 tag and
length inside (`06 09 2A 86 48 86 F8 4D 8A 39 06`, which decodes as 0.6.9.42.840.113741.1337.6;
Gramine matches those raw bytes), REPORTDATA = SHA-256(DER SubjectPublicKeyInfo) || 0^32; and,
since v1.8, the TCG DICE "tagged evidence" extension 2.23.133.5.4.9: CBOR tag 60000 over
[quote bstr, claims bstr], the claims a CBOR map {"pubkey-hash": bstr(CBOR [hash-alg-id,
hash of the SPKI DER])}, REPORTDATA = SHA-256(claims) || 0^32. Gramine >= 1.8 puts both in one
certificate: the DICE evidence is the one verified, and the legacy quote beside it must attest
the very same enclave report (else the certificate names two enclaves and is refused).

Parsing only (no trust decisions); every failure is an `AttestationRejected`.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import re
import urllib.parse
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.type import univ

from seng_fw.attest.ias import load_certificate
from seng_fw.attest.identity import AttestationRejected, Check
from seng_fw.attest.quote import REPORT_DATA_SIZE
from seng_fw.attest.ratls import (
    _UNDERSTOOD_CRITICAL,
    ClientPublicKey,
    _check_self_signed,
    _client_public_key,
    report_data_for_key,
)
from seng_fw.attest.ratls import (
    EVIDENCE_OIDS as EPID_OIDS,
)

_SGX = "1.2.840.113741.1337."
OID_DCAP_QUOTE = x509.ObjectIdentifier(_SGX + "6")
OID_DCAP_PCK_CERT = x509.ObjectIdentifier(_SGX + "7")
OID_DCAP_PCK_CHAIN = x509.ObjectIdentifier(_SGX + "8")
OID_DCAP_TCB_INFO = x509.ObjectIdentifier(_SGX + "9")
OID_DCAP_TCB_CHAIN = x509.ObjectIdentifier(_SGX + "10")
SGX_RA_TLS_DCAP_OIDS = (
    OID_DCAP_QUOTE,
    OID_DCAP_PCK_CERT,
    OID_DCAP_PCK_CHAIN,
    OID_DCAP_TCB_INFO,
    OID_DCAP_TCB_CHAIN,
)

# Gramine's legacy OID, as the raw content bytes it writes (ra_tls.h NON_STANDARD_INTEL_SGX_
# QUOTE_OID). cryptography hands us OIDs only as dotted strings, and DER allows one encoding per
# OID, so the dotted string decoded from these exact bytes matches exactly these bytes.
GRAMINE_LEGACY_OID_BYTES = bytes.fromhex("06092a864886f84d8a3906")


def _oid_from_content(content: bytes) -> x509.ObjectIdentifier:
    value, rest = der_decoder.decode(
        bytes([0x06, len(content)]) + content, asn1Spec=univ.ObjectIdentifier()
    )
    assert not rest
    return x509.ObjectIdentifier(str(value))


OID_GRAMINE_LEGACY_QUOTE = _oid_from_content(GRAMINE_LEGACY_OID_BYTES)
assert OID_GRAMINE_LEGACY_QUOTE.dotted_string == "0.6.9.42.840.113741.1337.6"
OID_TCG_DICE_TAGGED_EVIDENCE = x509.ObjectIdentifier("2.23.133.5.4.9")
GRAMINE_OIDS = (OID_GRAMINE_LEGACY_QUOTE, OID_TCG_DICE_TAGGED_EVIDENCE)

CBOR_TAG_TEE_QUOTE = 60000  # IANA CBOR tag "ECDSA SGX/TDX quote" (Gramine's DICE evidence)
# IANA named-information hash algorithm IDs Gramine's verifier accepts in "pubkey-hash".
_HASH_ALGS = {1: "sha256", 7: "sha384", 8: "sha512"}
_CLAIM_KEYS = frozenset({"pubkey-hash", "nonce"})

# SGX quote v3: 48-byte header + 384-byte report body + 4-byte signature length + signature
# data; Gramine caps quotes at 8 KiB, a PCK chain makes them about 4.5 KiB.
QUOTE_MIN_SIZE = 48 + 384 + 4
QUOTE_MAX_SIZE = 16 * 1024
REPORT_BODY = slice(48, 48 + 384)
REPORT_DATA = slice(368, 432)

_PEM_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+-----END CERTIFICATE-----(\r?\n)?"
)

_UNDERSTOOD_CRITICAL_DCAP = frozenset({*_UNDERSTOOD_CRITICAL, *SGX_RA_TLS_DCAP_OIDS, *GRAMINE_OIDS})


class EvidenceFormat(StrEnum):
    EPID = "epid"  # sgx-ra-tls, IAS report
    SGX_RA_TLS_DCAP = "sgx-ra-tls-dcap"
    GRAMINE = "gramine"


class DcapLayout(StrEnum):
    SGX_RA_TLS = "sgx-ra-tls"
    GRAMINE_LEGACY = "gramine-legacy"
    GRAMINE_DICE = "gramine-dice"


_FORMAT_OIDS = {
    EvidenceFormat.EPID: EPID_OIDS,
    EvidenceFormat.SGX_RA_TLS_DCAP: SGX_RA_TLS_DCAP_OIDS,
    EvidenceFormat.GRAMINE: GRAMINE_OIDS,
}


@dataclass(frozen=True)
class DcapEvidence:
    """DCAP evidence found in a leaf certificate, decoded but not yet verified."""

    layout: DcapLayout
    quote: bytes
    public_key: ClientPublicKey
    # The REPORTDATA this layout requires for this certificate's key (and claims).
    expected_report_data: bytes
    # sgx-ra-tls only: the PCK certificate (DER) and its chain (PEM, leaf first) the
    # certificate carries, and the TCB info JSON (informative: the configured collateral
    # decides, see seng_fw.attest.dcap).
    pck_cert_der: bytes | None = None
    pck_chain_pem: bytes | None = None
    tcb_info: bytes | None = None


def evidence_formats(cert: x509.Certificate) -> set[EvidenceFormat]:
    """Which evidence formats the certificate carries any extension of."""
    present = {ext.oid for ext in cert.extensions}
    return {fmt for fmt, oids in _FORMAT_OIDS.items() if present & set(oids)}


def load_leaf(cert_der: bytes) -> x509.Certificate:
    """The leaf certificate, fully decoded (or `malformed_certificate`)."""
    return load_certificate(cert_der, Check.MALFORMED_CERTIFICATE)


def parse_dcap_certificate(cert_der: bytes) -> DcapEvidence:
    """Extract the DCAP evidence of either layout from a DER leaf certificate."""
    return parse_dcap_leaf(load_leaf(cert_der))


def parse_dcap_leaf(cert: x509.Certificate) -> DcapEvidence:
    """The same, for a leaf already loaded with `load_leaf`."""
    formats = evidence_formats(cert)
    if len(formats) > 1:
        raise AttestationRejected(
            Check.MULTIPLE_EVIDENCE_FORMATS,
            f"certificate carries more than one evidence format ({', '.join(sorted(formats))})",
        )
    if formats == {EvidenceFormat.SGX_RA_TLS_DCAP}:
        return parse_sgx_ra_tls_dcap(cert)
    if formats == {EvidenceFormat.GRAMINE}:
        return parse_gramine(cert)
    raise AttestationRejected(Check.MISSING_EXTENSION, "certificate carries no DCAP evidence")


def parse_sgx_ra_tls_dcap(cert: x509.Certificate) -> DcapEvidence:
    values = _evidence_values(cert, SGX_RA_TLS_DCAP_OIDS)
    if OID_DCAP_QUOTE not in values:
        raise AttestationRejected(
            Check.MISSING_EXTENSION, f"certificate has no extension {OID_DCAP_QUOTE.dotted_string}"
        )
    for first, second in (
        (OID_DCAP_PCK_CERT, OID_DCAP_PCK_CHAIN),
        (OID_DCAP_TCB_INFO, OID_DCAP_TCB_CHAIN),
    ):
        if (first in values) != (second in values):
            raise AttestationRejected(
                Check.MISSING_EXTENSION,
                f"extensions {first.dotted_string} and {second.dotted_string} come together",
            )
    public_key = _client_public_key(cert)
    _check_self_signed(cert)
    quote = _check_quote_size(values[OID_DCAP_QUOTE])
    pck_cert_der = pck_chain_pem = None
    if OID_DCAP_PCK_CERT in values:
        leaf = _pem_blocks(values[OID_DCAP_PCK_CERT], "1337.7", url_encoded_ok=False)
        if len(leaf) != 1:
            raise AttestationRejected(
                Check.MALFORMED_EXTENSION, "extension 1337.7 is not exactly one PEM certificate"
            )
        pck_cert = load_certificate(leaf[0], Check.MALFORMED_EXTENSION, pem=True)
        pck_cert_der = pck_cert.public_bytes(serialization.Encoding.DER)
        # The chain is decoded only if it is used (a quote without an embedded chain), by
        # dcap-qvl, which refuses what it cannot parse: parsing certificates costs admission
        # CPU, and unused ones vouch for nothing.
        chain = _pem_blocks(values[OID_DCAP_PCK_CHAIN], "1337.8", url_encoded_ok=True)
        pck_chain_pem = b"".join(block.rstrip(b"\r\n") + b"\n" for block in (*leaf, *chain))
    tcb_info = None
    if OID_DCAP_TCB_INFO in values:
        tcb_info = values[OID_DCAP_TCB_INFO]
        _check_tcb_info(tcb_info)
        _pem_blocks(values[OID_DCAP_TCB_CHAIN], "1337.10", url_encoded_ok=True)
    return DcapEvidence(
        layout=DcapLayout.SGX_RA_TLS,
        quote=quote,
        public_key=public_key,
        expected_report_data=report_data_for_key(public_key),
        pck_cert_der=pck_cert_der,
        pck_chain_pem=pck_chain_pem,
        tcb_info=tcb_info,
    )


def parse_gramine(cert: x509.Certificate) -> DcapEvidence:
    values = _evidence_values(cert, GRAMINE_OIDS)
    public_key = _client_public_key(cert)
    _check_self_signed(cert)
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    legacy = values.get(OID_GRAMINE_LEGACY_QUOTE)
    legacy_quote = None if legacy is None else _check_quote_size(legacy)
    dice = values.get(OID_TCG_DICE_TAGGED_EVIDENCE)
    if dice is None:
        assert legacy_quote is not None  # the caller saw a Gramine OID
        return DcapEvidence(
            DcapLayout.GRAMINE_LEGACY, legacy_quote, public_key, gramine_report_data(spki)
        )
    quote, claims = parse_dice_evidence(dice)
    check_dice_claims(claims, spki)
    if legacy_quote is not None and (
        legacy_quote[REPORT_BODY][: REPORT_DATA.start - 48]
        != quote[REPORT_BODY][: REPORT_DATA.start - 48]
        or not hmac.compare_digest(legacy_quote[REPORT_DATA], gramine_report_data(spki))
    ):
        raise AttestationRejected(
            Check.MALFORMED_EXTENSION,
            "the legacy Gramine quote and the TCG DICE evidence attest different enclaves or keys",
        )
    digest = hashlib.sha256(claims).digest()
    return DcapEvidence(
        DcapLayout.GRAMINE_DICE, quote, public_key, digest + bytes(REPORT_DATA_SIZE - len(digest))
    )


def gramine_report_data(spki_der: bytes) -> bytes:
    """REPORTDATA of Gramine's legacy layout: SHA-256 of the DER SubjectPublicKeyInfo."""
    digest = hashlib.sha256(spki_der).digest()
    return digest + bytes(REPORT_DATA_SIZE - len(digest))


def parse_dice_evidence(value: bytes) -> tuple[bytes, bytes]:
    """TCG DICE tagged evidence: CBOR tag 60000 over [quote bstr, claims bstr]."""
    item = _cbor(value, "TCG DICE evidence")
    if not isinstance(item, cbor2.CBORTag) or item.tag != CBOR_TAG_TEE_QUOTE:
        raise AttestationRejected(
            Check.MALFORMED_EXTENSION, f"TCG DICE evidence is not CBOR tag {CBOR_TAG_TEE_QUOTE}"
        )
    body = item.value
    if (
        not isinstance(body, list | tuple)
        or len(body) != 2
        or not all(isinstance(part, bytes) for part in body)
    ):
        raise AttestationRejected(
            Check.MALFORMED_EXTENSION, "TCG DICE evidence is not [quote, claims] byte strings"
        )
    return _check_quote_size(body[0]), body[1]


def check_dice_claims(claims: bytes, spki_der: bytes) -> None:
    """The claims must name this certificate's key ("pubkey-hash" over the SPKI DER)."""
    decoded = _cbor(claims, "TCG DICE claims")
    if not isinstance(decoded, dict) or not all(isinstance(key, str) for key in decoded):
        raise AttestationRejected(Check.MALFORMED_EXTENSION, "TCG DICE claims are not a map")
    unknown = set(decoded) - _CLAIM_KEYS
    if unknown:
        raise AttestationRejected(
            Check.MALFORMED_EXTENSION, f"unknown TCG DICE claim(s) {sorted(unknown)}"
        )
    entry_bytes = decoded.get("pubkey-hash")
    if not isinstance(entry_bytes, bytes):
        raise AttestationRejected(Check.MALFORMED_EXTENSION, "TCG DICE claims lack pubkey-hash")
    entry = _cbor(entry_bytes, "pubkey-hash")
    if (
        not isinstance(entry, list | tuple)
        or len(entry) != 2
        or not isinstance(entry[0], int)
        or isinstance(entry[0], bool)
        or not isinstance(entry[1], bytes)
    ):
        raise AttestationRejected(
            Check.MALFORMED_EXTENSION, "pubkey-hash is not [hash-alg-id, hash]"
        )
    algorithm = _HASH_ALGS.get(entry[0])
    if algorithm is None:
        raise AttestationRejected(
            Check.MALFORMED_EXTENSION, f"pubkey-hash uses unknown hash algorithm {entry[0]}"
        )
    if not hmac.compare_digest(hashlib.new(algorithm, spki_der).digest(), entry[1]):
        raise AttestationRejected(
            Check.REPORT_DATA_MISMATCH, "pubkey-hash does not match the certificate's public key"
        )


def check_dcap_key_binding(evidence: DcapEvidence, report_data: bytes) -> None:
    """The verified quote must vouch for exactly this certificate key (and claims)."""
    if not hmac.compare_digest(evidence.expected_report_data, report_data):
        raise AttestationRejected(
            Check.REPORT_DATA_MISMATCH,
            f"REPORTDATA does not match the certificate's public key ({evidence.layout} layout)",
        )


def encode_sgx_ra_tls_dcap(
    quote: bytes,
    pck_chain: list[x509.Certificate] | None = None,
    tcb_info: bytes | None = None,
    tcb_chain: list[x509.Certificate] | None = None,
) -> dict[x509.ObjectIdentifier, bytes]:
    """Extension values of the sgx-ra-tls ECDSA layout (for the lab CA and tests): .7 the PEM
    PCK certificate, .8 and .10 URL-encoded PEM chains, as the PCS headers carry them."""
    values = {OID_DCAP_QUOTE: quote}
    if pck_chain:
        values[OID_DCAP_PCK_CERT] = _pem(pck_chain[0])
        values[OID_DCAP_PCK_CHAIN] = _url_pem(pck_chain[1:])
    if tcb_info is not None and tcb_chain:
        values[OID_DCAP_TCB_INFO] = tcb_info
        values[OID_DCAP_TCB_CHAIN] = _url_pem(tcb_chain)
    return values


def dice_claims(spki_der: bytes) -> bytes:
    """Gramine's serialized claims for a key: {"pubkey-hash": bstr([1, sha256(SPKI)])}."""
    entry = cbor2.dumps([1, hashlib.sha256(spki_der).digest()])
    return cbor2.dumps({"pubkey-hash": entry})


def encode_dice_evidence(quote: bytes, claims: bytes) -> bytes:
    """Gramine's TCG DICE tagged evidence value (REPORTDATA must be SHA-256(claims) || 0)."""
    return cbor2.dumps(cbor2.CBORTag(CBOR_TAG_TEE_QUOTE, [quote, claims]))


def _evidence_values(
    cert: x509.Certificate, oids: tuple[x509.ObjectIdentifier, ...]
) -> dict[x509.ObjectIdentifier, bytes]:
    for ext in cert.extensions:
        if ext.critical and ext.oid not in _UNDERSTOOD_CRITICAL_DCAP:
            raise AttestationRejected(
                Check.UNKNOWN_CRITICAL_EXTENSION,
                f"unknown critical extension {ext.oid.dotted_string}",
            )
    values: dict[x509.ObjectIdentifier, bytes] = {}
    for ext in cert.extensions:
        if ext.oid in oids:
            if not isinstance(ext.value, x509.UnrecognizedExtension):  # pragma: no cover
                raise AttestationRejected(Check.MALFORMED_EXTENSION, f"odd {ext.oid.dotted_string}")
            values[ext.oid] = ext.value.value
    return values


def _check_quote_size(quote: bytes) -> bytes:
    if not QUOTE_MIN_SIZE <= len(quote) <= QUOTE_MAX_SIZE:
        raise AttestationRejected(
            Check.MALFORMED_QUOTE,
            f"quote is {len(quote)} bytes, expected {QUOTE_MIN_SIZE} to {QUOTE_MAX_SIZE}",
        )
    return quote


def _cbor(data: bytes, name: str) -> Any:
    """Exactly one CBOR item and nothing after it (cbor2.loads ignores trailing bytes, which
    would let data ride along unchecked)."""
    stream = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(stream).decode()
    except (
        cbor2.CBORError,
        ValueError,
        TypeError,
        OverflowError,
        RecursionError,
        LookupError,
        MemoryError,
    ) as exc:
        raise AttestationRejected(Check.MALFORMED_EXTENSION, f"{name} is not CBOR: {exc}") from None
    if stream.tell() != len(data):
        raise AttestationRejected(Check.MALFORMED_EXTENSION, f"{name}: bytes after the CBOR item")
    return item


def _pem_blocks(value: bytes, name: str, *, url_encoded_ok: bool) -> list[bytes]:
    """One or more PEM certificate blocks and nothing else (optionally URL-encoded as a
    whole); the blocks are returned undecoded."""
    if value.startswith((b"-----BEGIN%20", b"%2D")):
        if not url_encoded_ok:
            raise AttestationRejected(Check.MALFORMED_EXTENSION, f"extension {name} is URL-encoded")
        try:
            value = urllib.parse.unquote_to_bytes(value.decode("ascii"))
        except UnicodeDecodeError:
            raise AttestationRejected(
                Check.MALFORMED_EXTENSION, f"extension {name} is not URL-encoded PEM"
            ) from None
    blocks = [match.group(0) for match in _PEM_BLOCK.finditer(value)]
    if not blocks or b"".join(blocks) != value:
        raise AttestationRejected(
            Check.MALFORMED_EXTENSION, f"extension {name} is not PEM certificates only"
        )
    return blocks


def _check_tcb_info(value: bytes) -> None:
    try:
        document = json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise AttestationRejected(
            Check.MALFORMED_EXTENSION, "extension 1337.9 is not JSON"
        ) from None
    if not isinstance(document, dict) or not isinstance(document.get("tcbInfo"), dict):
        raise AttestationRejected(
            Check.MALFORMED_EXTENSION, "extension 1337.9 is not a PCS TCB info document"
        )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _url_pem(certs: list[x509.Certificate]) -> bytes:
    return urllib.parse.quote(b"".join(_pem(c) for c in certs), safe="").encode("ascii")
