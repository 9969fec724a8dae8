"""The fuzz targets in CI: every seed and past crash input replayed, then a short
coverage-guided campaign per target (atheris). The release run is longer (README,
"Fuzzing"): `python -m tests.fuzz.run --all --runs 1000000`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS, Target, check, corpus_files

REPO = Path(__file__).parent.parent.parent
# A few thousand inputs per target; the slow ones (the YAML loaders, a few hundred inputs
# a second) stop at the time cap. SENG_FUZZ_RUNS / SENG_FUZZ_SECONDS override both.
CI_RUNS = int(os.environ.get("SENG_FUZZ_RUNS", "3000"))
CI_SECONDS = int(os.environ.get("SENG_FUZZ_SECONDS", "6"))


@pytest.mark.parametrize("target", TARGETS.values(), ids=list(TARGETS))
def test_corpus_replays(target: Target) -> None:
    """Every seed and every input that once crashed this target now passes."""
    files = corpus_files(target)
    assert any(f.name.startswith("seed-") for f in files), f"no seeds in {target.corpus}"
    for file in files:
        try:
            check(target, file.read_bytes())
        except Exception as exc:
            raise AssertionError(f"{file.relative_to(REPO)}: {type(exc).__name__}: {exc}") from exc


def test_seeds_reach_the_parsers_success_path() -> None:
    """Seeds that all fail at the first check would teach the fuzzer little: at least one
    seed of each target is accepted."""
    for target in TARGETS.values():
        accepted = 0
        for file in corpus_files(target):
            try:
                target.run(file.read_bytes())
                accepted += 1
            except target.errors:
                pass
        assert accepted, f"{target.name}: no seed is accepted"


def test_short_campaign(tmp_path: Path) -> None:
    """Each target for a few thousand coverage-guided inputs; no crash."""
    pytest.importorskip("atheris")
    summary = tmp_path / "summary.json"
    result = subprocess.run(
        [
            sys.executable, "-m", "tests.fuzz.run", "--all", f"--runs={CI_RUNS}",
            f"--max-time={CI_SECONDS}", "--jobs=2", f"--out={tmp_path / 'out'}",
            f"--summary={summary}",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    table = result.stdout
    print(table)  # inputs per target, in the test log (pytest -s / -rA)
    assert result.returncode == 0, f"{table}\n{result.stderr[-6000:]}"
    rows = json.loads(summary.read_text())
    assert {row["target"] for row in rows} == set(TARGETS)
    for row in rows:
        assert row["inputs"] >= 200, row  # the target ran, not just started
