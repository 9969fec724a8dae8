"""Fetching DCAP collateral from a PCCS or Intel's PCS (`seng-fw attest fetch-collateral`).

Administrator's tool only: the gateway never fetches collateral at admission time.
For a quote, dcap-qvl's `get_collateral` does the work. For a bare FMSPC, dcap-qvl 0.7's Python
API has nothing (its Rust side fetches by FMSPC, but the binding takes a quote only), so that
path is written here: the four PCS v4 requests dcap-qvl makes, assembled into the same JSON.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message

import dcap_qvl

from seng_fw.attest.collateral import PER_PLATFORM_FIELD

TIMEOUT = 30.0
# Intel's PCS has no root CA CRL endpoint; the root certificate's CRL distribution point.
INTEL_ROOT_CA_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"


class FetchError(Exception):
    """The collateral could not be fetched (network, HTTP status, or an odd response)."""


def fetch_for_quote(pccs_url: str, quote: bytes) -> str:
    """Collateral for the platform that produced `quote`, as QuoteCollateralV3 JSON."""
    try:
        collateral = asyncio.run(dcap_qvl.get_collateral(_base(pccs_url), quote))
        fields = json.loads(collateral.to_json())
    except (ValueError, RuntimeError, OSError) as exc:
        raise FetchError(" ".join(str(exc).split())) from None
    # get_collateral attaches the quote's own PCK chain, and dcap-qvl then verifies every
    # quote with that chain instead of the quote's: the bundle would admit one platform only.
    fields.pop(PER_PLATFORM_FIELD, None)
    return json.dumps(fields, indent=2)


def fetch_for_fmspc(pccs_url: str, fmspc: str, ca: str) -> str:
    """Collateral for an FMSPC and PCK CA ("processor" or "platform")."""
    base = _base(pccs_url) + "/sgx/certification/v4"
    tcb_body, tcb_headers = _get(f"{base}/tcb?fmspc={fmspc}")
    qe_body, qe_headers = _get(f"{base}/qe/identity")
    pck_crl, crl_headers = _get(f"{base}/pckcrl?ca={ca}&encoding=der")
    try:
        root_crl, _ = _get(f"{base}/rootcacrl")
        root_crl = bytes.fromhex(root_crl.decode("ascii"))  # a PCCS answers hex
    except (FetchError, ValueError, UnicodeDecodeError):
        root_crl, _ = _get(INTEL_ROOT_CA_CRL_URL)
    tcb_info, tcb_signature = _signed_body(tcb_body, "tcbInfo")
    qe_identity, qe_signature = _signed_body(qe_body, "enclaveIdentity")
    document = {
        "pck_crl_issuer_chain": _header(crl_headers, "SGX-PCK-CRL-Issuer-Chain"),
        "root_ca_crl": root_crl.hex(),
        "pck_crl": pck_crl.hex(),
        "tcb_info_issuer_chain": _header(
            tcb_headers, "TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"
        ),
        "tcb_info": tcb_info,
        "tcb_info_signature": tcb_signature,
        "qe_identity_issuer_chain": _header(qe_headers, "SGX-Enclave-Identity-Issuer-Chain"),
        "qe_identity": qe_identity,
        "qe_identity_signature": qe_signature,
    }
    return json.dumps(document, indent=2)


def _base(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("https", "http") or not parsed.netloc:
        raise FetchError(f"not an http(s) URL: {url!r}")
    return url.rstrip("/")


def _get(url: str) -> tuple[bytes, Message]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return response.read(), response.headers
    except urllib.error.HTTPError as exc:
        raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise FetchError(f"{url}: {getattr(exc, 'reason', exc)}") from None


def _header(headers: Message, *names: str) -> str:
    for name in names:
        value = headers.get(name)
        if value:
            return urllib.parse.unquote(value)
    raise FetchError(f"response lacks the {names[0]} header")


def _signed_body(body: bytes, key: str) -> tuple[str, str]:
    """The exact text of `key`'s value (the signature covers those bytes) and the signature.

    Re-serialising the parsed JSON could change the bytes, so the value is cut out of the body:
    raw_decode finds where it ends.
    """
    try:
        text = body.decode("utf-8")
        document = json.loads(text)
        match = re.match(r'\s*\{\s*"' + re.escape(key) + r'"\s*:\s*', text)
        if match is None:
            raise ValueError(f"body does not start with {key!r}")
        _, end = json.JSONDecoder().raw_decode(text, match.end())
    except (UnicodeDecodeError, ValueError) as exc:
        raise FetchError(f"odd {key} response: {exc}") from None
    signature = document.get("signature") if isinstance(document, dict) else None
    if not isinstance(signature, str):
        raise FetchError(f"{key} response has no signature")
    return text[match.end() : end], signature
