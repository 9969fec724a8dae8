"""Coverage-guided fuzzing of the parsers with atheris (libFuzzer for Python).

    python -m tests.fuzz.run TARGET [libFuzzer flags] [CORPUS_DIR ...]
        one target in this process, e.g. `-runs=1000000 /tmp/corpus-ipv4`; the seed corpus
        tests/fuzz/TARGET/ is always read (new inputs go to the first CORPUS_DIR given,
        never into the committed seeds)
    python -m tests.fuzz.run --all [--runs N] [--max-time SECONDS] [--jobs J] [--out DIR]
        every target (or those named with --target, repeatable), each in a child process;
        prints inputs tried and crashes per target; exit 1 if any target crashed

A crash (an exception other than the target's documented error) makes libFuzzer stop and
write the input to `crash-<sha1>` in the target's directory under --out (default
./fuzz-out/TARGET/; new inputs the campaign found go to ./fuzz-out/TARGET/corpus/). Turn
it into a regression test: copy it into tests/fuzz/TARGET/ as crash-NAME (the replay in
test_fuzz_ci.py then fails until it is fixed), add a unit test, fix the parser.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from tests.fuzz.targets import Target

# Modules whose Python code atheris instruments for coverage feedback.
INSTRUMENT = ["seng_fw", "yaml", "tests.fuzz.targets", "json", "ipaddress", "cbor2"]
_DONE = re.compile(rb"Done (\d+) runs in (\d+) second")
_PROGRESS = re.compile(rb"^#(\d+)\s", re.MULTILINE)


@dataclass
class Outcome:
    target: str
    inputs: int
    seconds: float
    crashed: bool
    returncode: int
    log: str


def _instrumented_targets() -> dict[str, Any]:
    import atheris

    with atheris.instrument_imports(include=INSTRUMENT):
        from tests.fuzz.targets import TARGETS
    return TARGETS


def fuzz_one(target: Target, argv: list[str]) -> NoReturn:
    """Fuzz one target in this process (atheris.Fuzz never returns)."""
    import atheris

    from tests.fuzz.targets import check

    flags = [a for a in argv if a.startswith("-")]
    dirs = [a for a in argv if not a.startswith("-")]
    if not dirs:
        dirs = [tempfile.mkdtemp(prefix=f"seng-fuzz-{target.name}-")]
    dirs.append(str(target.corpus))

    def one_input(data: bytes) -> None:
        check(target, data)

    atheris.Setup([sys.argv[0], *flags, *dirs], one_input)
    atheris.Fuzz()
    os._exit(0)  # pragma: no cover - libFuzzer exits itself


def _start(target: Target, runs: int, max_time: int, out: Path) -> tuple[int, Path, float]:
    """Fork a child that fuzzes `target` (the parent imported and instrumented everything
    once: a child starts in milliseconds). Returns pid, log file, start time."""
    artifacts = out / target.name
    artifacts.mkdir(parents=True, exist_ok=True)
    log = out / f"{target.name}.log"
    corpus = artifacts / "corpus"  # what the campaign found; the seeds stay as they are
    corpus.mkdir(exist_ok=True)
    argv = [
        f"-runs={runs}", f"-max_total_time={max_time}", "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/", "-rss_limit_mb=2048", "-timeout=30", str(corpus),
    ]  # fmt: skip
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            fuzz_one(target, argv)
        except SystemExit:
            # How atheris ends after a crash: its exit handler then writes the crash
            # input (crash-<sha1>), so the child must exit the ordinary way.
            raise
        except BaseException:
            traceback.print_exc()
        os._exit(70)
    return pid, log, time.monotonic()


def _outcome(name: str, status: int, log: Path, seconds: float) -> Outcome:
    text = log.read_bytes()
    done = _DONE.search(text)
    progress = _PROGRESS.findall(text)
    inputs = int(done.group(1)) if done else (int(progress[-1]) if progress else 0)
    code = os.waitstatus_to_exitcode(status)
    crashed = code != 0 or b"Uncaught Python exception" in text
    return Outcome(name, inputs, seconds, crashed, code, text.decode(errors="replace"))


def run_all(names: list[str], runs: int, max_time: int, jobs: int, out: Path) -> list[Outcome]:
    """Fuzz each target in its own child, `jobs` at a time."""
    targets = _instrumented_targets()
    out.mkdir(parents=True, exist_ok=True)
    pending = list(names)
    running: dict[int, tuple[str, Path, float]] = {}
    outcomes: dict[str, Outcome] = {}
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            pid, log, started = _start(targets[name], runs, max_time, out)
            running[pid] = (name, log, started)
        pid, status = os.wait()
        if pid in running:
            name, log, started = running.pop(pid)
            outcomes[name] = _outcome(name, status, log, time.monotonic() - started)
    return [outcomes[name] for name in names]


def main() -> int:
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        fuzz_one(_instrumented_targets()[sys.argv[1]], sys.argv[2:])
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run --all")
    parser.add_argument("--all", action="store_true", required=True)
    parser.add_argument("--target", action="append", help="only these targets")
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs per target")
    parser.add_argument("--max-time", type=int, default=0, help="seconds per target (0: none)")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--out", type=Path, default=Path("fuzz-out"))
    parser.add_argument("--summary", type=Path, help="also write the outcomes as JSON here")
    args = parser.parse_args()
    names = args.target or list(_instrumented_targets())
    outcomes = run_all(names, args.runs, args.max_time, args.jobs, args.out)
    if args.summary:
        rows = [{k: v for k, v in vars(o).items() if k != "log"} for o in outcomes]
        args.summary.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{'target':<18} {'inputs':>10} {'seconds':>8}  result")
    for o in outcomes:
        result = f"CRASH (exit {o.returncode}, see {args.out / o.target})" if o.crashed else "ok"
        print(f"{o.target:<18} {o.inputs:>10} {o.seconds:>8.1f}  {result}")
    for o in outcomes:
        if o.crashed:
            print(f"\n--- {o.target} ---\n{o.log[-4000:]}", file=sys.stderr)
    return 1 if any(o.crashed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
