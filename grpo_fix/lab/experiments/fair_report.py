"""The fair optimizer protocol's report: validation selection, test-seed results, controls, verdicts.

:func:`build_report` turns the run records of :mod:`.fair` into one dict (the JSON payload);
:func:`markdown` and :func:`plot` render it.  Every number is computed here from the records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .fair_analysis import (
    arm_curve,
    cells,
    collapse_test,
    collapses,
    matrix,
    select_candidate,
    width_ratio_interval,
)
from .loop import RunConfig
from .protocol import BASELINE, DEFAULT, MARGIN, Protocol
from .report import markdown_table
from .stats import bootstrap_mean, mean_difference, mean_ratio, paired_bootstrap, sample_sd

#: Trust-region numbers reported per arm (keys of the run summary).
TRUST_REGION = ("overshoot_step", "overshoot_end", "max_excess_step", "max_excess_end", "outside_end", "alpha_mean")


def validation(records: Sequence[dict[str, Any]], proto: Protocol) -> dict[str, Any]:
    """Each validation arm's lr curve, its collapses at the top lr, and the candidate this task's
    validation rule selects (design round 2 selects over both tasks: :func:`.fair_analysis.select_joint`)."""
    table = cells(records, proto.metric, inner_steps=proto.inner_steps)
    arms = [a for a in (BASELINE, *proto.candidates) if any((a, lr) in table for lr in proto.lrs)]
    curves = {a: arm_curve(table, a, proto.lrs, proto.val_seeds) for a in arms}
    top = proto.lrs[-1]
    counts = {a: sum(collapses(records, proto, a, top, proto.val_seeds).values()) for a in arms}
    for a in arms:
        curves[a]["collapses_top_lr"] = counts[a]
        best = proto.config(a, curves[a]["best_lr"], 0)
        alphas = _values(records, best, proto.val_seeds, "alpha_mean")
        curves[a]["alpha_mean_at_best"] = _mean(alphas) if alphas else 1.0
    pool = [c for c in proto.candidates if c in curves]
    selected = select_candidate(curves, counts, pool) if BASELINE in curves else None
    return {"curves": curves, "selected": selected}


def _same_cell(config: dict[str, Any], cell: RunConfig, seeds: Sequence[int]) -> bool:
    return (
        config["optimizer"] == cell.optimizer
        and config["preset"] == cell.preset
        and config["lr"] == cell.lr
        and config["inner_steps"] == cell.inner_steps
        and config["seed"] in seeds
    )


def _values(records: Sequence[dict[str, Any]], cell: RunConfig, seeds: Sequence[int], key: str) -> list[float]:
    by_seed = {r["config"]["seed"]: r["summary"][key] for r in records if _same_cell(r["config"], cell, seeds)}
    return [float(by_seed[s]) for s in seeds if s in by_seed]


def compare(
    records: Sequence[dict[str, Any]], proto: Protocol, arm_cell: RunConfig, base_cell: RunConfig, key: str
) -> dict[str, Any]:
    """Paired comparison of two cells on the test seeds: means, sample SDs, difference and ratio
    with 95 % paired bootstrap intervals."""
    seeds = [
        s for s in proto.test_seeds if _values(records, arm_cell, [s], key) and _values(records, base_cell, [s], key)
    ]
    a, b = _values(records, arm_cell, seeds, key), _values(records, base_cell, seeds, key)
    if not seeds:
        return {"metric": key, "seeds": 0}
    diff = paired_bootstrap(a, b, mean_difference)
    ratio = paired_bootstrap(a, b, mean_ratio)
    return {
        "metric": key,
        "seeds": len(seeds),
        "arm_mean": float(np.mean(a)),
        "arm_sd": sample_sd(a),
        "base_mean": float(np.mean(b)),
        "base_sd": sample_sd(b),
        "diff": diff[0],
        "diff_lo": diff[1],
        "diff_hi": diff[2],
        "ratio": ratio[0],
        "ratio_lo": ratio[1],
        "ratio_hi": ratio[2],
    }


def build_report(
    records: Sequence[dict[str, Any]], proto: Protocol, *, joint: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Everything the protocol reports (module docstring of :mod:`.protocol`), from the records.

    ``joint``: design round 2's selection over both tasks (:func:`.fair_analysis.select_joint`),
    which replaces this task's own selection."""
    val = validation(records, proto)
    if joint is not None:
        val["selected"], val["joint"] = joint["selected"], joint
    test_arms = [a for a in dict.fromkeys([BASELINE, DEFAULT, val["selected"] or DEFAULT])]
    table = cells(records, proto.metric, inner_steps=proto.inner_steps)
    test_curves = {a: arm_curve(table, a, proto.lrs, proto.test_seeds) for a in test_arms}
    for a in test_arms:
        if a != BASELINE:
            lo, hi = width_ratio_interval(table, a, proto.lrs, proto.test_seeds)
            test_curves[a].update(width_ratio=test_curves[a]["width_points"] / test_curves[BASELINE]["width_points"])
            test_curves[a].update(width_ratio_lo=lo, width_ratio_hi=hi)
        mat = matrix(table, a, proto.lrs, proto.test_seeds)
        test_curves[a]["ci"] = [bootstrap_mean(row[np.isfinite(row)])[1:] for row in mat]
    best = {a: proto.config(a, val["curves"][a]["best_lr"], 0) for a in test_arms}
    at_best = {a: compare(records, proto, best[a], best[BASELINE], proto.metric) for a in test_arms if a != BASELINE}
    trust = {
        a: {k: compare(records, proto, best[a], best[BASELINE], k) for k in TRUST_REGION + ("reward_mean",)}
        for a in test_arms
    }
    per_lr = []
    for lr in proto.lrs:
        row: dict[str, Any] = {"lr": lr}
        base = collapses(records, proto, BASELINE, lr, proto.test_seeds)
        for a in test_arms:
            mine = collapses(records, proto, a, lr, proto.test_seeds)
            row[f"{a} collapses"] = f"{sum(mine.values())}/{len(mine)}"
            row[f"{a} overshoot_end"] = _mean(
                _values(records, proto.config(a, lr, 0), proto.test_seeds, "overshoot_end")
            )
            if a != BASELINE:
                row[f"McNemar p ({a} < {BASELINE})"] = collapse_test(base, mine)["mcnemar_p_one_sided"]
        per_lr.append(row)
    matched, onpolicy = _controls(records, proto, val, best) if proto.design_round == 1 else (None, [])
    return {
        "protocol": {k: v for k, v in vars(proto).items()},
        "validation": val,
        "test_curves": test_curves,
        "at_best_lr": at_best,
        "trust_region_at_best_lr": trust,
        "per_lr": per_lr,
        "matched_effective_lr": matched,
        "onpolicy": onpolicy,
        "verdicts": verdicts(at_best, test_curves, per_lr),
    }


