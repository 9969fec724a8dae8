"""`seng-fw attest verify` with DCAP certificates, `verify-quote`, `fetch-collateral`:
exit codes 0 trusted / 1 rejected (one line on stderr) / 2 unreadable input or bad usage."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

import dcap_qvl
import pytest

import seng_fw.cli
from seng_fw.lab.dcap import LabDcapCA

FIXTURES = Path(__file__).parent.parent / "fixtures" / "dcap"
QUOTE = FIXTURES / "dcap-qvl-sgx-quote.bin"
COLLATERAL = FIXTURES / "dcap-qvl-sgx-collateral.json"
ROOT = FIXTURES / "intel-sgx-root-ca.pem"
STATUS = "ConfigurationAndSWHardeningNeeded"
INSIDE = "2025-06-20T00:00:00"
AFTER = "2025-07-20T00:00:00Z"
DCAP_JSON_KEYS = {"evidence", "tcb_status", "advisory_ids", "fmspc", "collateral_expires"}

Main = Callable[[Sequence[str]], int]


@pytest.fixture
def main(monkeypatch: pytest.MonkeyPatch) -> Main:
    monkeypatch.setattr(seng_fw.cli, "_COMMAND_MODULES", ("seng_fw.attest.cli",))
    return seng_fw.cli.main


def quote_argv(quote: Path = QUOTE, *extra: str) -> list[str]:
    return [
        "attest", "verify-quote", str(quote),
        "--collateral", str(COLLATERAL), "--root", str(ROOT), *extra,
    ]  # fmt: skip


def test_verify_quote_genuine_inside_validity(
    main: Main, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(quote_argv(QUOTE, "--allow-status", STATUS, "--at", INSIDE, "--json")) == 0
    document = json.loads(capsys.readouterr().out)["result"]
    assert document.keys() >= DCAP_JSON_KEYS
    assert document["trusted"] is True and document["evidence"] == "dcap"
    assert document["tcb_status"] == STATUS
    assert document["advisory_ids"] == ["INTEL-SA-00289", "INTEL-SA-00615"]
    assert document["fmspc"] == "00A067110000"
    assert document["collateral_expires"] == "2025-07-19T10:01:18+00:00"
    assert document["report_data_checked"] is False
    assert bytes.fromhex(document["report_data"]).startswith(b"Hello, world!")


def test_verify_quote_text_output(main: Main, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(quote_argv(QUOTE, "--allow-status", STATUS, "--at", INSIDE)) == 0
    out = capsys.readouterr().out
    assert "evidence:" in out and "dcap" in out and "00A067110000" in out
    assert "(not checked)" in out


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        (["--at", AFTER, "--allow-status", STATUS], "collateral_expired"),
        (["--at", INSIDE], "tcb_status"),
        (["--at", INSIDE, "--allow-status", STATUS, "--refuse-advisory", "INTEL-SA-00289"],
         "advisory_refused"),
    ],
    ids=["after-validity", "status-not-allowed", "refused-advisory"],
)  # fmt: skip
def test_verify_quote_rejections(
    main: Main, capsys: pytest.CaptureFixture[str], extra: list[str], check: str
) -> None:
    assert main(quote_argv(QUOTE, *extra)) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert f"({check})" in captured.err


def test_verify_quote_tampered_byte(
    main: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = bytearray(QUOTE.read_bytes())
    data[200] ^= 0x80
    tampered = tmp_path / "tampered.bin"
    tampered.write_bytes(bytes(data))
    assert main(quote_argv(tampered, "--allow-status", STATUS, "--at", INSIDE, "--json")) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["error"]["code"] == "quote_signature"
    assert "(quote_signature)" in captured.err


def test_allow_status_never_swallows_the_positional(main: Main) -> None:
    argv = [
        "attest", "verify-quote", "--allow-status", STATUS, "--allow-status", "OutOfDate",
        str(QUOTE), "--collateral", str(COLLATERAL), "--root", str(ROOT), "--at", INSIDE,
    ]  # fmt: skip
    assert main(argv) == 0


def test_verify_quote_unreadable_input(
    main: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(quote_argv(tmp_path / "missing.bin")) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    argv = ["attest", "verify-quote", str(QUOTE), "--collateral", str(bad), "--root", str(ROOT)]
    assert main(argv) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # --collateral is required
        main(["attest", "verify-quote", str(QUOTE), "--root", str(ROOT)])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:  # Revoked can never be allowed
        main(quote_argv(QUOTE, "--allow-status", "Revoked"))
    assert exc.value.code == 2


# --- attest verify with DCAP certificates ---


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[LabDcapCA, Path]:
    directory = tmp_path_factory.mktemp("lab-dcap")
    ca = LabDcapCA.generate()
    (directory / "root.pem").write_bytes(ca.root_pem)
    (directory / "collateral.json").write_text(ca.collateral_json())
    return ca, directory


@pytest.mark.parametrize("layout", ["sgx-ra-tls", "gramine"])
def test_verify_dcap_certificate(
    main: Main,
    lab: tuple[LabDcapCA, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    layout: str,
) -> None:
    ca, directory = lab
    enclave = ca.issue_enclave_cert(
        mrenclave=b"\x01" * 32, mrsigner=b"\x02" * 32, layout=layout, tcb_status="OutOfDate"
    )
    cert = tmp_path / "cert.pem"
    cert.write_bytes(enclave.cert_pem)
    argv = ["attest", "verify", str(cert), "--root", str(directory / "root.pem"), "--json"]
    assert main([*argv, "--collateral", str(directory)]) == 1
    assert "(tcb_status)" in capsys.readouterr().err
    # --allow-status before the positional must not eat it.
    argv = ["attest", "verify", "--allow-status", "OutOfDate", *argv[2:]]
    assert main([*argv, "--collateral", str(directory / "collateral.json")]) == 0
    document = json.loads(capsys.readouterr().out)["result"]
    assert document["evidence"] == "dcap" and document["tcb_status"] == "OutOfDate"
    assert document["report_data_checked"] is True
    # Without collateral the platform is unknown: rejected, not an error.
    assert main(argv) == 1
    assert "(no_collateral)" in capsys.readouterr().err


# --- fetch-collateral: argument handling and the error path (no network in tests) ---


def test_fetch_collateral_arguments(main: Main, tmp_path: Path) -> None:
    out = str(tmp_path / "bundle.json")
    for argv in (
        ["--pccs", "https://pccs.invalid", "--out", out],  # neither --quote nor --fmspc
        ["--pccs", "https://pccs.invalid", "--quote", str(QUOTE), "--fmspc", "00A067110000",
         "--out", out],
        ["--pccs", "https://pccs.invalid", "--fmspc", "00A06711", "--out", out],
        ["--pccs", "https://pccs.invalid", "--fmspc", "00A067110000"],  # no --out
    ):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            main(["attest", "fetch-collateral", *argv])
        assert exc.value.code == 2


def test_fetch_collateral_error_path(
    main: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle.json"
    # Not an http(s) URL: refused before any request is made.
    argv = ["attest", "fetch-collateral", "--pccs", "file:///etc", "--fmspc", "00A067110000"]
    assert main([*argv, "--out", str(out)]) == 2
    assert "cannot fetch collateral" in capsys.readouterr().err
    # A port on loopback where nothing listens: the request fails, one line, exit 2.
    argv = ["attest", "fetch-collateral", "--pccs", "http://127.0.0.1:9", "--quote", str(QUOTE)]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seng-fw: cannot fetch collateral") and err.count("\n") == 1
    assert not out.exists()


class _FakePcs(http.server.BaseHTTPRequestHandler):
    """Intel PCS v4 on loopback, answering from the genuine collateral's pieces."""

    fields: dict[str, str] = json.loads(COLLATERAL.read_text())

    def do_GET(self) -> None:
        f = self.fields
        routes: dict[str, tuple[bytes, dict[str, str]]] = {
            "/sgx/certification/v4/tcb?fmspc=00A067110000": (
                f'{{"tcbInfo":{f["tcb_info"]},"signature":"{f["tcb_info_signature"]}"}}'.encode(),
                {"TCB-Info-Issuer-Chain": urllib.parse.quote(f["tcb_info_issuer_chain"])},
            ),
            "/sgx/certification/v4/qe/identity": (
                f'{{"enclaveIdentity":{f["qe_identity"]},'
                f'"signature":"{f["qe_identity_signature"]}"}}'.encode(),
                {
                    "SGX-Enclave-Identity-Issuer-Chain": urllib.parse.quote(
                        f["qe_identity_issuer_chain"]
                    )
                },
            ),
            "/sgx/certification/v4/pckcrl?ca=processor&encoding=der": (
                bytes.fromhex(f["pck_crl"]),
                {"SGX-PCK-CRL-Issuer-Chain": urllib.parse.quote(f["pck_crl_issuer_chain"])},
            ),
            "/sgx/certification/v4/rootcacrl": (f["root_ca_crl"].encode(), {}),
        }
        if self.path not in routes:
            self.send_error(404)
            return
        body, headers = routes[self.path]
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_fetch_collateral_by_fmspc_from_a_loopback_pcs(
    main: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakePcs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        out = tmp_path / "bundle.json"
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        argv = ["attest", "fetch-collateral", "--pccs", url, "--fmspc", "00a067110000"]
        assert main([*argv, "--out", str(out)]) == 0
        assert "FMSPC 00A067110000" in capsys.readouterr().err
        # The signed texts are cut out byte for byte: the bundle is the genuine one.
        assert json.loads(out.read_text()) == _FakePcs.fields
        argv = ["attest", "verify-quote", str(QUOTE), "--collateral", str(out), "--root", str(ROOT)]
        assert main([*argv, "--allow-status", STATUS, "--at", INSIDE]) == 0
        # A PCK CA the PCS does not know: HTTP 404, exit 2.
        argv = ["attest", "fetch-collateral", "--pccs", url, "--fmspc", "00A067110000"]
        assert main([*argv, "--ca", "platform", "--out", str(tmp_path / "x.json")]) == 2
        assert "HTTP 404" in capsys.readouterr().err
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_collateral_for_a_quote_drops_the_per_platform_chain(
    main: Main, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # dcap-qvl's get_collateral stands in (no network): it attaches the quote's PCK chain,
    # which must not end up in a per-FMSPC bundle.
    fields = json.loads(COLLATERAL.read_text())
    seen: list[tuple[str, bytes]] = []

    async def fake_get_collateral(url: str, quote: bytes) -> dcap_qvl.QuoteCollateralV3:
        seen.append((url, quote))
        with_chain = {**fields, "pck_certificate_chain": fields["pck_crl_issuer_chain"]}
        return dcap_qvl.QuoteCollateralV3.from_json(json.dumps(with_chain))

    monkeypatch.setattr(dcap_qvl, "get_collateral", fake_get_collateral)
    out = tmp_path / "bundle.json"
    argv = ["attest", "fetch-collateral", "--pccs", "https://pccs.example/", "--quote", str(QUOTE)]
    assert main([*argv, "--out", str(out)]) == 0
    assert seen == [("https://pccs.example", QUOTE.read_bytes())]
    written = json.loads(out.read_text())
    assert "pck_certificate_chain" not in written
    assert {k: written[k] for k in fields} == fields
