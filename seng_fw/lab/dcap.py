"""Lab DCAP (ECDSA) attestation: stands in for Intel's SGX PKI, PCS and quoting enclave.

Everything is in Intel's real formats, so that dcap-qvl's
`verify_with_root_ca(quote, collateral, lab_root_der, now)` accepts it with the lab root as
the trust anchor (and `verify`, with Intel's root, refuses it):

- a lab "SGX Root CA" (ECDSA P-256, self-signed) that issues a lab "PCK Platform CA" and a
  lab "TCB Signing" certificate, shaped like Intel's (names say "SENG Lab", "not Intel");
- PCK leaf certificates with the SGX extension (OID 1.2.840.113741.1.13.1: PPID, TCB with
  the 16 component SVNs, PCESVN and CPUSVN, PCE-ID, FMSPC, SGX type, platform instance ID and
  configuration, as in Intel's PCK Certificate and CRL Profile for Platform-CA certificates);
- TCB info v3 and QE identity v2 JSON signed over their exact bytes (ECDSA P-256, raw r||s
  hex) by the TCB signing key, a root CA CRL and a PCK CRL, assembled into dcap-qvl's
  `QuoteCollateralV3` JSON;
- SGX quotes v3 (attestation key type 2, ECDSA-256): header, ISV report body, the ISV
  signature by a fresh attestation key, the QE report signed by the PCK key with
  REPORTDATA = SHA-256(attestation key || QE auth data) || 0*32, QE auth data and
  certification data type 5 (the PCK chain as PEM, NUL-terminated like Intel's QE writes it);
- RA-TLS certificates in the sgx-ra-tls ECDSA layout (1.2.840.113741.1337.6 to .10) and in
  Gramine's layout (its mis-encoded legacy quote OID and, optionally, TCG DICE 2.23.133.5.4.9).

The lab's one TCB info holds one TCB level per DCAP status (table `TCB_LEVELS`); a platform
made with `platform(tcb_status=S)` gets the TCB components of that level in its PCK
certificate, so verification with the lab collateral yields S. The quote layout is written
with `struct` by hand: no maintained Python library writes SGX quotes.

    ca = LabDcapCA.create(Path("lab-ca"))          # or LabDcapCA.load(...), .generate()
    enclave = ca.issue_enclave_cert(mrenclave=..., mrsigner=..., tcb_status="OutOfDate")
    collateral = ca.collateral_json()              # what the gateway is configured with
    dcap_qvl.verify_with_root_ca(enclave.quote, QuoteCollateralV3.from_json(collateral),
                                 ca.root_der, now)

All keys here are LAB keys, kept unprotected in the lab CA directory; never trust the lab root
in production.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import struct
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import univ

from seng_fw.attest.quote import FLAG_DEBUG, FLAG_INITTED, FLAG_MODE64BIT, REPORT_DATA_SIZE
from seng_fw.attest.ratls import ClientPublicKey, report_data_for_key
from seng_fw.lab.ca import (
    ClientPrivateKey,
    KeyType,
    LabCertificate,
    build_ratls_certificate,
    generate_client_key,
)
from seng_fw.lab.ca import write_file as _write_file

# --- file names in the lab CA directory (beside the EPID lab CA's) ---
ROOT_CERT_FILE = "lab-dcap-sgx-root-ca.pem"
ROOT_KEY_FILE = "lab-dcap-sgx-root-ca.key.pem"
PCK_CA_CERT_FILE = "lab-dcap-pck-platform-ca.pem"
PCK_CA_KEY_FILE = "lab-dcap-pck-platform-ca.key.pem"
TCB_SIGNING_CERT_FILE = "lab-dcap-tcb-signing.pem"
TCB_SIGNING_KEY_FILE = "lab-dcap-tcb-signing.key.pem"
REVOKED_FILE = "lab-dcap-revoked-pck-serials.txt"
README_FILE = "README-LAB-DCAP-ONLY.txt"
_README = """\
This directory holds a LAB DCAP attestation CA made by `seng-fw lab ca init`.
It imitates Intel's SGX Root CA, PCK Platform CA and TCB signing for labs and tests.
Its keys are not protected: never configure lab-dcap-sgx-root-ca.pem as a trust anchor
of a production gateway.
"""

# --- OIDs ---
OID_SGX_EXTENSION = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_SGX = "1.2.840.113741.1.13.1"
# sgx-ra-tls ECDSA evidence (properly encoded OIDs).
OID_DCAP_QUOTE = x509.ObjectIdentifier("1.2.840.113741.1337.6")
OID_DCAP_PCK_CERT = x509.ObjectIdentifier("1.2.840.113741.1337.7")
OID_DCAP_PCK_CHAIN = x509.ObjectIdentifier("1.2.840.113741.1337.8")
OID_DCAP_TCB_INFO = x509.ObjectIdentifier("1.2.840.113741.1337.9")
OID_DCAP_TCB_CHAIN = x509.ObjectIdentifier("1.2.840.113741.1337.10")
# Gramine's legacy quote OID: its C source puts the whole TLV 06 09 2A 86 48 86 F8 4D 8A 39 06
# where only the value belongs, so the OID on the wire has the content bytes
# 06 09 2A 86 48 86 F8 4D 8A 39 06, which decode as 0.6.9.42.840.113741.1337.6.
OID_GRAMINE_LEGACY_QUOTE = x509.ObjectIdentifier("0.6.9.42.840.113741.1337.6")
GRAMINE_LEGACY_QUOTE_OID_BYTES = bytes.fromhex("06092a864886f84d8a3906")
OID_TCG_DICE_TAGGED_EVIDENCE = x509.ObjectIdentifier("2.23.133.5.4.9")
CBOR_TAG_TEE_QUOTE = 60000  # Gramine: TCG_DICE_TAGGED_EVIDENCE_TEE_QUOTE_CBOR_TAG
_IANA_HASH_SHA256 = 1

# --- quote constants (Intel SGX ECDSA Quote Library API, quote v3) ---
QUOTE_VERSION = 3
ATT_KEY_TYPE_ECDSA_P256 = 2
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
CERT_DATA_PCK_CHAIN = 5
# Header: version, attestation key type, reserved, QE SVN, PCE SVN, QE vendor ID, user data.
_HEADER = struct.Struct("<HHIHH16s20s")
# sgx_report_body_t: cpu_svn, misc_select, reserved, attributes.flags, attributes.xfrm,
# mr_enclave, reserved, mr_signer, reserved, isv_prod_id, isv_svn, reserved, report_data.
_REPORT_BODY = struct.Struct("<16sI28sQQ32s32s32s96sHH60s64s")
assert _HEADER.size == 48 and _REPORT_BODY.size == 384
QUOTE_SIGNED_SIZE = _HEADER.size + _REPORT_BODY.size
QE_AUTH_DATA = bytes(range(32))  # what Intel's QE puts there (dcap-qvl requires 32 bytes)

# The lab quoting enclave: identity and attributes like Intel's QE3 (INIT|MODE64|PROVISIONKEY,
# XFRM 0xe7); MRSIGNER and MRENCLAVE are lab values.
LAB_QE_MRSIGNER = hashlib.sha256(b"seng-fw lab quoting enclave signer (not Intel)").digest()
LAB_QE_MRENCLAVE = hashlib.sha256(b"seng-fw lab quoting enclave (not Intel)").digest()
LAB_QE_PROD_ID = 1
QE_SVN = 8  # the QE identity's UpToDate level
QE_SVN_OUT_OF_DATE = 6
_QE_FLAGS = 0x15
_QE_XFRM = 0xE7
_ISV_XFRM = 0x07  # x87, SSE, AVX

# --- the lab platform family ---
LAB_FMSPC = bytes.fromhex("00A0655E0000")
LAB_PCE_ID = bytes.fromhex("0000")
PCE_SVN = 13
SGX_TYPE_SCALABLE = 1  # what Platform-CA PCK certificates carry
_TCB_TYPE = 0
_TCB_EVALUATION_DATA_NUMBER = 17


class TcbStatus(StrEnum):
    """DCAP TCB statuses as TCB info v3 and dcap-qvl spell them."""

    UP_TO_DATE = "UpToDate"
    SW_HARDENING_NEEDED = "SWHardeningNeeded"
    CONFIGURATION_AND_SW_HARDENING_NEEDED = "ConfigurationAndSWHardeningNeeded"
    CONFIGURATION_NEEDED = "ConfigurationNeeded"
    OUT_OF_DATE_CONFIGURATION_NEEDED = "OutOfDateConfigurationNeeded"
    OUT_OF_DATE = "OutOfDate"
    REVOKED = "Revoked"


TCB_STATUSES: tuple[str, ...] = tuple(s.value for s in TcbStatus)


class TcbLevel(NamedTuple):
    """One level of the lab TCB info: its SGX TCB component SVNs, PCESVN and verdict."""

    components: bytes  # 16 SVNs; also the platform's CPUSVN in its PCK certificate
    pce_svn: int
    tcb_date: str
    advisory_ids: tuple[str, ...]


def _components(first: int) -> bytes:
    # Only the first component tells the levels apart; the rest look like a real platform's.
    return bytes([first, first, 2, 2, 255, 1, 12]) + bytes(9)


# One level per status, highest first. A platform at level L satisfies L and every level
# below it; dcap-qvl (like Intel's QVL) picks the highest level the platform satisfies.
TCB_LEVELS: dict[TcbStatus, TcbLevel] = {
    TcbStatus.UP_TO_DATE: TcbLevel(_components(17), PCE_SVN, "2025-08-13T00:00:00Z", ()),
    TcbStatus.SW_HARDENING_NEEDED: TcbLevel(
        _components(16), PCE_SVN, "2025-08-13T00:00:00Z", ("INTEL-SA-00615",)
    ),
    TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED: TcbLevel(
        _components(15), PCE_SVN, "2025-08-13T00:00:00Z", ("INTEL-SA-00289", "INTEL-SA-00615")
    ),
    TcbStatus.CONFIGURATION_NEEDED: TcbLevel(
        _components(14), PCE_SVN, "2025-08-13T00:00:00Z", ("INTEL-SA-00289",)
    ),
    TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED: TcbLevel(
        _components(13), PCE_SVN, "2024-03-13T00:00:00Z", ("INTEL-SA-00289", "INTEL-SA-00828")
    ),
    TcbStatus.OUT_OF_DATE: TcbLevel(
        _components(12), PCE_SVN, "2024-03-13T00:00:00Z", ("INTEL-SA-00828", "INTEL-SA-00615")
    ),
    TcbStatus.REVOKED: TcbLevel(
        _components(11), PCE_SVN, "2023-02-15T00:00:00Z", ("INTEL-SA-00767",)
    ),
}

_ROOT_VALIDITY = timedelta(days=30 * 365)
_CA_VALIDITY = timedelta(days=15 * 365)
_LEAF_VALIDITY = timedelta(days=7 * 365)
COLLATERAL_VALIDITY = timedelta(days=30)  # like Intel's: TCB info and CRLs are good for a month
_BACKDATE = timedelta(hours=1)
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# Distribution points the lab names but never serves (.invalid never resolves).
_ROOT_CRL_URL = "https://sgx-lab.invalid/lab-sgx-root-ca.crl"
_PCK_CRL_URL = "https://sgx-lab.invalid/pckcrl?ca=platform&encoding=der"


class Layout(StrEnum):
    """Where an RA-TLS certificate carries its DCAP evidence."""

    SGX_RA_TLS = "sgx-ra-tls"
    GRAMINE = "gramine"


# --- the platform ---


@dataclass(frozen=True)
class LabPlatform:
    """A lab SGX platform: its PCK key and certificate, TCB and quoting enclave."""

    pck_key: ec.EllipticCurvePrivateKey
    pck_cert: x509.Certificate
    pck_ca_cert: x509.Certificate
    root_cert: x509.Certificate
    cpu_svn: bytes
    pce_svn: int
    qe_svn: int = QE_SVN
    qe_id: bytes = field(default_factory=lambda: secrets.token_bytes(16))

    @property
    def pck_cert_pem(self) -> bytes:
        return self.pck_cert.public_bytes(serialization.Encoding.PEM)

    @property
    def pck_chain_pem(self) -> bytes:
        """PCK certificate, PCK Platform CA, root: certification data type 5."""
        return b"".join(
            c.public_bytes(serialization.Encoding.PEM)
            for c in (self.pck_cert, self.pck_ca_cert, self.root_cert)
        )

    @property
    def pck_issuer_chain_pem(self) -> bytes:
        """PCK Platform CA and root, as PCS sends in SGX-PCK-Certificate-Issuer-Chain."""
        return b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (self.pck_ca_cert, self.root_cert)
        )

    def quote(
        self,
        *,
        mrenclave: bytes,
        mrsigner: bytes,
        report_data: bytes,
        debug: bool = False,
        isv_prod_id: int = 0,
        isv_svn: int = 0,
        attestation_key: ec.EllipticCurvePrivateKey | None = None,
    ) -> bytes:
        """An SGX quote v3 for an enclave on this platform, as Intel's QE3 writes it."""
        if len(mrenclave) != 32 or len(mrsigner) != 32:
            raise ValueError("MRENCLAVE and MRSIGNER are 32 bytes")
        if len(report_data) != REPORT_DATA_SIZE:
            raise ValueError("REPORTDATA is 64 bytes")
        att_key = attestation_key or ec.generate_private_key(ec.SECP256R1())
        att_pub = att_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )[1:]
        header = _HEADER.pack(
            QUOTE_VERSION,
            ATT_KEY_TYPE_ECDSA_P256,
            0,
            self.qe_svn,
            self.pce_svn,
            INTEL_QE_VENDOR_ID,
            self.qe_id + bytes(4),
        )
        flags = FLAG_INITTED | FLAG_MODE64BIT | (FLAG_DEBUG if debug else 0)
        body = report_body(
            cpu_svn=self.cpu_svn,
            flags=flags,
            xfrm=_ISV_XFRM,
            mrenclave=mrenclave,
            mrsigner=mrsigner,
            isv_prod_id=isv_prod_id,
            isv_svn=isv_svn,
            report_data=report_data,
        )
        qe_report = report_body(
            cpu_svn=self.cpu_svn,
            flags=_QE_FLAGS,
            xfrm=_QE_XFRM,
            mrenclave=LAB_QE_MRENCLAVE,
            mrsigner=LAB_QE_MRSIGNER,
            isv_prod_id=LAB_QE_PROD_ID,
            isv_svn=self.qe_svn,
            report_data=hashlib.sha256(att_pub + QE_AUTH_DATA).digest() + bytes(32),
        )
        cert_data = self.pck_chain_pem + b"\0"
        auth = b"".join(
            (
                sign_raw(att_key, header + body),
                att_pub,
                qe_report,
                sign_raw(self.pck_key, qe_report),
                struct.pack("<H", len(QE_AUTH_DATA)),
                QE_AUTH_DATA,
                struct.pack("<HI", CERT_DATA_PCK_CHAIN, len(cert_data)),
                cert_data,
            )
        )
        return header + body + struct.pack("<I", len(auth)) + auth


