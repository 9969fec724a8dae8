"""Lab attestation CA: stands in for Intel's attestation service in labs and tests.

It has the same shape as Intel's: a root CA (RSA-3072, like "Intel SGX Attestation Report
Signing CA") that directly issues a report-signing certificate (RSA-2048, like Intel's). It
makes IAS-style reports (API v3/v4 JSON around a 432-byte quote body), signs them like IAS
(RSA PKCS#1 v1.5, SHA-256) and wraps them in RA-TLS client certificates exactly in the
sgx-ra-tls format (see seng_fw.attest.ratls). Only its trust anchor differs, and the gateway
trusts it only when configured to.

    ca = LabCA.create(Path("lab-ca"))              # or LabCA.load(...), LabCA.generate()
    enclave = ca.issue_enclave_cert(mrenclave=bytes(32), mrsigner=bytes(32))
    enclave.cert_der, enclave.key_pem              # for the DTLS client
    ca.root_pem                                    # the trust anchor for the verifier
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from seng_fw.attest.quote import (
    FLAG_DEBUG,
    FLAG_INITTED,
    FLAG_MODE64BIT,
    SIGN_TYPE_LINKABLE,
    SIGN_TYPE_UNLINKABLE,
    QuoteBody,
)
from seng_fw.attest.ratls import EvidenceEncoding, encode_evidence, report_data_for_key

# File names say loudly that these are lab keys, never to be confused with Intel's.
ROOT_CERT_FILE = "lab-attestation-root.pem"
ROOT_KEY_FILE = "lab-attestation-root.key.pem"
SIGNING_CERT_FILE = "lab-report-signing.pem"
SIGNING_KEY_FILE = "lab-report-signing.key.pem"
README_FILE = "README-LAB-ONLY.txt"
_README = """\
This directory holds a LAB attestation CA made by `seng-fw lab ca init`.
It imitates Intel's IAS report signing for labs and tests. Its keys are not protected:
never configure lab-attestation-root.pem as a trust anchor of a production gateway.
"""

KeyType = Literal["ecdsa", "rsa"]
ClientPrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

_CURVES: dict[int, ec.EllipticCurve] = {384: ec.SECP384R1(), 256: ec.SECP256R1()}
_RSA_BITS = (2048, 3072)
# SENG's client key when built with USE_ECDSA is on secp384r1; sgx-ra-tls's RSA key is 2048.
_DEFAULT_KEY_SIZE: dict[str, int] = {"ecdsa": 384, "rsa": 2048}

# IAS quote statuses (API v3/v4). The lab CA signs any of them, so tests can exercise
# the verifier's policy.
QUOTE_STATUSES = (
    "OK",
    "SIGNATURE_INVALID",
    "GROUP_REVOKED",
    "SIGNATURE_REVOKED",
    "KEY_REVOKED",
    "SIGRL_VERSION_MISMATCH",
    "GROUP_OUT_OF_DATE",
    "CONFIGURATION_NEEDED",
    "SW_HARDENING_NEEDED",
    "CONFIGURATION_AND_SW_HARDENING_NEEDED",
)
# Statuses for which IAS adds a platformInfoBlob. Genuine SW_HARDENING_NEEDED reports carry
# none (the platform is up to date; the advisory is about software), so neither do ours.
_PIB_STATUSES = frozenset(
    {
        "GROUP_REVOKED",
        "GROUP_OUT_OF_DATE",
        "CONFIGURATION_NEEDED",
        "CONFIGURATION_AND_SW_HARDENING_NEEDED",
    }
)
# Typical advisories IAS listed for each status (API v4 puts them in the body).
_DEFAULT_ADVISORIES: dict[str, tuple[str, ...]] = {
    "GROUP_OUT_OF_DATE": ("INTEL-SA-00219", "INTEL-SA-00289"),
    "CONFIGURATION_NEEDED": ("INTEL-SA-00233",),
    "SW_HARDENING_NEEDED": ("INTEL-SA-00334",),
    "CONFIGURATION_AND_SW_HARDENING_NEEDED": ("INTEL-SA-00233", "INTEL-SA-00334"),
}
_ADVISORY_URL = "https://security-center.intel.com"
_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"

_ROOT_VALIDITY = timedelta(days=20 * 365)
_SIGNING_VALIDITY = timedelta(days=5 * 365)
_ENCLAVE_CERT_VALIDITY = timedelta(days=365)
_BACKDATE = timedelta(hours=1)  # tolerate clocks a little behind the CA's


@dataclass(frozen=True)
class LabCertificate:
    """A lab client certificate and its key, in the forms the DTLS layer and files take."""

    cert_der: bytes
    private_key: ClientPrivateKey

    @property
    def cert_pem(self) -> bytes:
        cert = x509.load_der_x509_certificate(self.cert_der)
        return cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """PKCS#8 PEM, unencrypted (a lab key), as the DTLS layer loads it."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@dataclass(frozen=True)
