"""The transaction rendered once (`nft.Batch`): the same bytes as rendering the table
again, whatever `apply` changes after rendering, and never a stale ruleset."""

from __future__ import annotations

import json
from ipaddress import IPv4Address
from pathlib import Path

from seng_fw.compile import live
from seng_fw.compile.compiler import compile_policy
from seng_fw.compile.nft import Batch, Counter, Table
from seng_fw.policy.loader import load_policy

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "policies/example.yaml"


def _rendered(table: Table, added: list[Counter] | None = None) -> str:
    document = table.transaction()
    document["nftables"] += [{"add": c.json(table.name)} for c in added or []]
    return json.dumps(document, separators=(",", ":"))


def test_the_document_is_the_transaction() -> None:
    table = compile_policy(load_policy(EXAMPLE))
    assert Batch(table, "json").document() == _rendered(table)
    # the digest is the one of the rendered transaction, as before the Batch
    admission = "ab" * 32
    assert live.ruleset_digest(Batch(table), admission) == live.ruleset_digest(table, admission)
    # nft syntax: the same commands, in the same order
    commands = Batch(table).document().splitlines()
    assert commands[:3] == ["add table inet seng", "delete table inet seng", "add table inet seng"]
    assert len(commands) == len(table.transaction()["nftables"]) - 1  # no metainfo


def test_live_state_and_stamps_are_put_in() -> None:
    policy = load_policy(EXAMPLE)
    table = compile_policy(policy)
    batch, text = Batch(table, "json"), Batch(table)
    exposure = policy.app("sdk-nginx").expose[0]
    state = live.LiveState(
        exists=True,
        counters={"tx_sdk-nginx": (5, 700), "rx_batch-worker": (1, 60)},
        exposed={(int(exposure.address), 6, exposure.port): IPv4Address("172.16.28.3")},
    )
    live.carry_over(table, policy, state)
    stamps = [Counter("seng_fw_digest_" + "0" * 64), Counter("seng_fw_digest_policy_" + "1" * 64)]
    document = batch.document(table, ["expose_addr"], stamps)
    assert document == _rendered(table, stamps)
    assert '"packets":5,"bytes":700' in document and "172.16.28.3" in document
    lines = text.document(table, ["expose_addr"], stamps).splitlines()
    assert "add counter inet seng tx_sdk-nginx { packets 5 bytes 700 }" in lines
    assert lines[-1] == "add counter inet seng seng_fw_digest_policy_" + "1" * 64
    assert any("expose_addr" in line and "172.16.28.3" in line for line in lines)
    assert lines == Batch(table).document(added=stamps).splitlines()
    # and back: counters that had values when rendered and have none now
    with_values, text_with_values = Batch(table, "json"), Batch(table)
    live.carry_over(table, policy, live.LiveState(exists=True))
    assert with_values.document() != _rendered(table)
    assert with_values.document(table, ["expose_addr"]) == _rendered(table) == batch.document()
    assert text_with_values.document(table, ["expose_addr"]) == text.document()


def test_a_batch_is_of_its_own_table_only(tmp_path: Path) -> None:
    """No rendering is kept between tables: a changed policy gives a new ruleset."""
    first = compile_policy(load_policy(EXAMPLE))
    before = Batch(first, "json").document()
    changed = tmp_path / "changed.yaml"
    changed.write_text(EXAMPLE.read_text().replace("ports: [80, 443]", "ports: [80, 4443]", 1))
    second = compile_policy(load_policy(changed))
    after = Batch(second, "json").document()
    assert after != before and after == _rendered(second) and "4443" in after
    assert live.ruleset_digest(second) != live.ruleset_digest(first)
    assert "4443" in Batch(second).document() and "4443" not in Batch(first).document()
