"""Admission CPU cost of attestation: one DCAP certificate vs one EPID certificate.

    python bench/bench_attest.py [--runs 200]

Times `verify_certificate` (what the gateway calls once per tunnel handshake) on lab
certificates in the same run: EPID/IAS (sgx-ra-tls, RSA-2048 report signature), DCAP in the
sgx-ra-tls ECDSA layout, Gramine legacy and Gramine with TCG DICE (two quotes, one verified),
each through `AnyEvidenceVerifier` as the gateway builds it, and dcap-qvl's
`verify_with_root_ca` alone (the part a hand-written verifier would not change). Prints
process CPU time per call (median, p90) and the ratio to EPID. A DTLS handshake costs a few
ms of server CPU besides (DESIGN.md section 1). Shared, noisy machines: compare within a run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

import dcap_qvl

from seng_fw.attest.collateral import CollateralStore, parse_bundle
from seng_fw.attest.dcap import AnyEvidenceVerifier, DcapPolicy, DcapVerifier
from seng_fw.attest.policy import AttestationPolicy
from seng_fw.attest.verifier import IasVerifier
from seng_fw.lab.ca import LabCA
from seng_fw.lab.dcap import LabDcapCA


def _cpu_per_call(call: Callable[[], object], runs: int) -> list[float]:
    call()  # warm caches (first-use costs are not admission costs)
    samples = []
    for _ in range(runs):
        start = time.process_time_ns()
        call()
        samples.append((time.process_time_ns() - start) / 1e6)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()

    now = datetime.now(UTC)
    epid_ca = LabCA.generate()
    dcap_ca = LabDcapCA.generate()
    store = CollateralStore([parse_bundle(dcap_ca.collateral_json(now))])
    verifier = AnyEvidenceVerifier(
        IasVerifier(AttestationPolicy(roots=(epid_ca.root_cert,), allow_debug=True)),
        DcapVerifier(DcapPolicy(roots=(dcap_ca.root_cert,), collateral=store)),
    )
    ids = {"mrenclave": bytes(32), "mrsigner": bytes(32)}
    epid = epid_ca.issue_enclave_cert(**ids).cert_der  # type: ignore[arg-type]
    sgx_ra_tls = dcap_ca.issue_enclave_cert(**ids)  # type: ignore[arg-type]
    gramine = dcap_ca.issue_enclave_cert(**ids, layout="gramine")  # type: ignore[arg-type]
    dice = dcap_ca.issue_enclave_cert(**ids, layout="gramine", dice=True)  # type: ignore[arg-type]
    collateral = store.bundles()[0].collateral
    now_secs = int(now.timestamp())

    cases: list[tuple[str, Callable[[], object]]] = [
        ("EPID (sgx-ra-tls, IAS report)", lambda: verifier.verify_certificate(epid, now)),
        (
            "DCAP sgx-ra-tls ECDSA",
            lambda: verifier.verify_certificate(sgx_ra_tls.cert_der, now),
        ),
        ("DCAP Gramine legacy", lambda: verifier.verify_certificate(gramine.cert_der, now)),
        ("DCAP Gramine + TCG DICE", lambda: verifier.verify_certificate(dice.cert_der, now)),
        (
            "dcap-qvl verify_with_root_ca alone",
            lambda: dcap_qvl.verify_with_root_ca(
                sgx_ra_tls.quote, collateral, dcap_ca.root_der, now_secs
            ),
        ),
    ]
    results = [(name, _cpu_per_call(call, args.runs)) for name, call in cases]
    baseline = statistics.median(results[0][1])
    print(f"verify_certificate, process CPU per call over {args.runs} runs")
    print(f"{'evidence':<36} {'median ms':>10} {'p90 ms':>8} {'x EPID':>7}")
    for name, samples in results:
        median = statistics.median(samples)
        p90 = statistics.quantiles(samples, n=10)[-1]
        print(f"{name:<36} {median:>10.3f} {p90:>8.3f} {median / baseline:>7.2f}")


if __name__ == "__main__":
    main()