class EnclaveCert(LabCertificate):
    """An RA-TLS client certificate with its key and the evidence inside it."""

    report: bytes  # the exact JSON body that was signed
    signature: bytes  # raw RSA signature over `report`
    quote: QuoteBody
    encoding: EvidenceEncoding

    @property
    def signature_b64(self) -> bytes:
        """The signature as IAS sends it in the X-IASReport-Signature header."""
        return base64.b64encode(self.signature)


class LabCA:
    """A root CA and a report-signing certificate issued by it, with their private keys."""

    def __init__(
        self,
        root_cert: x509.Certificate,
        root_key: rsa.RSAPrivateKey,
        signing_cert: x509.Certificate,
        signing_key: rsa.RSAPrivateKey,
    ) -> None:
        if root_cert.public_key() != root_key.public_key():
            raise ValueError("root certificate and key do not match")
        if signing_cert.public_key() != signing_key.public_key():
            raise ValueError("report-signing certificate and key do not match")
        self.root_cert = root_cert
        self.root_key = root_key
        self.signing_cert = signing_cert
        self.signing_key = signing_key

    # --- creation and storage ---

    @classmethod
    def generate(cls, now: datetime | None = None) -> LabCA:
        """A fresh CA in memory (RSA-3072 root, RSA-2048 report-signing key)."""
        now = now or datetime.now(UTC)
        root_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        root_name = _lab_name("SENG Lab Attestation Report Signing CA (not Intel)")
        root_cert = (
            x509.CertificateBuilder()
            .subject_name(root_name)
            .issuer_name(root_name)
            .public_key(root_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _ROOT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False
            )
            .sign(root_key, hashes.SHA256())
        )
        signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        signing_cert = _issue_signing_cert(
            root_cert, root_key, signing_key, now - _BACKDATE, now + _SIGNING_VALIDITY
        )
        return cls(root_cert, root_key, signing_cert, signing_key)

    @classmethod
    def create(cls, directory: Path, now: datetime | None = None) -> LabCA:
        """Generate a CA and save it in `directory` (refuses to overwrite an existing one)."""
        ca = cls.generate(now)
        ca.save(directory)
        return ca

    @classmethod
    def load(cls, directory: Path) -> LabCA:
        root_cert = x509.load_pem_x509_certificate((directory / ROOT_CERT_FILE).read_bytes())
        signing_cert = x509.load_pem_x509_certificate((directory / SIGNING_CERT_FILE).read_bytes())
        root_key = _load_rsa_key(directory / ROOT_KEY_FILE)
        signing_key = _load_rsa_key(directory / SIGNING_KEY_FILE)
        return cls(root_cert, root_key, signing_cert, signing_key)

    def save(self, directory: Path) -> None:
        files = [
            (ROOT_KEY_FILE, _private_pem(self.root_key), 0o600),
            (SIGNING_KEY_FILE, _private_pem(self.signing_key), 0o600),
            (ROOT_CERT_FILE, self.root_pem, 0o644),
            (SIGNING_CERT_FILE, self.signing_cert_pem, 0o644),
            (README_FILE, _README.encode(), 0o644),
        ]
        directory.mkdir(parents=True, exist_ok=True)
        existing = [name for name, _, _ in files if (directory / name).exists()]
        if existing:  # checked up front so that a refusal leaves no half-written CA
            raise FileExistsError(f"{directory} already holds a lab CA ({', '.join(existing)})")
        for name, data, mode in files:
            write_file(directory / name, data, mode, exclusive=True)

    @property
    def root_pem(self) -> bytes:
        return self.root_cert.public_bytes(serialization.Encoding.PEM)

    @property
    def signing_cert_pem(self) -> bytes:
        return self.signing_cert.public_bytes(serialization.Encoding.PEM)

    def with_signing_validity(self, not_before: datetime, not_after: datetime) -> LabCA:
        """The same CA with its report-signing certificate re-issued for another period
        (same key), e.g. to test expired or not-yet-valid signing certificates."""
        cert = _issue_signing_cert(
            self.root_cert, self.root_key, self.signing_key, not_before, not_after
        )
        return LabCA(self.root_cert, self.root_key, cert, self.signing_key)

    # --- reports and enclave certificates ---

    def sign_report(self, report: bytes) -> bytes:
        """The raw signature IAS would put (base64) in X-IASReport-Signature."""
        return self.signing_key.sign(report, padding.PKCS1v15(), hashes.SHA256())

    def issue_enclave_cert(
        self,
        *,
        mrenclave: bytes,
        mrsigner: bytes,
        debug: bool = False,
        isv_prod_id: int = 0,
        isv_svn: int = 0,
        status: str = "OK",
        key_type: KeyType = "ecdsa",
        key_size: int | None = None,
        private_key: ClientPrivateKey | None = None,
        # What SENG clients send (the 2018 sgx-ra-tls the SENG Runtime and SDK build on);
        # the original Go server refuses the 2019 raw/PEM form.
        encoding: EvidenceEncoding | str = EvidenceEncoding.V2018,
        timestamp: datetime | None = None,
        report_version: int | None = None,
        report_data_override: bytes | None = None,
        advisory_ids: tuple[str, ...] | None = None,
        linkable: bool = False,
    ) -> EnclaveCert:
        """A self-signed RA-TLS certificate whose quote attests the given enclave identity.

        The key is generated (`key_type`/`key_size`: ecdsa 384 or 256, rsa 2048 or 3072)
        unless `private_key` is given. REPORTDATA binds the key as sgx-ra-tls does, unless
        `report_data_override` (64 bytes) says otherwise. The report is IAS API v3 for the
        2018 encoding and v4 for 2019, unless `report_version` is given.
        """
        encoding = EvidenceEncoding(encoding)
        key = private_key if private_key is not None else generate_client_key(key_type, key_size)
        report_data = report_data_for_key(key.public_key())
        if report_data_override is not None:
            report_data = report_data_override
        quote = make_quote(
            mrenclave=mrenclave,
            mrsigner=mrsigner,
            debug=debug,
            isv_prod_id=isv_prod_id,
            isv_svn=isv_svn,
            report_data=report_data,
            linkable=linkable,
        )
        if report_version is None:
            report_version = 3 if encoding is EvidenceEncoding.V2018 else 4
        report = make_report(
            quote,
            status=status,
            timestamp=timestamp,
            version=report_version,
            advisory_ids=advisory_ids,
        )
        signature = self.sign_report(report)
        extensions = encode_evidence(
            encoding, report, base64.b64encode(signature), self.signing_cert, self.root_cert
        )
        cert_der = build_ratls_certificate(key, extensions)
        return EnclaveCert(cert_der, key, report, signature, quote, encoding)