def report_body(
    *,
    cpu_svn: bytes,
    flags: int,
    xfrm: int,
    mrenclave: bytes,
    mrsigner: bytes,
    isv_prod_id: int,
    isv_svn: int,
    report_data: bytes,
    misc_select: int = 0,
) -> bytes:
    """A 384-byte sgx_report_body_t (little-endian, reserved fields zero)."""
    for name, value, size in (
        ("CPUSVN", cpu_svn, 16),
        ("MRENCLAVE", mrenclave, 32),
        ("MRSIGNER", mrsigner, 32),
        ("REPORTDATA", report_data, 64),
    ):
        if len(value) != size:  # struct would pad or cut silently
            raise ValueError(f"{name} is {size} bytes")
    return _REPORT_BODY.pack(
        cpu_svn,
        misc_select,
        bytes(28),
        flags,
        xfrm,
        mrenclave,
        bytes(32),
        mrsigner,
        bytes(96),
        isv_prod_id,
        isv_svn,
        bytes(60),
        report_data,
    )


def sign_raw(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-256/SHA-256 signature as raw r||s (64 bytes), as SGX quotes and PCS carry it."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


# --- the certificate authority ---


@dataclass(frozen=True)
class DcapEnclaveCert(LabCertificate):
    """A DCAP RA-TLS certificate with its key and the evidence inside it."""

    quote: bytes  # the quote bound to the key (sgx-ra-tls .6 / Gramine legacy OID)
    platform: LabPlatform
    layout: Layout
    dice_evidence: bytes | None = None  # Gramine's TCG DICE extension value, if any


class LabDcapCA:
    """Lab SGX Root CA, PCK Platform CA and TCB signing key, with the PCK revocation list."""

    def __init__(
        self,
        root_cert: x509.Certificate,
        root_key: ec.EllipticCurvePrivateKey,
        pck_ca_cert: x509.Certificate,
        pck_ca_key: ec.EllipticCurvePrivateKey,
        tcb_signing_cert: x509.Certificate,
        tcb_signing_key: ec.EllipticCurvePrivateKey,
        revoked_serials: Iterable[int] = (),
        directory: Path | None = None,
    ) -> None:
        for cert, key, what in (
            (root_cert, root_key, "root"),
            (pck_ca_cert, pck_ca_key, "PCK Platform CA"),
            (tcb_signing_cert, tcb_signing_key, "TCB signing"),
        ):
            if cert.public_key() != key.public_key():
                raise ValueError(f"lab DCAP {what} certificate and key do not match")
        self.root_cert = root_cert
        self.root_key = root_key
        self.pck_ca_cert = pck_ca_cert
        self.pck_ca_key = pck_ca_key
        self.tcb_signing_cert = tcb_signing_cert
        self.tcb_signing_key = tcb_signing_key
        self.revoked_serials: list[int] = sorted(set(revoked_serials))
        self.directory = directory  # where revocations are saved, if loaded from or saved to one

    # --- creation and storage ---

    @classmethod
    def generate(cls, now: datetime | None = None) -> LabDcapCA:
        now = now or datetime.now(UTC)
        start = now - _BACKDATE
        root_key = ec.generate_private_key(ec.SECP256R1())
        root_name = _name("SENG Lab SGX Root CA (not Intel)")
        root_cert = _issue(
            subject=root_name,
            key=root_key.public_key(),
            issuer=root_name,
            issuer_key=root_key,
            not_before=start,
            not_after=now + _ROOT_VALIDITY,
            ca_path_length=1,
            crl_url=_ROOT_CRL_URL,
        )
        pck_ca_key = ec.generate_private_key(ec.SECP256R1())
        pck_ca_cert = _issue(
            subject=_name("SENG Lab SGX PCK Platform CA (not Intel)"),
            key=pck_ca_key.public_key(),
            issuer=root_name,
            issuer_key=root_key,
            not_before=start,
            not_after=now + _CA_VALIDITY,
            ca_path_length=0,
            crl_url=_ROOT_CRL_URL,
        )
        tcb_key = ec.generate_private_key(ec.SECP256R1())
        tcb_cert = _issue(
            subject=_name("SENG Lab SGX TCB Signing (not Intel)"),
            key=tcb_key.public_key(),
            issuer=root_name,
            issuer_key=root_key,
            not_before=start,
            not_after=now + _LEAF_VALIDITY,
            ca_path_length=None,
            crl_url=_ROOT_CRL_URL,
        )
        return cls(root_cert, root_key, pck_ca_cert, pck_ca_key, tcb_cert, tcb_key)

    @classmethod
    def create(cls, directory: Path, now: datetime | None = None) -> LabDcapCA:
        """Generate a CA and save it in `directory` (refuses to overwrite an existing one)."""
        ca = cls.generate(now)
        ca.save(directory)
        return ca

    @staticmethod
    def exists(directory: Path) -> bool:
        return (directory / ROOT_CERT_FILE).exists()

    @classmethod
    def load(cls, directory: Path) -> LabDcapCA:
        def cert(name: str) -> x509.Certificate:
            return x509.load_pem_x509_certificate((directory / name).read_bytes())

        revoked_path = directory / REVOKED_FILE
        revoked = []
        if revoked_path.exists():
            for line in revoked_path.read_text().split():
                try:
                    revoked.append(int(line, 16))
                except ValueError:
                    raise ValueError(f"{revoked_path}: not a hex serial: {line!r}") from None
        return cls(
            cert(ROOT_CERT_FILE),
            _load_ec_key(directory / ROOT_KEY_FILE),
            cert(PCK_CA_CERT_FILE),
            _load_ec_key(directory / PCK_CA_KEY_FILE),
            cert(TCB_SIGNING_CERT_FILE),
            _load_ec_key(directory / TCB_SIGNING_KEY_FILE),
            revoked,
            directory,
        )

    def save(self, directory: Path) -> None:
        files = [
            (ROOT_KEY_FILE, _private_pem(self.root_key), 0o600),
            (PCK_CA_KEY_FILE, _private_pem(self.pck_ca_key), 0o600),
            (TCB_SIGNING_KEY_FILE, _private_pem(self.tcb_signing_key), 0o600),
            (ROOT_CERT_FILE, self.root_pem, 0o644),
            (PCK_CA_CERT_FILE, _pem(self.pck_ca_cert), 0o644),
            (TCB_SIGNING_CERT_FILE, _pem(self.tcb_signing_cert), 0o644),
            (README_FILE, _README.encode(), 0o644),
        ]
        directory.mkdir(parents=True, exist_ok=True)
        existing = [name for name, _, _ in files if (directory / name).exists()]
        if existing:  # checked up front so that a refusal leaves no half-written CA
            raise FileExistsError(
                f"{directory} already holds a lab DCAP CA ({', '.join(existing)})"
            )
        for name, data, mode in files:
            _write_file(directory / name, data, mode, exclusive=True)
        self.directory = directory
        self._save_revoked()

    @property
    def root_der(self) -> bytes:
        """The trust anchor for `dcap_qvl.verify_with_root_ca`."""
        return self.root_cert.public_bytes(serialization.Encoding.DER)

    @property
    def root_pem(self) -> bytes:
        return _pem(self.root_cert)

    @property
    def tcb_issuer_chain_pem(self) -> bytes:
        """TCB signing certificate and root, as PCS sends in SGX-TCB-Info-Issuer-Chain."""
        return _pem(self.tcb_signing_cert) + _pem(self.root_cert)

    @property
    def pck_issuer_chain_pem(self) -> bytes:
        return _pem(self.pck_ca_cert) + _pem(self.root_cert)

    # --- platforms and revocation ---

    def platform(
        self,
        tcb_status: TcbStatus | str = TcbStatus.UP_TO_DATE,
        *,
        qe_svn: int = QE_SVN,
        revoked: bool = False,
        now: datetime | None = None,
        pck_key: ec.EllipticCurvePrivateKey | None = None,
    ) -> LabPlatform:
        """A new lab platform whose PCK certificate places it at `tcb_status`'s TCB level.

        `revoked` puts the new PCK certificate's serial on the PCK CRL (saved with the CA if
        it has a directory): collateral made afterwards refuses the platform.
        """
        level = TCB_LEVELS[TcbStatus(tcb_status)]
        now = now or datetime.now(UTC)
        key = pck_key or ec.generate_private_key(ec.SECP256R1())
        extension = sgx_extension(
            ppid=secrets.token_bytes(16),
            components=level.components,
            pce_svn=level.pce_svn,
            cpu_svn=level.components,
            pce_id=LAB_PCE_ID,
            fmspc=LAB_FMSPC,
            platform_instance_id=secrets.token_bytes(16),
        )
        cert = _issue(
            subject=_name("SENG Lab SGX PCK Certificate (not Intel)"),
            key=key.public_key(),
            issuer=self.pck_ca_cert.subject,
            issuer_key=self.pck_ca_key,
            not_before=now - _BACKDATE,
            not_after=now + _LEAF_VALIDITY,
            ca_path_length=None,
            crl_url=_PCK_CRL_URL,
            extra=[x509.UnrecognizedExtension(OID_SGX_EXTENSION, extension)],
        )
        platform = LabPlatform(
            pck_key=key,
            pck_cert=cert,
            pck_ca_cert=self.pck_ca_cert,
            root_cert=self.root_cert,
            cpu_svn=level.components,
            pce_svn=level.pce_svn,
            qe_svn=qe_svn,
        )
        if revoked:
            self.revoke(cert.serial_number)
        return platform

    def revoke(self, serial: int) -> None:
        """Put a PCK certificate serial on the PCK CRL (and in the CA directory, if any)."""
        if serial not in self.revoked_serials:
            self.revoked_serials = sorted({*self.revoked_serials, serial})
            self._save_revoked()

    def _save_revoked(self) -> None:
        if self.directory is not None:
            text = "".join(f"{serial:x}\n" for serial in self.revoked_serials)
            _write_file(self.directory / REVOKED_FILE, text.encode(), 0o644)

    # --- collateral ---

    def tcb_info(
        self, now: datetime | None = None, validity: timedelta = COLLATERAL_VALIDITY
    ) -> str:
        """TCB info v3 for the lab FMSPC: the exact JSON text that is signed (compact)."""
        now = now or datetime.now(UTC)
        levels = [
            {
                "tcb": {
                    "sgxtcbcomponents": [{"svn": svn} for svn in level.components],
                    "pcesvn": level.pce_svn,
                },
                "tcbDate": level.tcb_date,
                "tcbStatus": status.value,
                **({"advisoryIDs": list(level.advisory_ids)} if level.advisory_ids else {}),
            }
            for status, level in TCB_LEVELS.items()
        ]
        body = {
            "id": "SGX",
            "version": 3,
            "issueDate": _timestamp(now - _BACKDATE),
            "nextUpdate": _timestamp(now + validity),
            "fmspc": LAB_FMSPC.hex().upper(),
            "pceId": LAB_PCE_ID.hex().upper(),
            "tcbType": _TCB_TYPE,
            "tcbEvaluationDataNumber": _TCB_EVALUATION_DATA_NUMBER,
            "tcbLevels": levels,
        }
        return json.dumps(body, separators=(",", ":"))

    def qe_identity(
        self, now: datetime | None = None, validity: timedelta = COLLATERAL_VALIDITY
    ) -> str:
        """QE identity v2 of the lab quoting enclave: the exact JSON text that is signed."""
        now = now or datetime.now(UTC)
        body = {
            "id": "QE",
            "version": 2,
            "issueDate": _timestamp(now - _BACKDATE),
            "nextUpdate": _timestamp(now + validity),
            "tcbEvaluationDataNumber": _TCB_EVALUATION_DATA_NUMBER,
            "miscselect": "00000000",
            "miscselectMask": "FFFFFFFF",
            "attributes": "11000000000000000000000000000000",
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": LAB_QE_MRSIGNER.hex().upper(),
            "isvprodid": LAB_QE_PROD_ID,
            "tcbLevels": [
                {
                    "tcb": {"isvsvn": QE_SVN},
                    "tcbDate": "2025-08-13T00:00:00Z",
                    "tcbStatus": "UpToDate",
                },
                {
                    "tcb": {"isvsvn": QE_SVN_OUT_OF_DATE},
                    "tcbDate": "2021-11-10T00:00:00Z",
                    "tcbStatus": "OutOfDate",
                    "advisoryIDs": ["INTEL-SA-00615"],
                },
            ],
        }
        return json.dumps(body, separators=(",", ":"))

    def sign(self, data: str) -> bytes:
        """The TCB signing key's raw signature over the exact bytes of a TCB info/QE identity."""
        return sign_raw(self.tcb_signing_key, data.encode())

    def pcs_tcb_info_body(
        self, now: datetime | None = None, validity: timedelta = COLLATERAL_VALIDITY
    ) -> bytes:
        """The PCS `GET /sgx/certification/v4/tcb` response body: {"tcbInfo":..,"signature":..}.

        Built by concatenation so that the signed bytes stay exactly as they are inside it.
        """
        tcb_info = self.tcb_info(now, validity)
        return f'{{"tcbInfo":{tcb_info},"signature":"{self.sign(tcb_info).hex()}"}}'.encode()

    def pcs_qe_identity_body(
        self, now: datetime | None = None, validity: timedelta = COLLATERAL_VALIDITY
    ) -> bytes:
        """The PCS `GET /sgx/certification/v4/qe/identity` body: {"enclaveIdentity":..,..}."""
        identity = self.qe_identity(now, validity)
        return (
            f'{{"enclaveIdentity":{identity},"signature":"{self.sign(identity).hex()}"}}'.encode()
        )

    def root_ca_crl(
        self, now: datetime | None = None, validity: timedelta = COLLATERAL_VALIDITY
    ) -> bytes:
        """The root CA's CRL (DER), empty: the lab never revokes its intermediates."""
        return self._crl(self.root_cert, self.root_key, (), now, validity)

    def pck_crl(
        self, now: datetime | None = None, validity: timedelta = COLLATERAL_VALIDITY
    ) -> bytes:
        """The PCK Platform CA's CRL (DER) with every revoked PCK serial."""
        return self._crl(self.pck_ca_cert, self.pck_ca_key, self.revoked_serials, now, validity)

    def _crl(
        self,
        issuer: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        serials: Iterable[int],
        now: datetime | None,
        validity: timedelta,
    ) -> bytes:
        # Like Intel's: CRL number and authority key identifier, no issuing distribution point.
        now = now or datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.subject)
            .last_update(now - _BACKDATE)
            .next_update(now + validity)
            .add_extension(x509.CRLNumber(1), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                critical=False,
            )
        )
        for serial in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now - _BACKDATE)
                .build()
            )
        crl = builder.sign(key, hashes.SHA256())
        return crl.public_bytes(serialization.Encoding.DER)

    def collateral(
        self, now: datetime | None = None, validity: timedelta = COLLATERAL_VALIDITY
    ) -> dict[str, str]:
        """The collateral for the lab FMSPC as dcap-qvl's `QuoteCollateralV3` JSON fields.

        Byte fields are hex, as dcap-qvl writes them; no `pck_certificate_chain`: the PCK
        chain comes from each quote (certification data type 5), so one bundle serves every
        lab platform. Valid from an hour before `now` until `now + validity`.
        """
        now = now or datetime.now(UTC)
        tcb_info = self.tcb_info(now, validity)
        qe_identity = self.qe_identity(now, validity)
        tcb_chain = self.tcb_issuer_chain_pem.decode()
        return {
            "pck_crl_issuer_chain": self.pck_issuer_chain_pem.decode(),
            "root_ca_crl": self.root_ca_crl(now, validity).hex(),
            "pck_crl": self.pck_crl(now, validity).hex(),
            "tcb_info_issuer_chain": tcb_chain,
            "tcb_info": tcb_info,
            "tcb_info_signature": self.sign(tcb_info).hex(),
            "qe_identity_issuer_chain": tcb_chain,
            "qe_identity": qe_identity,
            "qe_identity_signature": self.sign(qe_identity).hex(),
        }

    def collateral_json(
        self, now: datetime | None = None, validity: timedelta = COLLATERAL_VALIDITY
    ) -> str:
        """`collateral()` as JSON text, for `QuoteCollateralV3.from_json` and the gateway."""
        return json.dumps(self.collateral(now, validity), indent=2) + "\n"

    # --- quotes and enclave certificates ---

    def issue_enclave_cert(
        self,
        *,
        mrenclave: bytes,
        mrsigner: bytes,
        tcb_status: TcbStatus | str = TcbStatus.UP_TO_DATE,
        layout: Layout | str = Layout.SGX_RA_TLS,
        dice: bool = False,
        debug: bool = False,
        isv_prod_id: int = 0,
        isv_svn: int = 0,
        key_type: KeyType = "ecdsa",
        key_size: int | None = None,
        private_key: ClientPrivateKey | None = None,
        report_data_override: bytes | None = None,
        revoked_pck: bool = False,
        qe_svn: int = QE_SVN,
        platform: LabPlatform | None = None,
        now: datetime | None = None,
    ) -> DcapEnclaveCert:
        """A self-signed DCAP RA-TLS certificate for an enclave on a (new) lab platform.

        REPORTDATA binds the key as the layout's stack does (sgx-ra-tls: `report_data_for_key`;
        Gramine: SHA-256 of the SubjectPublicKeyInfo DER) unless `report_data_override`.
        `dice` (Gramine only) adds the TCG DICE extension, whose own quote binds the claims.
        `revoked_pck` revokes the platform's PCK certificate: refresh the collateral after.
        """
        layout = Layout(layout)
        if dice and layout is not Layout.GRAMINE:
            raise ValueError("the TCG DICE extension belongs to the Gramine layout")
        key = private_key if private_key is not None else generate_client_key(key_type, key_size)
        if platform is None:
            platform = self.platform(tcb_status, qe_svn=qe_svn, revoked=revoked_pck, now=now)
        if layout is Layout.SGX_RA_TLS:
            report_data = report_data_for_key(key.public_key())
        else:
            report_data = gramine_report_data(key.public_key())
        if report_data_override is not None:
            report_data = report_data_override

        def make_quote(data: bytes) -> bytes:
            return platform.quote(
                mrenclave=mrenclave,
                mrsigner=mrsigner,
                report_data=data,
                debug=debug,
                isv_prod_id=isv_prod_id,
                isv_svn=isv_svn,
            )

        quote = make_quote(report_data)
        dice_evidence = None
        if layout is Layout.SGX_RA_TLS:
            extensions = sgx_ra_tls_extensions(
                quote,
                platform,
                tcb_info_body=self.pcs_tcb_info_body(now),
                tcb_issuer_chain=self.tcb_issuer_chain_pem,
            )
        else:
            if dice:
                claims = gramine_claims(key.public_key())
                dice_evidence = dice_tagged_evidence(make_quote(dice_report_data(claims)), claims)
            extensions = gramine_extensions(quote, dice_evidence)
        cert_der = build_ratls_certificate(key, extensions, now=now)
        return DcapEnclaveCert(cert_der, key, quote, platform, layout, dice_evidence)


