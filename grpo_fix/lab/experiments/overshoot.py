"""Experiment 3 (paper Prop. 3 / Prop. 7, Eqs. 29-37): momentum carries ratios past the clip region.

Protocol: the toy GRPO task (:mod:`grpo_fix.experiments.loop`), ``mu`` optimizer steps per rollout
batch (each on the whole batch, exact window normaliser, preset ``uniform``), for mu in
{1, 2, 4, 8} and the optimizers of :mod:`grpo_fix.experiments.baselines`: AdamW, ClipAwareAdamW
(gate only; gate + controller, the default; backtrack) and prior art (Adam moments reset at each
rollout boundary; beta1 = 0; cautious masking), over several seeds.  Before every step after the
first of a batch we measure on the whole batch

- the overshoot fraction: tokens beyond the clip region in their advantage's direction
  (``A > 0, s > 1 + eps`` or ``A < 0, s < 1 - eps``: paper Eq. 28's R_clip), over tokens with A != 0,
- the max excess of ``|log s|`` past the boundary,

and after the fixed budget the mean reward of the last 3 rollouts.  ``max_excess`` is the largest
excess over the whole run, ``mean_max_excess`` the per-step maximum averaged over steps.  Wall
times are in the JSON only: they are not comparable when other jobs share the CPU.  At mu = 1 every step is
on-policy, so the overshoot is 0 by construction.  The table also lists, per inner step k, the
AdamW overshoot next to Prop. 3's residual step factor ``(beta1/sqrt(beta2))^(k+1)``.
"""

from __future__ import annotations

import argparse
import statistics

from .baselines import OPTIMIZERS
from .loop import RunConfig, train
from .report import markdown_table, write_results


def run(mus, optimizers, seeds, rollouts: int, lr: float, progress=None) -> list[dict]:
    rows = []
    for mu in mus:
        for name in optimizers:
            results = []
            for seed in seeds:
                res = train(
                    RunConfig(preset="uniform", optimizer=name, inner_steps=mu, rollouts=rollouts, lr=lr, seed=seed)
                )
                results.append(res)
                if progress:
                    progress(f"mu={mu} {name} seed={seed}: {res.summary()}")
            summaries = [r.summary() for r in results]
            per_step = {}
            for r in results:
                for s in r.steps:
                    per_step.setdefault(s["inner"], []).append(s["overshoot_fraction"])
            rows.append(
                {
                    "mu": mu,
                    "optimizer": name,
                    "overshoot_fraction": statistics.mean(s["overshoot_fraction"] for s in summaries),
                    "max_excess": statistics.mean(s["max_excess"] for s in summaries),
                    "mean_max_excess": statistics.mean(s["mean_max_excess"] for s in summaries),
                    "reward_start": statistics.mean(s["reward_start"] for s in summaries),
                    "reward_final": statistics.mean(s["reward_final"] for s in summaries),
                    "reward_final_sd": statistics.pstdev(s["reward_final"] for s in summaries),
                    "seconds": statistics.mean(s["seconds"] for s in summaries),
                    "overshoot_by_inner_step": {k: statistics.mean(v) for k, v in sorted(per_step.items())},
                    "reward_curve": [statistics.mean(c) for c in zip(*(r.rewards for r in results))],
                    "seeds": len(seeds),
                }
            )
    return rows


