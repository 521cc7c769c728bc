"""The fair optimizer protocol: its decision rules on hand-made records, and both tasks end to end at the
test suite's reduced size (the full-size results are committed under benchmarks/results/fair_*)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from grpo_fix.lab.experiments.fair_analysis import (
    arm_curve,
    cells,
    collapse_test,
    near_best,
    select_candidate,
    select_joint,
    width_ratio_interval,
)
from grpo_fix.lab.experiments.protocol import PROTOCOLS, ROUND2_CANDIDATES, protocol

pytest.importorskip("transformers")

LRS = (0.01, 0.02, 0.04, 0.08, 0.16)


def _records(arm: str, means: list[float], seeds=range(4), noise: float = 0.0) -> list[dict]:
    rng = np.random.default_rng(len(arm))
    return [
        {
            "config": {"optimizer": arm, "preset": "uniform", "lr": lr, "seed": s, "inner_steps": 4},
            "summary": {"reward_mean": m + noise * rng.normal(), "reward_final": m},
        }
        for lr, m in zip(LRS, means)
        for s in seeds
    ]


def test_near_best_is_the_contiguous_run_within_the_margin():
    curve = np.array([0.50, 0.59, 0.60, 0.585, 0.30, 0.595])
    assert near_best(curve) == (1, 3)  # 0.595 at the end is within the margin but not contiguous
    assert near_best(np.array([0.1, 0.5, 0.1])) == (1, 1)


def test_arm_curve_width_and_its_bootstrap_ratio():
    recs = _records("adamw", [0.4, 0.6, 0.5, 0.2, 0.1]) + _records("clip_aware", [0.3, 0.59, 0.6, 0.595, 0.2])
    table = cells(recs, "reward_mean")
    a, c = arm_curve(table, "adamw", LRS, range(4)), arm_curve(table, "clip_aware", LRS, range(4))
    assert (a["best_lr"], a["width_points"]) == (0.02, 1)
    assert (c["best_lr"], c["near_best_lo"], c["near_best_hi"], c["width_points"]) == (0.04, 0.02, 0.08, 3)
    assert width_ratio_interval(table, "clip_aware", LRS, range(4)) == (3.0, 3.0)  # no noise, no spread


def test_collapse_test_pairs_by_seed():
    base = {0: True, 1: True, 2: False, 3: True}
    other = {0: False, 1: True, 2: False, 3: False, 9: True}  # seed 9 has no pair
    t = collapse_test(base, other)
    assert (t["runs"], t["baseline_collapses"], t["arm_collapses"]) == (4, 3, 1)
    assert t["mcnemar_p_one_sided"] == pytest.approx(0.25)  # 2 discordant pairs, both AdamW-only


def test_select_candidate_follows_the_registered_rule():
    curves = {
        "adamw": {"best": 0.60, "width_points": 2},
        "clip_aware": {"best": 0.55, "width_points": 5},  # costs 0.05 at the best lr: not eligible
        "clip_aware_gate": {"best": 0.598, "width_points": 3},
        "clip_aware_guard": {"best": 0.601, "width_points": 3},
    }
    order = ["clip_aware", "clip_aware_gate", "clip_aware_guard"]
    assert select_candidate(curves, {"clip_aware_gate": 2, "clip_aware_guard": 0}, order) == "clip_aware_guard"
    assert select_candidate(curves, {}, order) == "clip_aware_gate"  # full tie: the simpler change
    curves["clip_aware_gate"]["best"] = curves["clip_aware_guard"]["best"] = 0.5
    assert select_candidate(curves, {}, order) is None


def test_select_joint_needs_eligibility_on_every_task():
    def val(adamw_best: float, adamw_width: int, **arms: tuple[float, int, int]) -> dict:
        curves = {"adamw": {"best": adamw_best, "width_points": adamw_width}}
        curves |= {a: {"best": b, "width_points": w, "collapses_top_lr": c} for a, (b, w, c) in arms.items()}
        return {"curves": curves}

    order = ["clip_aware", "guard16", "guard16_nogate"]
    toy = val(0.9, 1, clip_aware=(0.8, 4, 0), guard16=(0.9, 2, 3), guard16_nogate=(0.895, 3, 3))
    arith = val(0.5, 2, clip_aware=(0.5, 3, 0), guard16=(0.5, 4, 0), guard16_nogate=(0.5, 2, 0))
    joint = select_joint({"toy": toy, "arith": arith}, order)
    # clip_aware is not eligible on toy (costs 0.1); guard16's smaller ratio is min(2, 2) = 2 and
    # guard16_nogate's min(3, 1) = 1: the smaller-of-the-two ratio decides, not the toy width alone
    assert joint["selected"] == "guard16"
    assert joint["candidates"]["clip_aware"]["toy"] == {
        "gap": pytest.approx(-0.1),
        "width_ratio": 4.0,
        "collapses_top_lr": 0,
        "eligible": False,
    }
    arith["curves"]["guard16"]["width_points"] = 2  # now a tie at ratio 1: the fewest collapses, then the order
    assert select_joint({"toy": toy, "arith": arith}, order)["selected"] == "guard16"
    toy["curves"]["guard16"]["collapses_top_lr"] = 4
    toy["curves"]["guard16_nogate"]["width_points"] = 2
    assert select_joint({"toy": toy, "arith": arith}, order)["selected"] == "guard16_nogate"
    arith["curves"]["guard16"]["best"] = arith["curves"]["guard16_nogate"]["best"] = 0.48
    assert select_joint({"toy": toy, "arith": arith}, order)["selected"] is None
    with pytest.raises(ValueError, match="at least one task"):
        select_joint({}, order)


def test_round2_is_registered_on_fresh_test_seeds():
    for task in PROTOCOLS:
        one, two = protocol(task), protocol(task, design_round=2)
        assert two.candidates == ROUND2_CANDIDATES and two.candidates[0] == "clip_aware"
        assert (two.val_seeds, two.lrs) == (one.val_seeds, one.lrs)  # round 1's validation runs are reused
        assert not set(two.test_seeds) & (set(one.test_seeds) | set(one.val_seeds))
        assert min(two.test_seeds) >= 3000 and len(two.test_seeds) == len(one.test_seeds)
    with pytest.raises(ValueError, match="design_round"):
        protocol("toy", design_round=3)


def test_protocols_are_registered_with_disjoint_seeds_and_wide_grids():
    for proto in PROTOCOLS.values():
        assert not set(proto.val_seeds) & set(proto.test_seeds)
        assert len(proto.lrs) >= 5 and proto.lrs[-1] / proto.lrs[0] >= 30
    with pytest.raises(ValueError, match="disjoint"):
        protocol("toy", smoke=True).__class__(**{**vars(protocol("toy")), "test_seeds": (1000,)})


@pytest.mark.parametrize("task", ["toy", "arith"])
def test_fair_protocol_runs_end_to_end_at_reduced_size(task, tmp_path, monkeypatch):
    from grpo_fix.cli import main

    monkeypatch.setenv("GRPO_FIX_CACHE", str(tmp_path / "cache"))
    argv = ["experiment", "fair-optimizer", "--task", task, "--smoke", "--out", str(tmp_path), "--quiet"]
    if task == "toy":  # any seed lists
        argv += ["--val-seeds", "7", "--test-seeds", "8"]
    assert main(argv) == 0
    rep = json.loads((tmp_path / f"fair_{task}_smoke.json").read_text())
    proto = protocol(task, smoke=True)
    if task == "toy":
        proto = replace(proto, val_seeds=(7,), test_seeds=(8,))
        assert {r["seed"] for r in rep["runs"]} == {7, 8}
    assert set(rep["validation"]["curves"]) == {
        "adamw",
        "clip_aware",
        "clip_aware_gate",
        "clip_aware_tau20",
        "clip_aware_guard",
        "clip_aware_warm",
    }
    runs = rep["runs"]
    val = [r for r in runs if r["seed"] in proto.val_seeds]
    test = [r for r in runs if r["seed"] in proto.test_seeds and r["inner_steps"] == proto.inner_steps]
    assert len(val) == 6 * len(proto.lrs)
    assert {r["optimizer"] for r in test} >= {"adamw", "clip_aware"}
    onpolicy = [r for r in runs if r["inner_steps"] == 1]
    assert {(r["optimizer"], r["preset"]) for r in onpolicy} == {("adamw", "dapo"), ("clip_aware", "uniform")}
    for r in onpolicy:
        assert r["overshoot_step"] == 0.0  # every step on-policy
    for r in runs:  # every arm is scored per inner step and at batch end
        assert 0.0 <= r["overshoot_end"] <= 1.0 and r["max_excess_end"] >= 0.0
    md = (tmp_path / f"fair_{task}_smoke.md").read_text()
    assert "McNemar" in md and "Matched effective lr" in md and (tmp_path / f"fair_{task}_smoke.png").exists()
    if task == "arith":
        assert 0.0 <= rep["task_info"]["held_out_accuracy_start"] <= 1.0
        assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in runs)


def test_round2_selects_over_both_tasks_end_to_end_at_reduced_size(tmp_path, monkeypatch):
    from grpo_fix.cli import main

    monkeypatch.setenv("GRPO_FIX_CACHE", str(tmp_path / "cache"))
    base = ["experiment", "fair-optimizer", "--round", "2", "--smoke", "--out", str(tmp_path), "--quiet"]
    assert main([*base, "--task", "toy", "--stage", "validate"]) == 0
    with pytest.raises(RuntimeError, match="--round 2 --task arith --stage validate"):
        main([*base, "--task", "toy", "--stage", "test"])  # the joint rule needs both tasks' validation
    assert main([*base, "--task", "arith", "--stage", "validate"]) == 0
    assert main([*base, "--task", "toy"]) == 0
    rep = json.loads((tmp_path / "fair_toy_round2_smoke.json").read_text())
    joint = rep["validation"]["joint"]
    assert set(joint["candidates"]) == set(ROUND2_CANDIDATES)
    assert set(joint["candidates"]["guard16"]) == {"toy", "arith"}
    assert rep["validation"]["selected"] == joint["selected"]
    assert rep["matched_effective_lr"] is None and rep["onpolicy"] == []  # round 2 runs no controls
    assert all(r["inner_steps"] == 4 for r in rep["runs"])
    test_seeds = set(protocol("toy", smoke=True, design_round=2).test_seeds)
    tested = {r["optimizer"] for r in rep["runs"] if r["seed"] in test_seeds}
    assert tested == {"adamw", "clip_aware", joint["selected"] or "clip_aware"}
    md = (tmp_path / "fair_toy_round2_smoke.md").read_text()
    assert "joint selection over both tasks" in md and "On-policy control" not in md


def test_a_round_reports_only_its_arms_and_seeds_from_the_shared_runs_file():
    from grpo_fix.lab.experiments.fair import in_round

    one, two = protocol("toy"), protocol("toy", design_round=2)
    assert in_round({"optimizer": "clip_aware_warm", "seed": 2000}, one)
    assert not in_round({"optimizer": "clip_aware_warm", "seed": 1000}, two)  # a round-1 candidate
    assert not in_round({"optimizer": "adamw", "seed": 2000}, two)  # round 1's test seeds
    assert in_round({"optimizer": "adamw", "seed": 3000}, two) and in_round({"optimizer": "guard16", "seed": 1000}, two)