# --- the SGX extension of PCK certificates ---


def sgx_extension(
    *,
    ppid: bytes,
    components: bytes,
    pce_svn: int,
    cpu_svn: bytes,
    pce_id: bytes,
    fmspc: bytes,
    sgx_type: int = SGX_TYPE_SCALABLE,
    platform_instance_id: bytes | None = None,
    dynamic_platform: bool = False,
    cached_keys: bool = False,
    smt_enabled: bool = False,
) -> bytes:
    """DER of the SGX extension (1.2.840.113741.1.13.1) as Intel's PCK certificate profile
    lays it out: a SEQUENCE of SEQUENCE {OID, value}. Platform-CA certificates add the
    platform instance ID (.6) and configuration (.7); pass `platform_instance_id=None` for a
    Processor-CA style extension without them."""
    if len(ppid) != 16 or len(components) != 16 or len(cpu_svn) != 16:
        raise ValueError("PPID, TCB components and CPUSVN are 16 bytes")
    if len(pce_id) != 2 or len(fmspc) != 6:
        raise ValueError("PCE-ID is 2 bytes, FMSPC 6")

    def entry(oid: str, value: univ.Asn1Item) -> univ.Sequence:
        pair = univ.Sequence()
        pair.setComponentByPosition(0, univ.ObjectIdentifier(oid))
        pair.setComponentByPosition(1, value)
        return pair

    def sequence(items: list[univ.Sequence]) -> univ.Sequence:
        seq = univ.Sequence()
        for index, item in enumerate(items):
            seq.setComponentByPosition(index, item)
        return seq

    tcb = [entry(f"{_SGX}.2.{i + 1}", univ.Integer(svn)) for i, svn in enumerate(components)]
    tcb.append(entry(f"{_SGX}.2.17", univ.Integer(pce_svn)))
    tcb.append(entry(f"{_SGX}.2.18", univ.OctetString(cpu_svn)))
    items = [
        entry(f"{_SGX}.1", univ.OctetString(ppid)),
        entry(f"{_SGX}.2", sequence(tcb)),
        entry(f"{_SGX}.3", univ.OctetString(pce_id)),
        entry(f"{_SGX}.4", univ.OctetString(fmspc)),
        entry(f"{_SGX}.5", univ.Enumerated(sgx_type)),
    ]
    if platform_instance_id is not None:
        items.append(entry(f"{_SGX}.6", univ.OctetString(platform_instance_id)))
        configuration = [
            entry(f"{_SGX}.7.1", univ.Boolean(dynamic_platform)),
            entry(f"{_SGX}.7.2", univ.Boolean(cached_keys)),
            entry(f"{_SGX}.7.3", univ.Boolean(smt_enabled)),
        ]
        items.append(entry(f"{_SGX}.7", sequence(configuration)))
    encoded: bytes = der_encoder.encode(sequence(items))
    return encoded


