"""Run TRL's own GRPO trainer tests against stock TRL and against the grpo-fix swap, and compare.

    python benchmarks/trl_suite/run.py --trl-git https://github.com/huggingface/trl

(``--trl-git`` also takes a local clone.) Steps, each skippable:

1. fetch: TRL's ``tests/test_grpo_trainer.py`` with its helpers and the zen dataset generators at ``--commit``
   into ``benchmarks/trl_suite/upstream/`` (git-ignored; nothing of TRL's is committed);
2. run: pytest on it twice, ``--trainer stock`` then ``--trainer swap`` (see ``conftest.py``: offline, tiny
   local models under the Hub ids), under ``nice -n 10`` with one thread, JUnit XML and logs in ``work/runs/``;
3. report: a per-test table (stock outcome, swapped outcome, the root cause of every difference from
   ``differences.py``) to ``benchmarks/results/trl_suite.{json,md}`` with the machine named.

``-k`` runs and compares a selection (the table says so); ``--maxfail`` passes through to pytest; ``--out``
keeps a partial table away from the committed one. CPU only: about 15 minutes per side with ``--workers 2`` on
2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import fetch  # noqa: E402
import report  # noqa: E402

TEST_FILE = "upstream/trl_tests/test_grpo_trainer.py"


def run_pytest(mode: str, runs: Path, extra: list[str]) -> tuple[Path, float]:
    """One pytest run of the fetched test file with ``--trainer mode``; returns its JUnit XML and seconds."""
    xml, log = runs / f"{mode}.xml", runs / f"{mode}.log"
    cmd = ["nice", "-n", "10", sys.executable, "-m", "pytest", TEST_FILE, f"--trainer={mode}", "-q"]
    cmd += [f"--junitxml={xml}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    print(f"[trl_suite] {mode}: {' '.join(cmd[3:])} (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        subprocess.run(cmd, cwd=HERE, env=env, stdout=fh, stderr=subprocess.STDOUT)
    return xml, time.perf_counter() - start


def metadata(command: str, seconds: dict[str, float]) -> dict[str, object]:
    import importlib.metadata as md

    from grpo_fix.lab.experiments.report import machine

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "grpo_fix", "kernels", "integration"],
        capture_output=True,
        text=True,
    )
    versions = ", ".join(f"{p} {md.version(p)}" for p in ("trl", "transformers", "torch", "accelerate", "peft"))
    return {
        "machine": machine(),
        "trl_source": json.loads((HERE / "upstream" / "SOURCE.json").read_text()),
        "versions": versions,
        "grpo_fix": f"commit {head.stdout.strip()}" + (" + uncommitted changes" if dirty.stdout.strip() else ""),
        "command": command,
        "run_seconds": {k: round(v) for k, v in seconds.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trl-git", default=fetch.TRL_URL, help="TRL git repository: URL or local clone (bare is fine)")
    ap.add_argument("--commit", default=fetch.DEFAULT_COMMIT, help="TRL commit to take the tests from")
    ap.add_argument("--skip-fetch", action="store_true", help="reuse upstream/ as fetched before")
    ap.add_argument("--only", choices=("stock", "swap"), help="run one side (the other's last XML is reused)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the table from the last two runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trl_suite"), help="output path stem")
    ap.add_argument(
        "-k", dest="keyword", help="pytest -k expression: run and compare a selection (--only swap: vs the stock XML)"
    )
    ap.add_argument("--maxfail", type=int, help="pytest --maxfail (development)")
    ap.add_argument("--workers", type=int, default=1, help="pytest-xdist worker processes (the trl-suite extra)")
    args = ap.parse_args(argv)
    runs = HERE / "work" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    if not (args.skip_fetch or args.report_only):
        print(f"[trl_suite] fetched {fetch.fetch(args.trl_git, args.commit, HERE / 'upstream', HERE / 'work')}")
    extra = (["-k", args.keyword] if args.keyword else []) + ([f"--maxfail={args.maxfail}"] if args.maxfail else [])
    extra += ["-n", str(args.workers)] if args.workers > 1 else []
    seconds_file = runs / "seconds.json"
    seconds = json.loads(seconds_file.read_text()) if seconds_file.exists() else {}
    if not args.report_only:
        for mode in [args.only] if args.only else ["stock", "swap"]:
            _, seconds[mode] = run_pytest(mode, runs, extra)
        seconds_file.write_text(json.dumps(seconds))
    stock, swap = report.outcomes(runs / "stock.xml"), report.outcomes(runs / "swap.xml")
    if args.keyword:  # a selection: compare the selected tests only (the other side's XML may hold more)
        stock = {t: r for t, r in stock.items() if t in swap}
    rows = report.compare(stock, swap)
    command = "python benchmarks/trl_suite/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    paths = report.write(rows, metadata(command.strip(), seconds), Path(args.out))
    print(json.dumps(report.summary(rows), indent=1))
    print(f"[trl_suite] wrote {', '.join(map(str, paths.values()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