def generate_client_key(
    key_type: KeyType = "ecdsa", key_size: int | None = None
) -> ClientPrivateKey:
    """An enclave's certificate key: ECDSA P-384 (default) or P-256, RSA-2048 or 3072."""
    size = key_size or _DEFAULT_KEY_SIZE.get(key_type, 0)
    if key_type == "ecdsa" and size in _CURVES:
        return ec.generate_private_key(_CURVES[size])
    if key_type == "rsa" and size in _RSA_BITS:
        return rsa.generate_private_key(public_exponent=65537, key_size=size)
    raise ValueError(f"unsupported client key {key_type}-{size}: ecdsa 384/256, rsa 2048/3072")


def make_quote(
    *,
    mrenclave: bytes,
    mrsigner: bytes,
    report_data: bytes,
    debug: bool = False,
    isv_prod_id: int = 0,
    isv_svn: int = 0,
    linkable: bool = False,
) -> QuoteBody:
    """An EPID quote body (version 2) as a lab platform would produce it."""
    if len(mrenclave) != 32 or len(mrsigner) != 32:
        raise ValueError("MRENCLAVE and MRSIGNER are 32 bytes")
    if len(report_data) != 64:
        raise ValueError("REPORTDATA is 64 bytes")
    flags = FLAG_INITTED | FLAG_MODE64BIT | (FLAG_DEBUG if debug else 0)
    return QuoteBody(
        version=2,
        sign_type=SIGN_TYPE_LINKABLE if linkable else SIGN_TYPE_UNLINKABLE,
        epid_group_id=bytes.fromhex("1ab00000"),  # a made-up lab EPID group
        qe_svn=11,
        pce_svn=10,
        xeid=0,
        basename=secrets.token_bytes(16) + bytes(16),
        cpu_svn=bytes.fromhex("0f0f0205ff8007000000000000000000"),
        misc_select=0,
        attributes_flags=flags,
        xfrm=0x07,  # x87, SSE, AVX
        mrenclave=mrenclave,
        mrsigner=mrsigner,
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        report_data=report_data,
    )


