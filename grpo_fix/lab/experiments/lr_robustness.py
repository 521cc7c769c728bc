"""Experiment 4 (paper Prop. 3 at aggressive step sizes): how often runs collapse, per learning rate.

The overshoot experiment (:mod:`.overshoot`) shows ClipAwareAdamW keeping the ratios near the clip
region, but on the toy task AdamW's overshoot costs no reward at moderate learning rates: the
task saturates.  Overshoot should matter where each step is large, so this experiment sweeps the
learning rate at a fixed number of optimizer steps per rollout batch (``mu``, default 4) and
counts **collapsed runs**: runs whose final reward (mean of the last 3 rollouts) is below 0.5,
on a task where a random policy scores 0.026 and every run that learns ends above 0.9.  A
collapse is the policy drifting so far past the clip region within one rollout batch that it
stops producing the target (``max_excess`` of 15-35 in log-ratio, i.e. ratios beyond e^15).

Per (learning rate, optimizer): runs, collapses, the collapse rate with its 95 % Wilson interval,
mean and sd of the final reward, the median of the per-run ``max_excess``.  Per learning rate:
the one-sided Fisher exact p-value that ClipAwareAdamW collapses less often than AdamW.  Same
protocol as :mod:`.overshoot` (preset ``uniform``, whole-batch windows, 25 rollouts); seeds
0..N-1 are shared by the optimizers, so each seed is one paired comparison.
"""

from __future__ import annotations

import argparse
import math
import statistics

from .baselines import OPTIMIZERS
from .loop import RunConfig, train
from .report import markdown_table, write_results

COLLAPSE_BELOW = 0.5


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def fisher_one_sided(k_a: int, n_a: int, k_b: int, n_b: int) -> float:
    """P(X >= k_a) for X ~ Hypergeometric: the one-sided Fisher exact p-value that group a has
    the higher event rate (k events of n runs in each group)."""
    total, events = n_a + n_b, k_a + k_b
    denom = math.comb(total, events)
    return sum(math.comb(n_a, x) * math.comb(n_b, events - x) for x in range(k_a, min(n_a, events) + 1)) / denom


def run(lrs, optimizers, seeds, mu: int, rollouts: int, progress=None) -> tuple[list[dict], list[dict]]:
    """(rows per (lr, optimizer), per-run records)."""
    rows, runs = [], []
    for lr in lrs:
        for name in optimizers:
            finals, excess = [], []
            for seed in seeds:
                s = train(
                    RunConfig(preset="uniform", optimizer=name, inner_steps=mu, rollouts=rollouts, lr=lr, seed=seed)
                ).summary()
                finals.append(s["reward_final"])
                excess.append(s["max_excess"])
                runs.append(
                    {
                        "lr": lr,
                        "optimizer": name,
                        "seed": seed,
                        "reward_final": s["reward_final"],
                        "max_excess": s["max_excess"],
                        "overshoot_fraction": s["overshoot_fraction"],
                    }
                )
                if progress:
                    progress(
                        f"lr={lr:g} {name} seed={seed}: reward {s['reward_final']:.3f}, "
                        f"max excess {s['max_excess']:.2f}"
                    )
            collapses = sum(f < COLLAPSE_BELOW for f in finals)
            low, high = wilson_interval(collapses, len(finals))
            rows.append(
                {
                    "lr": lr,
                    "optimizer": name,
                    "runs": len(finals),
                    "collapses": collapses,
                    "collapse_rate": collapses / len(finals),
                    "rate_ci95_low": low,
                    "rate_ci95_high": high,
                    "reward_final": statistics.mean(finals),
                    "reward_final_sd": statistics.pstdev(finals),
                    "median_max_excess": statistics.median(excess),
                }
            )
    return rows, runs


def comparisons(rows: list[dict], against: str = "adamw") -> list[dict]:
    """Per learning rate and optimizer other than ``against``: the one-sided Fisher p-value that
    ``against`` collapses more often."""
    out = []
    for r in rows:
        base = next((b for b in rows if b["lr"] == r["lr"] and b["optimizer"] == against), None)
        if base is None or r["optimizer"] == against:
            continue
        out.append(
            {
                "lr": r["lr"],
                "optimizer": r["optimizer"],
                "collapses": f"{r['collapses']}/{r['runs']} vs {base['collapses']}/{base['runs']}",
                "fisher_p_one_sided": fisher_one_sided(base["collapses"], base["runs"], r["collapses"], r["runs"]),
            }
        )
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="grpo-fix experiment lr-robustness", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.2])
    ap.add_argument("--optimizers", nargs="+", default=["adamw", "clip_aware"], choices=OPTIMIZERS)
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--mu", type=int, default=4)
    ap.add_argument("--rollouts", type=int, default=25)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="lr_robustness", help="basename of the result files")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    rows, runs = run(
        args.lrs,
        args.optimizers,
        list(range(args.seeds)),
        args.mu,
        args.rollouts,
        progress=None if args.quiet else print,
    )
    table = markdown_table(
        rows,
        [
            "lr",
            "optimizer",
            "runs",
            "collapses",
            "collapse_rate",
            "rate_ci95_low",
            "rate_ci95_high",
            "reward_final",
            "reward_final_sd",
            "median_max_excess",
        ],
        floatfmt=".3g",
    )
    tests = comparisons(rows)
    if tests:
        table += "\n\n### Does AdamW collapse more often? (one-sided Fisher exact test per learning rate)\n\n"
        table += markdown_table(tests, ["lr", "optimizer", "collapses", "fisher_p_one_sided"], floatfmt=".3g")

    def plot(fig):
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for name in args.optimizers:
            rs = [r for r in rows if r["optimizer"] == name]
            lrs = [r["lr"] for r in rs]
            rate = [r["collapse_rate"] for r in rs]
            err = [
                [r["collapse_rate"] - r["rate_ci95_low"] for r in rs],
                [r["rate_ci95_high"] - r["collapse_rate"] for r in rs],
            ]
            ax1.errorbar(lrs, rate, yerr=err, fmt="o-", capsize=3, label=name)
            ax2.plot(lrs, [r["reward_final"] for r in rs], "o-", label=name)
        ax1.set(xscale="log", xlabel="learning rate", ylabel=f"collapse rate (final reward < {COLLAPSE_BELOW})")
        ax2.set(xscale="log", xlabel="learning rate", ylabel="mean final reward")
        ax1.legend(fontsize=8)

    write_results(
        args.out,
        args.name,
        title=f"Collapsed runs vs learning rate at mu = {args.mu} (paper Prop. 3 at large steps)",
        table=table,
        payload={"args": vars(args), "rows": rows, "tests": tests, "runs": runs},
        plot=plot,
        notes=f"A run collapses when its final reward (mean of the last 3 of {args.rollouts} rollouts) is "
        f"below {COLLAPSE_BELOW}; seeds 0..{args.seeds - 1}, shared by the optimizers.",
    )
    print(table)
    return rows


if __name__ == "__main__":
    main()