def _controls(
    records: Sequence[dict[str, Any]], proto: Protocol, val: dict[str, Any], best: dict[str, RunConfig]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Design round 1's controls: the matched-effective-lr AdamW and the on-policy (mu = 1) pair."""
    alpha = val["curves"][DEFAULT]["alpha_mean_at_best"]
    matched_lr = float(f"{val['curves'][DEFAULT]['best_lr'] * alpha:.6g}")
    matched = {
        "lr": matched_lr,
        "alpha_mean": alpha,
        proto.metric: compare(records, proto, best[DEFAULT], proto.config(BASELINE, matched_lr, 0), proto.metric),
        "overshoot_end": compare(records, proto, best[DEFAULT], proto.config(BASELINE, matched_lr, 0), "overshoot_end"),
    }
    onpolicy = []
    for lr in onpolicy_lrs(proto, val):
        res = compare(
            records,
            proto,
            proto.config(DEFAULT, lr, 0, inner_steps=1),
            proto.config(BASELINE, lr, 0, inner_steps=1, preset="dapo"),
            proto.metric,
        )
        res["lr"] = lr
        res["tie"] = bool(res.get("seeds")) and res["diff_lo"] <= 0 <= res["diff_hi"] and abs(res["diff"]) < MARGIN
        onpolicy.append(res)
    return matched, onpolicy


def onpolicy_lrs(proto: Protocol, val: dict[str, Any]) -> list[float]:
    """The lrs of the mu = 1 control: AdamW's validated lr and the top of the grid."""
    return list(dict.fromkeys([val["curves"][BASELINE]["best_lr"], proto.lrs[-1]]))


def verdicts(at_best: dict[str, Any], curves: dict[str, Any], per_lr: list[dict[str, Any]]) -> dict[str, Any]:
    """The registered hypotheses per arm: H1 no worse at the best lr (95 % interval of the
    difference above -MARGIN), H2 near-best range at least 2x AdamW's, H3 fewer collapses at the
    top lr (one-sided McNemar p < 0.05)."""
    out = {}
    for arm, res in at_best.items():
        if not res.get("seeds"):
            continue
        p = per_lr[-1].get(f"McNemar p ({arm} < {BASELINE})", 1.0)
        out[arm] = {
            "H1_no_worse_at_best_lr": res["diff_lo"] > -MARGIN,
            "H1_significantly_worse": res["diff_hi"] < 0,
            "H2_range_2x_wider": curves[arm].get("width_ratio", 0.0) >= 2.0,
            "H3_fewer_collapses_top_lr": p < 0.05,
        }
    return out


def _mean(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else float("nan")


def markdown(rep: dict[str, Any]) -> str:
    """The report as markdown tables."""
    proto = rep["protocol"]
    lrs = proto["lrs"]
    out = [
        f"Primary metric: `{proto['metric']}`; near-best margin {MARGIN}; grid {', '.join(f'{x:g}' for x in lrs)}.\n"
    ]
    out.append("## Validation seeds: mean metric per lr, best lr, near-best range, collapses at the top lr\n")
    rows = []
    for a, c in rep["validation"]["curves"].items():
        row = {"arm": a, **{f"{lr:g}": m for lr, m in zip(lrs, c["means"])}}
        row.update(best_lr=c["best_lr"], width=c["width_points"], collapses_top=c["collapses_top_lr"])
        row["alpha@best"] = c["alpha_mean_at_best"]
        rows.append(row)
    cols = ["arm", *[f"{lr:g}" for lr in lrs], "best_lr", "width", "collapses_top", "alpha@best"]
    out.append(markdown_table(rows, cols, floatfmt=".3f"))
    if rep["validation"].get("joint"):
        out.append(_joint_markdown(rep["validation"]["joint"]))
    else:
        out.append(f"\nSelected by the validation rule: **{rep['validation']['selected']}**\n")
    out.append("## Test seeds: each arm at its validated lr against AdamW at its own (paired, 95 % bootstrap)\n")
    rows = [{"arm": a, **r} for a, r in rep["at_best_lr"].items() if r.get("seeds")]
    cols = ["arm", "seeds", "arm_mean", "arm_sd", "base_mean", "base_sd", "diff", "diff_lo", "diff_hi"]
    out.append(markdown_table(rows, cols, floatfmt=".4f"))
    out.append("\n## Test seeds: near-best lr range (within the margin of each arm's best)\n")
    rows = [{"arm": a, **c} for a, c in rep["test_curves"].items()]
    cols = [
        "arm",
        "best_lr",
        "best",
        "near_best_lo",
        "near_best_hi",
        "width_points",
        "width_ratio",
        "width_ratio_lo",
        "width_ratio_hi",
    ]
    out.append(markdown_table(rows, cols, floatfmt=".4g"))
    out.append(
        "\n## Test seeds: trust region at each arm's validated lr (mean; ratio arm / AdamW with 95 % interval)\n"
    )
    rows = []
    for a, res in rep["trust_region_at_best_lr"].items():
        for k, r in res.items():
            if r.get("seeds"):
                rows.append(
                    {
                        "arm": a,
                        "quantity": k,
                        "mean": r["arm_mean"],
                        "sd": r["arm_sd"],
                        "ratio": r["ratio"],
                        "lo": r["ratio_lo"],
                        "hi": r["ratio_hi"],
                    }
                )
    out.append(markdown_table(rows, ["arm", "quantity", "mean", "sd", "ratio", "lo", "hi"], floatfmt=".4g"))
    out.append("\n## Test seeds: collapses and batch-end overshoot per lr\n")
    out.append(markdown_table(rep["per_lr"], list(rep["per_lr"][0]), floatfmt=".3g"))
    out.append(_controls_markdown(rep))
    out.append("\n## Verdicts (registered hypotheses)\n")
    rows = [{"arm": a, **v} for a, v in rep["verdicts"].items()]
    if rows:
        out.append(markdown_table(rows, list(rows[0]), floatfmt=".3g"))
    return "\n".join(out)


def _controls_markdown(rep: dict[str, Any]) -> str:
    """The matched-effective-lr and on-policy controls ('' when they were not run: design round 2)."""
    metric, m = rep["protocol"]["metric"], rep["matched_effective_lr"]
    if m is None:
        return ""
    matched = [{"quantity": k, **m[k]} for k in (metric, "overshoot_end") if m[k].get("seeds")]
    onpolicy = [r for r in rep["onpolicy"] if r.get("seeds")]
    cols = ["quantity", "seeds", "arm_mean", "base_mean", "diff", "diff_lo", "diff_hi", "ratio", "ratio_lo", "ratio_hi"]
    return "\n".join(
        [
            f"\n## Matched effective lr: AdamW at {m['lr']:g} (ClipAwareAdamW's lr x its mean alpha "
            f"{m['alpha_mean']:.3f}) vs ClipAwareAdamW\n",
            markdown_table(matched, cols, floatfmt=".4g"),
            "\n## On-policy control (mu = 1): uniform + ClipAwareAdamW vs dapo + AdamW (must tie)\n",
            markdown_table(
                onpolicy, ["lr", "seeds", "arm_mean", "base_mean", "diff", "diff_lo", "diff_hi", "tie"], floatfmt=".4g"
            ),
        ]
    )


def _joint_markdown(joint: dict[str, Any]) -> str:
    """Design round 2's joint selection: each candidate's eligibility and width ratio per task."""
    rows = []
    for arm, per_task in joint["candidates"].items():
        row: dict[str, Any] = {"arm": arm}
        for task, r in per_task.items():
            row[f"{task} best - AdamW best"] = r["gap"]
            row[f"{task} width ratio"] = r["width_ratio"]
            row[f"{task} collapses_top"] = r["collapses_top_lr"]
        row["eligible on every task"] = all(r["eligible"] for r in per_task.values())
        rows.append(row)
    cols = list(rows[0]) if rows else ["arm"]
    return (
        "\n### Design round 2: joint selection over both tasks (validation seeds)\n\n"
        + markdown_table(rows, cols, floatfmt=".3g")
        + f"\n\nSelected jointly: **{joint['selected']}**\n"
    )


def plot(rep: dict[str, Any], fig: Any) -> None:
    """Test-seed metric vs lr per arm (95 % intervals) and batch-end overshoot vs lr."""
    proto = rep["protocol"]
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for a, c in rep["test_curves"].items():
        lo = [m - ci[0] for m, ci in zip(c["means"], c["ci"])]
        hi = [ci[1] - m for m, ci in zip(c["means"], c["ci"])]
        ax1.errorbar(proto["lrs"], c["means"], yerr=[lo, hi], fmt="o-", capsize=3, label=a)
        ax2.plot(proto["lrs"], [r[f"{a} overshoot_end"] for r in rep["per_lr"]], "o-", label=a)
    ax1.set(xscale="log", xlabel="learning rate", ylabel=f"{proto['metric']} (test seeds)")
    ax2.set(xscale="log", xlabel="learning rate", ylabel="batch-end overshoot fraction")
    ax1.legend(fontsize=8)
