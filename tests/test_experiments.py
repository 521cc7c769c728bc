"""Reduced versions of the experiments and the demo (the full runs are committed under benchmarks/results)."""

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


def test_reward_scale_agrees_with_prop2(monkeypatch):
    from grpo_fix.lab.experiments import reward_scale

    monkeypatch.setattr(reward_scale, "SCALES", (0.01, 1.0))
    rows = reward_scale.run(rollouts=2, inner_steps=2)
    d = {r["condition"]: r["rel_distance_to_phi1"] for r in rows if r["phi"] == 0.01}
    assert d["beta=0, eps=0"] < 1e-5  # invariant (float32 RMSNorm inside Qwen2 sets the floor)
    assert d["beta=0, eps=1e-5"] > 100 * d["beta=0, eps=0"]
    assert d["beta=0.05, eps=1e-8"] > 100 * d["beta=0, eps=0"]


def test_overshoot_experiment_runs_and_mu1_is_on_policy(tmp_path):
    from grpo_fix.lab.experiments import overshoot

    rows = overshoot.main(
        [
            "--mus",
            "1",
            "2",
            "--seeds",
            "1",
            "--rollouts",
            "2",
            "--optimizers",
            "adamw",
            "clip_aware",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    for r in rows:
        if r["mu"] == 1:
            assert r["overshoot_fraction"] == 0.0 and r["max_excess"] == 0.0
    data = json.loads((tmp_path / "overshoot.json").read_text())
    assert {r["optimizer"] for r in data["rows"]} == {"adamw", "clip_aware"}
    assert (tmp_path / "overshoot.png").stat().st_size > 1000 and "| mu |" in (tmp_path / "overshoot.md").read_text()


def test_lr_robustness_statistics_and_smoke(tmp_path):
    from grpo_fix.cli import main
    from grpo_fix.lab.experiments.lr_robustness import comparisons, fisher_one_sided, wilson_interval

    low, high = wilson_interval(0, 32)
    assert low == 0.0 and high == pytest.approx(3.8415 / 35.8415, rel=1e-4)
    low, high = wilson_interval(16, 32)
    assert low == pytest.approx(1 - high) and 0.33 < low < 0.34
    # 4 of 48 vs 0 of 48: P(X >= 4) = C(48,4) / C(96,4); equal rates give p = 1 at k = 0
    assert fisher_one_sided(4, 48, 0, 48) == pytest.approx(194580 / 3321960)
    assert fisher_one_sided(0, 10, 0, 10) == 1.0 and fisher_one_sided(3, 10, 3, 10) > 0.5
    rows = [
        dict(lr=0.1, optimizer="adamw", runs=10, collapses=5),
        dict(lr=0.1, optimizer="clip_aware", runs=10, collapses=0),
    ]
    (t,) = comparisons(rows)
    assert t["collapses"] == "0/10 vs 5/10" and t["fisher_p_one_sided"] == pytest.approx(fisher_one_sided(5, 10, 0, 10))

    assert (
        main(
            [
                "experiment",
                "lr-robustness",
                "--lrs",
                "0.01",
                "--seeds",
                "1",
                "--rollouts",
                "2",
                "--out",
                str(tmp_path),
                "--quiet",
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "lr_robustness.json").read_text())
    assert {r["optimizer"] for r in data["rows"]} == {"adamw", "clip_aware"} and len(data["runs"]) == 2
    assert "Fisher" in (tmp_path / "lr_robustness.md").read_text()


def test_demo_command_runs(tmp_path):
    from grpo_fix.cli import main

    assert main(["demo", "--steps", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "demo.json").read_text())
    assert len(data["runs"]) == 2
    for run in data["runs"]:
        assert len(run["history"]) == 2 and run["summary"]["tokens/s"] > 0
    assert (tmp_path / "demo.png").exists()


def test_bench_without_gpu_says_so(capsys):
    import torch

    from grpo_fix.cli import main

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert main(["bench"]) == 0
    assert "no CUDA device" in capsys.readouterr().out
