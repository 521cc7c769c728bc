"""The ``grpo-fix`` command: ``demo``, ``experiment {prefix-bias,reward-scale,overshoot,lr-robustness}``, ``bench``."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

EXPERIMENTS = {
    "prefix-bias": "grpo_fix.lab.experiments.prefix_bias",
    "reward-scale": "grpo_fix.lab.experiments.reward_scale",
    "overshoot": "grpo_fix.lab.experiments.overshoot",
    "lr-robustness": "grpo_fix.lab.experiments.lr_robustness",
}
BENCHMARKS = ("bench_kernels.py", "bench_optimizer.py", "bench_train_step.py")


def _bench(argv: list[str]) -> int:
    import torch

    if not torch.cuda.is_available():
        print(
            "grpo-fix bench: no CUDA device found. The kernel and optimizer benchmarks measure GPU time and "
            "memory; run them on a machine with an NVIDIA GPU (results go to benchmarks/results/). Without "
            "one, `python benchmarks/kernel_static_report.py` shows what the Triton kernels compile to for sm_90."
        )
        return 0
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    if not root.is_dir():
        print(f"grpo-fix bench: the benchmark scripts live in a source checkout (benchmarks/); not found at {root}")
        return 1
    rc = 0
    for script in BENCHMARKS:
        print(f"== {script}")
        rc |= subprocess.call([sys.executable, str(root / script), *argv])
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(
        prog="grpo-fix",
        description="Fixes for the hidden objective biases of GRPO (arXiv 2601.05002): demo, experiments, benchmarks.",
    )
    ap.add_argument("command", choices=("demo", "experiment", "bench"))
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv[:1])
    rest = argv[1:]
    if args.command == "demo":
        from .lab.demo import main as demo_main

        demo_main(rest)
        return 0
    if args.command == "bench":
        return _bench(rest)
    if not rest or rest[0] not in EXPERIMENTS:
        ap.error(f"experiment needs one of {sorted(EXPERIMENTS)}")
    import importlib

    importlib.import_module(EXPERIMENTS[rest[0]]).main(rest[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