# --- RA-TLS layouts ---


def pcs_url_encode(pem: bytes) -> bytes:
    """PEM as PCS sends it in an HTTP header (SGX-*-Issuer-Chain): percent-encoded."""
    return urllib.parse.quote(pem.decode(), safe="").encode()


def sgx_ra_tls_extensions(
    quote: bytes, platform: LabPlatform, *, tcb_info_body: bytes, tcb_issuer_chain: bytes
) -> dict[x509.ObjectIdentifier, bytes]:
    """sgx-ra-tls's ECDSA evidence: .6 the raw quote, .7 the PCK certificate (PEM, as the PCS
    body), .8 its issuer chain and .10 the TCB info's (URL-encoded PEM, as the PCS headers),
    .9 the TCB info response body."""
    return {
        OID_DCAP_QUOTE: quote,
        OID_DCAP_PCK_CERT: platform.pck_cert_pem,
        OID_DCAP_PCK_CHAIN: pcs_url_encode(platform.pck_issuer_chain_pem),
        OID_DCAP_TCB_INFO: tcb_info_body,
        OID_DCAP_TCB_CHAIN: pcs_url_encode(tcb_issuer_chain),
    }


def spki_der(public_key: ClientPublicKey) -> bytes:
    """The DER SubjectPublicKeyInfo, as mbedtls_pk_write_pubkey_der writes it."""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def gramine_report_data(public_key: ClientPublicKey) -> bytes:
    """Gramine's legacy binding: SHA-256 of the DER SubjectPublicKeyInfo, then 32 zeros."""
    return hashlib.sha256(spki_der(public_key)).digest() + bytes(32)


