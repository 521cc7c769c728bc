"""Experiment 2 (paper Prop. 2, App. C): AdamW makes training insensitive to the reward scale.

Protocol: the toy GRPO task with mean-only advantages (``adv_scale="none"``, as Dr GRPO and
DeepSeek-V3.2: with group-std scaling alpha*A is trivially scale free), float64, the same seed
and sampling noise for every run; rewards are multiplied by phi in {0.01, 1, 100}.  For each
condition we report the parameter distance to the phi = 1 run, relative to how far that run moved,

    d(phi) = ||theta_phi - theta_1|| / ||theta_1 - theta_0||,

the reward trajectory, and ``adam_eps_report``'s median of eps / (sqrt(v_hat) + eps) at the end
of each run (whether eps is negligible: Prop. 2's condition).  Conditions: Adam eps = 0 (the exact
limit of Prop. 2), eps = 1e-8 (PyTorch's default), eps = 1e-5 (common in RL code, Huang et al.
2022), and beta > 0 (a KL term, which Prop. 2 excludes).  Theory: d = 0 up to float rounding for
eps = 0 (and for eps = 1e-8 whenever eps is negligible), d > 0 once eps matters or beta > 0.
"""

from __future__ import annotations

import argparse
from typing import Any

from .. import toy
from .loop import RunConfig, train
from .report import markdown_table, write_results

CONDITIONS: dict[str, dict[str, float]] = {
    "beta=0, eps=0": dict(eps=0.0, beta=0.0),
    "beta=0, eps=1e-8": dict(eps=1e-8, beta=0.0),
    "beta=0, eps=1e-5": dict(eps=1e-5, beta=0.0),
    "beta=0.05, eps=1e-8": dict(eps=1e-8, beta=0.05),
}
SCALES = (0.01, 1.0, 100.0)


def run(rollouts: int = 8, inner_steps: int = 4, seed: int = 0, lr: float = 1e-3) -> list[dict[str, Any]]:
    """One row per (condition, phi): distance to the phi = 1 run, final reward, eps report."""
    rows = []
    theta0 = train(RunConfig(rollouts=0, dtype="float64", seed=seed), keep_params=True).final_params
    assert theta0 is not None
    for name, cond in CONDITIONS.items():
        runs = {}
        for phi in SCALES:
            cfg = RunConfig(
                preset="dr_grpo",
                adv_scale="none",
                reward_scale=phi,
                rollouts=rollouts,
                inner_steps=inner_steps,
                dtype="float64",
                seed=seed,
                lr=lr,
                eps=cond["eps"],
                beta=cond["beta"],
            )
            runs[phi] = train(cfg, keep_params=True)
        params = {phi: r.final_params for phi, r in runs.items() if r.final_params is not None}
        moved = float((params[1.0] - theta0).norm())
        for phi in SCALES:
            eps_report = runs[phi].adam_eps or {}
            rows.append(
                {
                    "condition": name,
                    "phi": phi,
                    "rel_distance_to_phi1": float((params[phi] - params[1.0]).norm()) / moved,
                    "reward_final": runs[phi].summary()["reward_final"],
                    "eps_median_shrink": eps_report.get("median_shrink", float("nan")),
                    "eps_negligible": eps_report.get("negligible", False),
                    "rewards": runs[phi].rewards,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(prog="grpo-fix experiment reward-scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rollouts", type=int, default=8)
    ap.add_argument("--inner-steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    toy.offline_environment()
    rows = run(args.rollouts, args.inner_steps, args.seed)
    table = markdown_table(
        rows,
        ["condition", "phi", "rel_distance_to_phi1", "reward_final", "eps_median_shrink", "eps_negligible"],
        floatfmt=".3g",
    )

    def plot(fig: Any) -> None:
        for j, name in enumerate(CONDITIONS):
            ax = fig.add_subplot(1, len(CONDITIONS), j + 1)
            for r in (r for r in rows if r["condition"] == name):
                ax.plot(r["rewards"], label=f"phi={r['phi']}", ls="-" if r["phi"] == 1 else "--")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("rollout")
            if j == 0:
                ax.set_ylabel("mean reward")
                ax.legend(fontsize=8)

    write_results(
        args.out,
        "reward_scale",
        title="Reward-scale invariance under AdamW (paper Prop. 2)",
        table=table,
        payload={"args": vars(args), "rows": rows},
        plot=plot,
    )
    print(table)
    return rows


if __name__ == "__main__":
    main()
