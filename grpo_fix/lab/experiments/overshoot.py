"""Experiment 3 (paper Prop. 3 / Prop. 7, Eqs. 29-37): how far the policy drifts past the clip region
as the number of optimizer steps per rollout batch (mu) grows, each arm at its own learning rate.

Protocol: the toy task of :mod:`.loop` (preset ``uniform``, whole-batch windows, 25 rollouts), mu
in {1, 2, 4, 8}, each arm at the lr given on the command line or at its validated lr of the fair
protocol (``--from-fair fair_toy.json``: AdamW, ClipAwareAdamW's defaults and the selected
candidate).  Comparing optimizers at one nominal lr is not fair: ClipAwareAdamW's controller
takes a fraction alpha of the step, so an equal lr is a smaller effective step.  Reported per
(mu, arm), mean and sample SD over the seeds: the overshoot fraction and the max ``|log s|``
excess measured before every inner step after the first, the same two re-scored read-only at
batch end (after the last step, the policy the next rollout samples from), the share of tokens
outside the clip range at batch end, the mean step multiplier, the reward; per mu the ratio of
AdamW's batch-end overshoot to each arm's with a paired 95 % bootstrap interval; and AdamW's
overshoot per inner step k next to Prop. 3's residual step factor ``(beta1/sqrt(beta2))^(k+1)``.
At mu = 1 every step is on-policy, so the per-step overshoot is 0 by construction; the batch-end
re-score still measures how far one step moved.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from .. import arith, toy
from .baselines import OPTIMIZERS
from .grid import run_all
from .loop import RunConfig
from .protocol import BASELINE, DEFAULT
from .report import markdown_table, write_results
from .stats import mean_ratio, paired_bootstrap, sample_sd

REPORTED = (
    "overshoot_step",
    "overshoot_end",
    "max_excess_step",
    "max_excess_end",
    "outside_end",
    "alpha_mean",
    "reward_mean",
    "reward_final",
)


def arms_from_fair(path: Path) -> dict[str, float]:
    """``{arm: validated lr}`` of AdamW, the defaults and the selected candidate in a fair-protocol JSON."""
    rep = json.loads(path.read_text())
    curves, selected = rep["validation"]["curves"], rep["validation"]["selected"]
    return {a: float(curves[a]["best_lr"]) for a in dict.fromkeys([BASELINE, DEFAULT, selected or DEFAULT])}


def parse_arms(items: list[str]) -> dict[str, float]:
    """``["adamw=0.01", ...]`` -> ``{"adamw": 0.01, ...}`` (``ValueError`` naming a bad item)."""
    out = {}
    for item in items:
        name, _, lr = item.partition("=")
        if name not in OPTIMIZERS or not lr:
            raise ValueError(f"--arms takes optimizer=lr with optimizer in {OPTIMIZERS}, got {item!r}")
        out[name] = float(lr)
    return out


def summarise(
    records: list[dict[str, Any]], arms: dict[str, float], mus: list[int], seeds: list[int]
) -> list[dict[str, Any]]:
    """One row per (mu, arm): mean and sample SD of :data:`REPORTED`, the AdamW / arm ratio of the
    batch-end overshoot with its paired interval, and (AdamW) the overshoot per inner step."""
    by = {(r["config"]["optimizer"], r["config"]["inner_steps"], r["config"]["seed"]): r for r in records}
    rows = []
    for mu in mus:
        for arm in arms:
            recs = [by[(arm, mu, s)] for s in seeds if (arm, mu, s) in by]
            row: dict[str, Any] = {"mu": mu, "arm": arm, "lr": arms[arm], "seeds": len(recs)}
            for k in REPORTED:
                vals = [r["summary"][k] for r in recs]
                row[k], row[f"{k}_sd"] = float(np.mean(vals)), sample_sd(vals)
            base = [by.get((BASELINE, mu, s)) for s in seeds]
            pairs = [(b["summary"]["overshoot_end"], r["summary"]["overshoot_end"]) for b, r in zip(base, recs) if b]
            if arm != BASELINE and pairs and BASELINE in arms:
                est, lo, hi = paired_bootstrap([p[0] for p in pairs], [p[1] for p in pairs], mean_ratio)
                row.update(end_reduction=est, end_reduction_lo=lo, end_reduction_hi=hi)
            row["overshoot_by_inner"] = np.mean([r["overshoot_by_inner"] for r in recs], 0).tolist() if recs else []
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(prog="grpo-fix experiment overshoot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mus", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--arms", nargs="+", help="optimizer=lr pairs, e.g. adamw=0.01 clip_aware=0.02")
    ap.add_argument("--from-fair", default="benchmarks/results/fair_toy.json", help="take the arms and lrs from here")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(2000, 2008)))
    ap.add_argument("--rollouts", type=int, default=25)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--runs", help="JSON-lines file of finished runs (resumable)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="overshoot", help="basename of the result files")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    toy.offline_environment()
    arms = parse_arms(args.arms) if args.arms else arms_from_fair(Path(args.from_fair))
    configs = [
        RunConfig(optimizer=a, lr=lr, inner_steps=mu, rollouts=args.rollouts, seed=s)
        for mu in args.mus
        for a, lr in arms.items()
        for s in args.seeds
    ]
    runs = Path(args.runs or arith.cache_dir() / "runs" / f"{args.name}.jsonl")
    records = run_all(configs, runs, jobs=args.jobs, progress=None if args.quiet else print)
    rows = summarise(records, arms, args.mus, args.seeds)
    cols = ["mu", "arm", "lr", "seeds"] + [c for k in REPORTED for c in (k, f"{k}_sd")]
    table = markdown_table(rows, cols, floatfmt=".3g")
    table += "\n\n### Batch-end overshoot, AdamW / arm (paired 95 % bootstrap; > 1: the arm overshoots less)\n\n"
    table += markdown_table(
        [r for r in rows if "end_reduction" in r],
        ["mu", "arm", "end_reduction", "end_reduction_lo", "end_reduction_hi"],
        floatfmt=".3g",
    )
    adam = next((r for r in rows if r["arm"] == BASELINE and r["mu"] == max(args.mus)), None)
    if adam is not None:
        c = 0.9 / 0.95**0.5
        steps = [
            {"inner_step": k, "adamw_overshoot": v, "prop3_residual_factor": c ** (k + 1)}
            for k, v in enumerate(adam["overshoot_by_inner"])
            if k > 0
        ]
        table += (
            f"\n\n### AdamW overshoot before inner step k (mu = {max(args.mus)}) "
            "and Prop. 3's (beta1/sqrt(beta2))^(k+1)\n\n"
        )
        table += markdown_table(steps, ["inner_step", "adamw_overshoot", "prop3_residual_factor"], floatfmt=".3g")

    def plot(fig: Any) -> None:
        axes = [fig.add_subplot(1, 3, j + 1) for j in range(3)]
        for arm in arms:
            rs = [r for r in rows if r["arm"] == arm]
            for ax, key in zip(axes, ("overshoot_step", "overshoot_end", "reward_mean")):
                ax.errorbar(
                    [r["mu"] for r in rs],
                    [r[key] for r in rs],
                    yerr=[r[f"{key}_sd"] for r in rs],
                    fmt="o-",
                    capsize=3,
                    label=f"{arm} (lr {arms[arm]:g})",
                )
        for ax, label in zip(
            axes, ("overshoot before inner steps", "overshoot at batch end", "mean reward over the run")
        ):
            ax.set(xscale="log", xlabel="mu (steps per rollout batch)", ylabel=label)
            ax.set_xticks(args.mus, [str(m) for m in args.mus])
            ax.minorticks_off()
        axes[0].legend(fontsize=7)

    write_results(
        args.out,
        args.name,
        title="Momentum overshoot past the clip region vs mu (paper Prop. 3), each arm at its own lr",
        table=table,
        payload={"args": {**vars(args), "arms": arms}, "rows": rows},
        plot=plot,
        notes=f"Seeds {args.seeds}; mean and sample SD over seeds.",
    )
    if not args.quiet:
        print(table)
    return rows


if __name__ == "__main__":
    main()