def gramine_claims(public_key: ClientPublicKey) -> bytes:
    """Gramine's serialized DICE claims: {"pubkey-hash": bstr(CBOR [1, SHA-256(SPKI)])}."""
    hash_entry = cbor2.dumps([_IANA_HASH_SHA256, hashlib.sha256(spki_der(public_key)).digest()])
    claims: bytes = cbor2.dumps({"pubkey-hash": hash_entry})
    return claims


def dice_report_data(claims: bytes) -> bytes:
    """REPORTDATA of the quote inside Gramine's DICE evidence: SHA-256 of the claims bytes."""
    return hashlib.sha256(claims).digest() + bytes(32)


def dice_tagged_evidence(quote: bytes, claims: bytes) -> bytes:
    """Gramine's TCG DICE tagged evidence: CBOR tag 60000 around [bstr quote, bstr claims]."""
    evidence: bytes = cbor2.dumps(cbor2.CBORTag(CBOR_TAG_TEE_QUOTE, [quote, claims]))
    return evidence


def gramine_extensions(
    quote: bytes, dice_evidence: bytes | None = None
) -> dict[x509.ObjectIdentifier, bytes]:
    """Gramine RA-TLS: the raw quote under the legacy OID, and the DICE evidence if given."""
    extensions = {OID_GRAMINE_LEGACY_QUOTE: quote}
    if dice_evidence is not None:
        extensions[OID_TCG_DICE_TAGGED_EVIDENCE] = dice_evidence
    return extensions


# --- helpers ---


def _issue(
    *,
    subject: x509.Name,
    key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    not_after: datetime,
    ca_path_length: int | None,
    crl_url: str,
    extra: list[x509.ExtensionType] | None = None,
) -> x509.Certificate:
    # Extensions as Intel's SGX certificates have them: AKI, CRL distribution point, SKI,
    # critical key usage and basic constraints.
    is_ca = ca_path_length is not None
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.CRLDistributionPoints(
                [
                    x509.DistributionPoint(
                        full_name=[x509.UniformResourceIdentifier(crl_url)],
                        relative_name=None,
                        reasons=None,
                        crl_issuer=None,
                    )
                ]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not is_ca,
                content_commitment=not is_ca,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=ca_path_length), critical=True)
    )
    for extension in extra or ():
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "seng-fw lab"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "XX"),
        ]
    )


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(_TIME_FORMAT)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an ECDSA private key")
    return key
