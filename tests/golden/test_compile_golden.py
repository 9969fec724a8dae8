"""Golden files: the compiled rulesets of the example policies, the nft/ skeleton, and the
policies imported from the SENG demo databases.

After an intended change, regenerate with `UPDATE_GOLDEN=1 pytest tests/golden` and
review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from seng_fw.compile.compiler import compile_policy
from seng_fw.policy.importdb import import_db
from seng_fw.policy.loader import load_policy
from seng_fw.policy.models import Policy
from tests.golden.seng_demo_db import netfilter_demo, plain_demo

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def check_golden(path: Path, actual: str) -> None:
    if UPDATE:
        path.write_text(actual)
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1"
    assert actual == path.read_text(), f"{path.name} differs (UPDATE_GOLDEN=1 to accept)"


@pytest.mark.parametrize("name", ["example", "split-example"])
def test_compiled_examples(name: str) -> None:
    source = ROOT / "policies" / (f"{name}.yaml" if name == "example" else name)
    table = compile_policy(load_policy(source))
    check_golden(HERE / f"{name}.nft", table.text(header=(f"policies/{source.name}",)))
    check_golden(HERE / f"{name}.json", json.dumps(table.transaction(), indent=1) + "\n")


def _code(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_nft_skeleton_is_what_the_compiler_emits() -> None:
    skeleton = ROOT / "nft/seng.nft"
    compiled = compile_policy(Policy()).text()
    if UPDATE:
        lines = skeleton.read_text().splitlines()
        header = lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]
        skeleton.write_text("\n".join(header) + "\n" + compiled)
    assert _code(skeleton.read_text()) == _code(compiled)


@pytest.mark.parametrize(("name", "build"), [("plain", plain_demo), ("netfilter", netfilter_demo)])
def test_imported_demo_databases(tmp_path: Path, name: str, build: object) -> None:
    assert callable(build)
    database = build(tmp_path / "seng.db")
    check_golden(HERE / f"seng_demo_{name}.yaml", import_db(database))
