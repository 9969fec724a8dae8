"""DCAP collateral as configuration: per-FMSPC bundles in dcap-qvl's `QuoteCollateralV3` JSON.

A bundle holds what Intel's PCS (or a PCCS) publishes for one platform family: TCB info and
QE identity with their signatures and issuer chains, the root CA CRL and the PCK CRL (hex DER),
the PCK CRL issuer chain. `seng-fw attest fetch-collateral` writes one; the gateway loads them
from `attestation.dcap.collateral` (files, or directories of `*.json` files) and never fetches
collateral at admission time.

The store picks a bundle by the quote's FMSPC (and, when one FMSPC has bundles for both PCK
CAs, by the PCK CRL issuer). Each bundle's validity window is the intersection of its parts'
(issueDate/nextUpdate of TCB info and QE identity, thisUpdate/nextUpdate of both CRLs), so
"expired" means "any part expired", and `time_left` says how long each bundle has left.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import dcap_qvl
from cryptography import x509

from seng_fw.attest.identity import AttestationRejected, Check

# dcap-qvl's serde form of QuoteCollateralV3. dcap-qvl ignores unknown keys; a typo in a
# hand-edited bundle must not go unnoticed, so we refuse them.
REQUIRED_FIELDS = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)
# dcap-qvl's optional per-platform PCK chain: when present, dcap-qvl verifies with it instead
# of the chain in the quote, so a bundle holding one would serve one platform only. It has
# no place in a per-FMSPC bundle (the verifier adds one per quote when a quote needs it).
PER_PLATFORM_FIELD = "pck_certificate_chain"
_HEX_FIELDS = ("root_ca_crl", "pck_crl", "tcb_info_signature", "qe_identity_signature")
_FMSPC = re.compile(r"[0-9A-Fa-f]{12}")
# Bundles are a few tens of KiB; anything far larger is not a bundle.
_MAX_BUNDLE_BYTES = 4 * 1024 * 1024


class CollateralError(ValueError):
    """A collateral file that cannot be used (a configuration error, not a rejection)."""


@dataclass(frozen=True)
class CollateralBundle:
    """One parsed, not yet verified collateral bundle (dcap-qvl verifies its signatures)."""

    source: str
    fmspc: str  # upper-case hex, 12 digits
    tcb_type: str  # "SGX" or "TDX" (the TCB info "id")
    pck_crl_issuer: x509.Name
    not_before: datetime
    expires: datetime
    collateral: dcap_qvl.QuoteCollateralV3
    json_text: str

    def time_left(self, at: datetime) -> timedelta:
        """How long the bundle stays valid after `at` (negative once expired)."""
        return self.expires - at

    def check_valid(self, at: datetime) -> None:
        if at < self.not_before:
            raise AttestationRejected(
                Check.COLLATERAL_NOT_YET_VALID,
                f"collateral for FMSPC {self.fmspc} ({self.source}) is valid from "
                f"{self.not_before.isoformat()} (checked as of {at.isoformat()})",
            )
        if at > self.expires:
            raise AttestationRejected(
                Check.COLLATERAL_EXPIRED,
                f"collateral for FMSPC {self.fmspc} ({self.source}) expired on "
                f"{self.expires.isoformat()} (checked as of {at.isoformat()}); "
                "fetch fresh collateral (seng-fw attest fetch-collateral)",
            )


def parse_bundle(text: str | bytes, source: str = "<collateral>") -> CollateralBundle:
    """Parse one bundle strictly; `CollateralError` names the file and the problem."""
    try:
        raw = text.decode("utf-8") if isinstance(text, bytes) else text
        fields = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CollateralError(f"{source}: not JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise CollateralError(f"{source}: not a JSON object")
    missing = [name for name in REQUIRED_FIELDS if name not in fields]
    if missing:
        raise CollateralError(f"{source}: missing {', '.join(missing)}")
    if PER_PLATFORM_FIELD in fields:
        raise CollateralError(
            f"{source}: {PER_PLATFORM_FIELD} is one platform's; a per-FMSPC bundle must not "
            "carry it (seng-fw attest fetch-collateral leaves it out)"
        )
    unknown = sorted(set(fields) - set(REQUIRED_FIELDS))
    if unknown:
        raise CollateralError(f"{source}: unknown field(s) {', '.join(unknown)}")
    if not all(isinstance(value, str) for value in fields.values()):
        raise CollateralError(f"{source}: every field must be a string")
    try:
        binary = {name: bytes.fromhex(fields[name]) for name in _HEX_FIELDS}
    except ValueError:
        raise CollateralError(f"{source}: CRLs and signatures must be hex") from None

    tcb_info = _json_object(fields["tcb_info"], source, "tcb_info")
    qe_identity = _json_object(fields["qe_identity"], source, "qe_identity")
    fmspc = tcb_info.get("fmspc")
    if not isinstance(fmspc, str) or _FMSPC.fullmatch(fmspc) is None:
        raise CollateralError(f"{source}: tcb_info has no 12-digit hex fmspc")
    tcb_type = tcb_info.get("id", "SGX")  # TCB info v2 had no id: SGX only
    if tcb_type not in ("SGX", "TDX"):
        raise CollateralError(f"{source}: tcb_info id {tcb_type!r} is neither SGX nor TDX")

    starts = [_date(tcb_info, "issueDate", source), _date(qe_identity, "issueDate", source)]
    ends = [_date(tcb_info, "nextUpdate", source), _date(qe_identity, "nextUpdate", source)]
    crls = {}
    for name in ("root_ca_crl", "pck_crl"):
        try:
            crl = x509.load_der_x509_crl(binary[name])
            # cryptography decodes the issuer only when asked: a malformed one raised
            # ValueError out of this function (found by fuzzing).
            crl.issuer  # noqa: B018
        except ValueError as exc:
            raise CollateralError(f"{source}: {name} is not a DER CRL: {exc}") from None
        # A CRL without nextUpdate could never be judged stale. dcap-qvl's X.509 layer
        # (webpki) cannot parse one either (checked: "TrailingData(Time)" at verification);
        # refusing it when the bundle is loaded says so plainly, and up front.
        if crl.next_update_utc is None:
            raise CollateralError(f"{source}: {name} has no nextUpdate")
        starts.append(crl.last_update_utc)
        ends.append(crl.next_update_utc)
        crls[name] = crl
    try:
        collateral = dcap_qvl.QuoteCollateralV3.from_json(raw)
    except ValueError as exc:
        raise CollateralError(f"{source}: dcap-qvl refuses it: {exc}") from None
    return CollateralBundle(
        source=source,
        fmspc=fmspc.upper(),
        tcb_type=tcb_type,
        pck_crl_issuer=crls["pck_crl"].issuer,
        not_before=max(starts),
        expires=min(ends),
        collateral=collateral,
        json_text=raw,
    )


class CollateralStore:
    """The configured bundles, by FMSPC."""

    def __init__(self, bundles: Iterable[CollateralBundle] = ()) -> None:
        self._by_fmspc: dict[str, list[CollateralBundle]] = {}
        for bundle in bundles:
            same = self._by_fmspc.setdefault(bundle.fmspc, [])
            if any(other.pck_crl_issuer == bundle.pck_crl_issuer for other in same):
                # Two bundles for one platform family and PCK CA: which one would apply is
                # unclear (an old copy left beside a new one?), so refuse the configuration.
                raise CollateralError(
                    f"{bundle.source}: a second bundle for FMSPC {bundle.fmspc} and PCK CA "
                    f"{bundle.pck_crl_issuer.rfc4514_string()} "
                    f"(also in {same[0].source})"
                )
            same.append(bundle)

    @classmethod
    def load(cls, paths: Sequence[Path]) -> CollateralStore:
        """Files, or directories whose `*.json` files are each a bundle."""
        files: list[Path] = []
        for path in paths:
            if path.is_dir():
                found = sorted(path.glob("*.json"))
                if not found:
                    raise CollateralError(f"{path}: no *.json collateral bundles")
                files.extend(found)
            else:
                files.append(path)
        bundles = []
        for file in files:
            try:
                with file.open("rb") as handle:
                    data = handle.read(_MAX_BUNDLE_BYTES + 1)
            except OSError as exc:
                raise CollateralError(f"cannot read {file}: {exc.strerror or exc}") from None
            if len(data) > _MAX_BUNDLE_BYTES:
                raise CollateralError(f"{file}: larger than {_MAX_BUNDLE_BYTES} bytes")
            bundles.append(parse_bundle(data, str(file)))
        return cls(bundles)

    def __len__(self) -> int:
        return sum(len(bundles) for bundles in self._by_fmspc.values())

    def bundles(self) -> list[CollateralBundle]:
        return [bundle for fmspc in sorted(self._by_fmspc) for bundle in self._by_fmspc[fmspc]]

    def time_left(self, at: datetime) -> dict[str, timedelta]:
        """Per bundle (keyed by FMSPC, and source when an FMSPC has two): time until expiry,
        negative when expired. For `seng-fw status` and the metrics."""
        result: dict[str, timedelta] = {}
        for fmspc, bundles in sorted(self._by_fmspc.items()):
            for bundle in bundles:
                key = fmspc if len(bundles) == 1 else f"{fmspc} {bundle.source}"
                result[key] = bundle.time_left(at)
        return result

    def select(
        self, fmspc: str, pck_issuer: Callable[[], x509.Name] | None = None
    ) -> CollateralBundle:
        """The bundle for this FMSPC, or `no_collateral`. When the FMSPC has bundles for both
        PCK CAs, `pck_issuer()` (called only then) names the PCK certificate's issuer."""
        candidates = self._by_fmspc.get(fmspc.upper(), [])
        if len(candidates) > 1 and pck_issuer is not None:
            issuer = pck_issuer()
            candidates = [b for b in candidates if b.pck_crl_issuer == issuer]
        if len(candidates) != 1:
            raise AttestationRejected(
                Check.NO_COLLATERAL, f"no collateral configured for FMSPC {fmspc.upper()}"
            )
        return candidates[0]


def _json_object(text: str, source: str, name: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise CollateralError(f"{source}: {name} is not JSON") from None
    if not isinstance(value, dict):
        raise CollateralError(f"{source}: {name} is not a JSON object")
    return value


def _date(document: dict[str, Any], name: str, source: str) -> datetime:
    text = document.get(name)
    if not isinstance(text, str):
        raise CollateralError(f"{source}: no {name}")
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CollateralError(f"{source}: bad {name} {text!r}") from None
    if value.tzinfo is None:
        raise CollateralError(f"{source}: {name} {text!r} has no time zone")
    return value
