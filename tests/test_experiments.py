"""Reduced versions of the experiments and the demo (the full runs are committed under benchmarks/results;
the fair optimizer protocol is tested in test_lab_fair.py)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")


def test_prefix_bias_synthetic_agrees_with_prop1():
    from grpo_fix.lab.experiments.prefix_bias import synthetic

    rows = synthetic(draws=6, G=4)
    by = {(r["preset"], r["prefix"], r["scenario"]): r["bias"] for r in rows}
    assert max(r["identity_error"] for r in rows) < 1e-10  # summed prefix gradient == -W_agg
    for scenario in ("short correct", "long correct"):
        for prefix in ("on-policy", "clipped"):
            assert abs(by[("uniform", prefix, scenario)]) < 1e-12
        for preset in ("dapo", "dr_grpo", "bnpo", "gpg", "cispo"):
            assert abs(by[(preset, "on-policy", scenario)]) < 1e-12
        assert abs(by[("dapo", "clipped", scenario)]) > 0.1
    for preset in ("grpo", "grpo_r1", "gspo", "cppo"):
        assert by[(preset, "on-policy", "short correct")] > 0.05 > -0.05 > by[(preset, "on-policy", "long correct")]
    assert all(abs(b) <= 1.0 + 1e-9 for b in by.values())  # normalised by the uncancelled prefix gradient


def test_reward_scale_agrees_with_prop2(monkeypatch):
    from grpo_fix.lab.experiments import reward_scale

    monkeypatch.setattr(reward_scale, "SCALES", (0.01, 1.0))
    rows = reward_scale.run(rollouts=2, inner_steps=2)
    d = {r["condition"]: r["rel_distance_to_phi1"] for r in rows if r["phi"] == 0.01}
    assert d["beta=0, eps=0"] < 1e-5  # invariant (float32 RMSNorm inside Qwen2 sets the floor)
    assert d["beta=0, eps=1e-5"] > 100 * d["beta=0, eps=0"]
    assert d["beta=0.05, eps=1e-8"] > 100 * d["beta=0, eps=0"]


def test_overshoot_experiment_scores_every_arm_per_step_and_at_batch_end(tmp_path):
    from grpo_fix.cli import main

    argv = ["experiment", "overshoot", "--mus", "1", "2", "--seeds", "1", "2", "--rollouts", "2"]
    argv += ["--arms", "adamw=0.01", "clip_aware=0.02", "--runs", str(tmp_path / "runs.jsonl")]
    assert main([*argv, "--out", str(tmp_path), "--quiet"]) == 0
    rows = json.loads((tmp_path / "overshoot.json").read_text())["rows"]
    assert {(r["mu"], r["arm"], r["lr"]) for r in rows} == {
        (mu, a, lr) for mu in (1, 2) for a, lr in (("adamw", 0.01), ("clip_aware", 0.02))
    }
    for r in rows:
        assert r["seeds"] == 2 and r["overshoot_end"] >= 0.0 and r["outside_end"] > 0.0
        if r["mu"] == 1:
            assert r["overshoot_step"] == 0.0 and r["max_excess_step"] == 0.0
        if r["arm"] == "clip_aware":
            assert "end_reduction_lo" in r
    md = (tmp_path / "overshoot.md").read_text()
    assert "Batch-end overshoot" in md and (tmp_path / "overshoot.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="optimizer=lr"):
        main(["experiment", "overshoot", "--arms", "adamw"])


def test_length_bias_experiment_runs(tmp_path):
    from grpo_fix.cli import main

    argv = ["experiment", "length-bias", "--task", "toy_first", "--smoke", "--lr", "0.02", "--seeds", "1", "2"]
    assert main([*argv, "--runs", str(tmp_path / "runs.jsonl"), "--out", str(tmp_path), "--quiet"]) == 0
    data = json.loads((tmp_path / "length_bias_toy_first_smoke.json").read_text())
    assert [r["preset"] for r in data["rows"]] == ["grpo", "dapo", "uniform"]
    assert all(r["seeds"] == 2 and 0.0 <= r["prefix_share"] <= 1.0 for r in data["rows"])
    assert {d["comparison"] for d in data["differences"]} == {"grpo - uniform", "dapo - uniform"}
    with pytest.raises(SystemExit, match="fair-optimizer"):  # no --lr and no fair-protocol result to read it from
        main(["experiment", "length-bias", "--smoke", "--out", str(tmp_path / "empty")])


def test_demo_command_runs(tmp_path):
    from grpo_fix.cli import main

    assert main(["demo", "--steps", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "demo.json").read_text())
    assert len(data["runs"]) == 2
    for run in data["runs"]:
        assert len(run["history"]) == 2 and run["summary"]["tokens/s"] > 0
    assert (tmp_path / "demo.png").exists()
