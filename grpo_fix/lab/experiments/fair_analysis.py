"""The decision rules of the fair optimizer protocol, applied to run records (no training here).

A *cell* is one (arm, lr) of the grid; its values are the primary metric per seed.  The rules:

- **best lr** of an arm: the grid lr with the highest mean metric over the given seeds;
- **near-best range**: the contiguous grid lrs around the best whose mean metric is within
  ``margin`` of the best mean; its **width** is the number of grid points it spans (on a factor-2
  grid, n points cover a factor 2^n of learning rates, counting half a step at each end);
- **width ratio interval**: resample the seeds (the same resampled seeds for every arm and lr),
  recompute both arms' widths, take the percentile interval of the ratio;
- **collapses**: a run collapses when its collapse metric is below the protocol's threshold;
  arms are compared per lr with the exact McNemar test on the seeds where exactly one collapsed;
- **candidate selection** (validation seeds): per task, :func:`select_candidate` (design round
  1); over both tasks at once, :func:`select_joint` (design round 2: a default is one setting).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .protocol import BASELINE, MARGIN, Protocol
from .stats import mcnemar_exact, percentile_interval, seed_resamples

Cells = dict[tuple[str, float], dict[int, float]]


def arm_of(config: dict[str, Any]) -> str:
    """The arm name of a run: the optimizer, suffixed with the preset when it is not ``uniform``."""
    return config["optimizer"] + ("" if config["preset"] == "uniform" else f"+{config['preset']}")


def cells(records: Sequence[dict[str, Any]], metric: str, *, inner_steps: int | None = None) -> Cells:
    """``{(arm, lr): {seed: metric}}`` of the records (only those at ``inner_steps`` if given)."""
    out: Cells = {}
    for rec in records:
        c = rec["config"]
        if inner_steps is not None and c["inner_steps"] != inner_steps:
            continue
        out.setdefault((arm_of(c), c["lr"]), {})[c["seed"]] = float(rec["summary"][metric])
    return out


def matrix(table: Cells, arm: str, lrs: Sequence[float], seeds: Sequence[int]) -> np.ndarray:
    """``(len(lrs), len(seeds))`` metric values (NaN where a run is missing)."""
    return np.array([[table.get((arm, lr), {}).get(s, np.nan) for s in seeds] for lr in lrs], dtype=float)


def best_index(curve: np.ndarray) -> int:
    """Index of the best (highest) mean; ties go to the lower lr."""
    return int(np.nanargmax(curve))


def near_best(curve: np.ndarray, margin: float = MARGIN) -> tuple[int, int]:
    """``(lo, hi)`` grid indices of the contiguous run around the best within ``margin`` of it."""
    b = best_index(curve)
    lo = hi = b
    while lo > 0 and curve[lo - 1] >= curve[b] - margin:
        lo -= 1
    while hi < len(curve) - 1 and curve[hi + 1] >= curve[b] - margin:
        hi += 1
    return lo, hi


def arm_curve(table: Cells, arm: str, lrs: Sequence[float], seeds: Sequence[int]) -> dict[str, Any]:
    """Mean metric per lr, the best lr and the near-best range of ``arm`` over ``seeds``."""
    curve = np.nanmean(matrix(table, arm, lrs, seeds), axis=1)
    b = best_index(curve)
    lo, hi = near_best(curve)
    return {
        "arm": arm,
        "means": curve.tolist(),
        "best_lr": lrs[b],
        "best": float(curve[b]),
        "near_best_lo": lrs[lo],
        "near_best_hi": lrs[hi],
        "width_points": hi - lo + 1,
    }


def width_ratio_interval(
    table: Cells, arm: str, lrs: Sequence[float], seeds: Sequence[int], *, against: str = BASELINE, seed: int = 0
) -> tuple[float, float]:
    """95 % paired-bootstrap interval of ``width(arm) / width(against)`` (seeds resampled jointly)."""
    a, b = matrix(table, arm, lrs, seeds), matrix(table, against, lrs, seeds)
    ratios = []
    for idx in seed_resamples(len(seeds), resamples=2000, seed=seed):
        wa = np.subtract(*near_best(np.nanmean(a[:, idx], 1))[::-1]) + 1
        wb = np.subtract(*near_best(np.nanmean(b[:, idx], 1))[::-1]) + 1
        ratios.append(wa / wb)
    return percentile_interval(np.array(ratios, dtype=float))


def collapses(
    records: Sequence[dict[str, Any]], proto: Protocol, arm: str, lr: float, seeds: Sequence[int]
) -> dict[int, bool]:
    """``{seed: collapsed}`` of one cell (runs at the protocol's mu)."""
    out = {}
    for rec in records:
        c = rec["config"]
        if arm_of(c) == arm and c["lr"] == lr and c["seed"] in seeds and c["inner_steps"] == proto.inner_steps:
            out[c["seed"]] = float(rec["summary"][proto.collapse_metric]) < proto.collapse_below
    return out


def collapse_test(base: dict[int, bool], other: dict[int, bool]) -> dict[str, Any]:
    """Collapse counts of two arms on their common seeds and the exact McNemar test that the first
    (the baseline) collapses more often."""
    common = sorted(set(base) & set(other))
    b_only = sum(base[s] and not other[s] for s in common)
    o_only = sum(other[s] and not base[s] for s in common)
    test = mcnemar_exact(b_only, o_only)
    return {
        "runs": len(common),
        "baseline_collapses": sum(base[s] for s in common),
        "arm_collapses": sum(other[s] for s in common),
        "mcnemar_p_one_sided": test["p_greater"],
        "mcnemar_p_two_sided": test["p_two_sided"],
    }


def select_candidate(
    curves: dict[str, dict[str, Any]], collapse_counts: dict[str, int], candidates: Sequence[str]
) -> str | None:
    """The registered validation rule for the design candidates.

    1. Eligible: best mean within ``MARGIN / 2`` of AdamW's best (no cost at a well-tuned lr).
    2. Among the eligible, the widest near-best range; ties: the fewest collapses at the top lr;
       then the order of ``candidates`` (the default first, then the simplest change).
    Returns None when no candidate is eligible.
    """
    base = curves[BASELINE]["best"]
    eligible = [c for c in candidates if c in curves and curves[c]["best"] >= base - MARGIN / 2]
    if not eligible:
        return None
    return min(eligible, key=lambda c: (-curves[c]["width_points"], collapse_counts.get(c, 0), candidates.index(c)))


def select_joint(validations: Mapping[str, dict[str, Any]], candidates: Sequence[str]) -> dict[str, Any]:
    """Design round 2's validation rule over several tasks (``{task: validation result}``, each with
    the ``curves`` of :func:`.fair_report.validation`).

    1. Eligible: on every task, best mean within ``MARGIN / 2`` of AdamW's best on that task.
    2. Among the eligible, the largest smaller-over-tasks width ratio (the candidate's near-best
       width over AdamW's, validation seeds); ties: the fewest collapses at the top lr summed over
       the tasks; then the order of ``candidates``.

    Returns ``{"selected": name or None, "candidates": {name: {task: {gap, width_ratio,
    collapses_top_lr, eligible}}}}`` (None when no candidate is eligible on every task).
    """
    if not validations:
        raise ValueError("select_joint needs the validation results of at least one task")
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for c in candidates:
        if not all(c in v["curves"] for v in validations.values()):
            continue
        table[c] = {}
        for task, v in validations.items():
            mine, base = v["curves"][c], v["curves"][BASELINE]
            gap = mine["best"] - base["best"]
            table[c][task] = {
                "gap": gap,
                "width_ratio": mine["width_points"] / base["width_points"],
                "collapses_top_lr": int(mine.get("collapses_top_lr", 0)),
                "eligible": gap >= -MARGIN / 2,
            }

    def key(c: str) -> tuple[float, int, int]:
        per_task = table[c].values()
        return (
            -min(r["width_ratio"] for r in per_task),
            sum(r["collapses_top_lr"] for r in per_task),
            list(candidates).index(c),
        )

    pool = [c for c in table if all(r["eligible"] for r in table[c].values())]
    return {"selected": min(pool, key=key) if pool else None, "candidates": table}