def make_report(
    quote: QuoteBody,
    *,
    status: str = "OK",
    timestamp: datetime | None = None,
    version: int | None = 4,
    advisory_ids: tuple[str, ...] | None = None,
) -> bytes:
    """A report body laid out like IAS's (compact JSON, IAS's key order); version None
    is IAS API v2, whose reports have no version field."""
    timestamp = (timestamp or datetime.now(UTC)).astimezone(UTC)
    fields: dict[str, object] = {
        "id": str(secrets.randbits(128)),
        "timestamp": timestamp.strftime(_TIMESTAMP_FORMAT),
    }
    if version is not None:
        fields["version"] = version
    if quote.sign_type == SIGN_TYPE_LINKABLE:
        fields["epidPseudonym"] = base64.b64encode(secrets.token_bytes(128)).decode()
    advisories = _DEFAULT_ADVISORIES.get(status, ()) if advisory_ids is None else advisory_ids
    # v2 had no advisories, v3 sent them in HTTP headers, v4 on in the body.
    if version is not None and version >= 4 and advisories:
        fields["advisoryURL"] = _ADVISORY_URL
        fields["advisoryIDs"] = list(advisories)
    fields["isvEnclaveQuoteStatus"] = status
    if status in _PIB_STATUSES:
        # TLV header (type 21, version 2, 101 bytes) and a zeroed platform info body.
        fields["platformInfoBlob"] = "15020065" + bytes(101).hex()
    fields["isvEnclaveQuoteBody"] = base64.b64encode(quote.to_bytes()).decode()
    return json.dumps(fields, separators=(",", ":")).encode()


def build_ratls_certificate(
    key: ClientPrivateKey,
    evidence: dict[x509.ObjectIdentifier, bytes],
    *,
    critical_extensions: tuple[x509.ExtensionType, ...] = (),
    now: datetime | None = None,
) -> bytes:
    """A self-signed certificate carrying `evidence` as non-critical extensions (DER).

    Laid out like sgx-ra-tls's mbedtls attester: same subject and issuer, CA:FALSE, key
    identifiers, SHA-256 signature. `critical_extensions` exists for tests.
    """
    now = now or datetime.now(UTC)
    name = _lab_name("SENG lab enclave")
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _ENCLAVE_CERT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)
    )
    for oid, value in evidence.items():
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
    for extension in critical_extensions:
        builder = builder.add_extension(extension, critical=True)
    cert = builder.sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.DER)


def write_file(path: Path, data: bytes, mode: int, *, exclusive: bool = False) -> None:
    """Write `path` with `mode` from the start (no window with wider permissions);
    `exclusive` refuses to replace an existing file."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is masked by the umask and ignored if it exists
        os.write(fd, data)
    finally:
        os.close(fd)


def _issue_signing_cert(
    root_cert: x509.Certificate,
    root_key: rsa.RSAPrivateKey,
    key: rsa.RSAPrivateKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    # Shaped like Intel's: end entity, keyUsage digitalSignature + nonRepudiation.
    return (
        x509.CertificateBuilder()
        .subject_name(_lab_name("SENG Lab Attestation Report Signing (not Intel)"))
        .issuer_name(root_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, content_commitment=True), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )


def _lab_name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "XX"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "seng-fw lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(
    *,
    digital_signature: bool = False,
    content_commitment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=content_commitment,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_rsa_key(path: Path) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path} is not an RSA private key")
    return key
