"""The ``grpo-fix`` command: ``demo``, ``experiment <name>``, ``bench``; ``--help`` on each.

Each subcommand hands its remaining arguments to the module that implements it (the demo, one experiment,
the benchmark scripts), so ``grpo-fix demo --help`` and ``grpo-fix experiment overshoot --help`` print that
module's own options.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

__version__ = importlib.metadata.version("grpo-fix")  # of the installed distribution (wheel, sdist or -e)

EXPERIMENTS = {
    "prefix-bias": ("grpo_fix.lab.experiments.prefix_bias", "net gradient on prefixes shared by a group (Prop. 1)"),
    "reward-scale": ("grpo_fix.lab.experiments.reward_scale", "AdamW makes training reward-scale blind (Prop. 2)"),
    "overshoot": ("grpo_fix.lab.experiments.overshoot", "momentum carries ratios past the clip region (Prop. 3)"),
    "fair-optimizer": ("grpo_fix.lab.experiments.fair", "AdamW vs ClipAwareAdamW, each at its validated lr"),
    "length-bias": ("grpo_fix.lab.experiments.length_bias", "grpo vs dapo vs uniform in training (Prop. 1)"),
}
BENCHMARKS = ("bench_kernels.py", "bench_optimizer.py", "bench_train_step.py")
SOURCE_HELP = (
    "The benchmark scripts are not part of the wheel: they live in benchmarks/ of the source distribution.\n"
    "Install that instead (editable, so the scripts import the package they sit next to):\n"
    f'  pip download --no-deps --no-binary :all: "grpo-fix=={__version__}" && tar xzf grpo_fix-{__version__}.tar.gz\n'
    f'  pip install -e "./grpo_fix-{__version__}[bench,trl,triton]"\n'
    "then run `grpo-fix bench` (or `python benchmarks/<script>.py` in that folder)."
)


def benchmarks_dir(source: str | None) -> Path | None:
    """The ``benchmarks/`` folder of ``source``, of the source tree this package runs from, or of the cwd."""
    candidates = [Path(source)] if source else [Path(__file__).resolve().parents[1], Path.cwd()]
    for root in candidates:
        if all((root / "benchmarks" / script).is_file() for script in BENCHMARKS):
            return root / "benchmarks"
    return None


def bench(source: str | None, script_args: list[str]) -> int:
    """Run every benchmark script in turn (GPU only); say what is missing otherwise."""
    import torch

    root = benchmarks_dir(source)
    if source and root is None:
        print(f"grpo-fix bench: no benchmarks/{{{','.join(BENCHMARKS)}}} under {source}. {SOURCE_HELP}")
        return 2
    if not torch.cuda.is_available():
        print(
            "grpo-fix bench: no CUDA device found. The kernel, optimizer and training-step benchmarks measure GPU "
            "time and memory; run them on a machine with an NVIDIA GPU. Without one, "
            "`python benchmarks/kernel_static_report.py` shows what the Triton kernels compile to for sm_90."
            + ("" if root else " " + SOURCE_HELP)
        )
        return 0
    if root is None:
        print(f"grpo-fix bench: {SOURCE_HELP}")
        return 2
    rc = 0
    for script in BENCHMARKS:
        print(f"== {script}", flush=True)
        rc |= subprocess.call([sys.executable, str(root / script), *script_args])
    return rc


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="grpo-fix",
        description="Fixes for the hidden objective biases of GRPO (arXiv 2601.05002): demo, experiments, benchmarks.",
    )
    ap.add_argument("--version", action="version", version=f"grpo-fix {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{demo,experiment,bench}")
    sub.add_parser(
        "demo",
        help="TRL's GRPOTrainer on a toy task: TRL's default vs grpo-fix, side by side (CPU, ~1 min)",
        description="Run `grpo-fix demo --help` for the demo's options.",
        add_help=False,
    )
    exp = sub.add_parser(
        "experiment",
        help="one of the paper's experiments on the toy task",
        description="Run one experiment; `grpo-fix experiment <name> --help` lists its options.",
        epilog="experiments:\n" + "\n".join(f"  {k:14} {v[1]}" for k, v in EXPERIMENTS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    exp.add_argument("name", choices=sorted(EXPERIMENTS), metavar="name", help=f"one of {', '.join(EXPERIMENTS)}")
    b = sub.add_parser(
        "bench",
        help="the GPU benchmarks (kernels, optimizer, training step)",
        description=(
            f"Runs {', '.join(BENCHMARKS)} from a source tree (needs a CUDA GPU); other arguments go to every "
            "script.\n\n" + SOURCE_HELP
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--source", help="source tree with benchmarks/ (default: the one grpo_fix runs from, else the cwd)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["experiment"] and len(argv) > 1 and argv[1] in EXPERIMENTS:
        importlib.import_module(EXPERIMENTS[argv[1]][0]).main(argv[2:])  # its own --help and options
        return 0
    args, rest = parser().parse_known_args(argv)
    if args.command == "demo":
        from .lab.demo import main as demo_main

        demo_main(rest)
        return 0
    if args.command == "bench":
        return bench(args.source, rest)
    parser().parse_args(argv)  # experiment with a name it does not know, or extra arguments: argparse's error
    return 2


if __name__ == "__main__":
    sys.exit(main())