def ratios_vs_adamw(rows: list[dict], mu: int) -> list[dict]:
    """Reduction factors of each optimizer against AdamW at one mu (> 1 is better)."""
    base = next((r for r in rows if r["mu"] == mu and r["optimizer"] == "adamw"), None)
    if base is None:
        return []
    out = []
    for r in rows:
        if r["mu"] != mu:
            continue
        div = lambda a, b: a / b if b > 0 else float("inf")  # noqa: E731
        out.append(
            {
                "optimizer": r["optimizer"],
                "overshoot_reduction": div(base["overshoot_fraction"], r["overshoot_fraction"]),
                "max_excess_reduction": div(base["max_excess"], r["max_excess"]),
                "mean_max_excess_reduction": div(base["mean_max_excess"], r["mean_max_excess"]),
                "reward_final": r["reward_final"],
                "reward_final_sd": r["reward_final_sd"],
            }
        )
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="grpo-fix experiment overshoot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mus", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rollouts", type=int, default=25)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="overshoot", help="basename of the result files")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--from-json", help="re-render the table and plot of an earlier run's JSON (no training)")
    args = ap.parse_args(argv)
    if args.from_json:
        import json

        saved = json.loads(open(args.from_json).read())
        rows = saved["rows"]
        for r in rows:  # JSON keys are strings
            r["overshoot_by_inner_step"] = {int(k): v for k, v in r["overshoot_by_inner_step"].items()}
        for key in ("mus", "optimizers", "seeds", "rollouts", "lr"):
            setattr(args, key, saved["args"][key])
    else:
        rows = run(
            args.mus,
            args.optimizers,
            list(range(args.seeds)),
            args.rollouts,
            args.lr,
            progress=None if args.quiet else print,
        )
    cols = [
        "mu",
        "optimizer",
        "overshoot_fraction",
        "max_excess",
        "mean_max_excess",
        "reward_start",
        "reward_final",
        "reward_final_sd",
    ]
    table = markdown_table(rows, cols, floatfmt=".3g")
    focus = 4 if 4 in args.mus else max(args.mus)
    table += f"\n\n### Reduction against AdamW at mu = {focus}\n\n"
    table += markdown_table(
        ratios_vs_adamw(rows, focus),
        [
            "optimizer",
            "overshoot_reduction",
            "max_excess_reduction",
            "mean_max_excess_reduction",
            "reward_final",
            "reward_final_sd",
        ],
        floatfmt=".3g",
    )
    adam = next((r for r in rows if r["optimizer"] == "adamw" and r["mu"] == max(args.mus)), None)
    if adam is not None:
        c = 0.9 / 0.95**0.5
        steps = [
            {"inner_step": k, "adamw_overshoot": v, "prop3_residual_factor": c ** (k + 1)}
            for k, v in adam["overshoot_by_inner_step"].items()
        ]
        table += (
            f"\n\n### AdamW overshoot by inner step (mu = {max(args.mus)}) and Prop. 3's (beta1/sqrt(beta2))^(k+1)\n\n"
        )
        table += markdown_table(steps, ["inner_step", "adamw_overshoot", "prop3_residual_factor"], floatfmt=".3g")

    def plot(fig):
        ax1, ax2, ax3 = fig.add_subplot(1, 3, 1), fig.add_subplot(1, 3, 2), fig.add_subplot(1, 3, 3)
        for name in args.optimizers:
            rs = [r for r in rows if r["optimizer"] == name]
            ax1.plot([r["mu"] for r in rs], [max(r["overshoot_fraction"], 1e-4) for r in rs], "o-", label=name)
            ax2.plot([r["mu"] for r in rs], [max(r["mean_max_excess"], 1e-4) for r in rs], "o-", label=name)
            focus_row = next((r for r in rs if r["mu"] == focus), None)
            if focus_row:
                ax3.plot(focus_row["reward_curve"], label=name)
        ax1.set(xscale="log", yscale="log", xlabel="mu (steps per rollout batch)", ylabel="overshoot fraction")
        ax2.set(xscale="log", yscale="log", xlabel="mu", ylabel="per-step max |log s| excess (mean)")
        ax3.set(xlabel="rollout", ylabel=f"mean reward (mu = {focus})")
        for ax in (ax1, ax2):
            ax.set_xticks(args.mus, [str(m) for m in args.mus])
            ax.minorticks_off()
        ax1.legend(fontsize=7)

    payload_args = {k: v for k, v in vars(args).items() if k != "from_json"}
    write_results(
        args.out,
        args.name,
        title=f"Momentum overshoot past the clip region (paper Prop. 3), lr {args.lr:g}",
        table=table,
        payload={"args": payload_args, "rows": rows},
        plot=plot,
    )
    print(table)
    return rows


if __name__ == "__main__":
    main()
