"""The statistics of the experiment protocols (grpo_fix.lab.experiments.stats): exact values where they
exist, coverage and pairing where they are random."""

from __future__ import annotations

import math

import numpy as np
import pytest

from grpo_fix.lab.experiments.stats import (
    bootstrap_mean,
    mcnemar_exact,
    mean_difference,
    mean_ratio,
    paired_bootstrap,
    sample_sd,
    wilson_interval,
)


def test_sample_sd_uses_n_minus_1():
    assert sample_sd([1.0, 2.0, 3.0, 4.0]) == pytest.approx(math.sqrt(5 / 3))
    assert sample_sd([2.0]) == 0.0


def test_mcnemar_exact_matches_the_binomial_tails():
    # 8 seeds where only AdamW collapsed, 0 where only the other arm did: P(X >= 8 | n=8, 1/2) = 1/256
    t = mcnemar_exact(8, 0)
    assert t["p_greater"] == pytest.approx(1 / 256) and t["p_two_sided"] == pytest.approx(2 / 256)
    # 9 vs 1: one-sided sum_{k>=9} C(10,k)/2^10 = 11/1024
    assert mcnemar_exact(9, 1)["p_greater"] == pytest.approx(11 / 1024)
    assert mcnemar_exact(9, 1)["p_two_sided"] == pytest.approx(22 / 1024)
    assert mcnemar_exact(3, 3)["p_two_sided"] == 1.0 and mcnemar_exact(0, 0)["p_greater"] == 1.0
    assert mcnemar_exact(0, 5)["p_greater"] == 1.0  # the other direction
    with pytest.raises(ValueError, match="discordant"):
        mcnemar_exact(-1, 2)


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0, 32)
    assert lo == 0.0 and hi == pytest.approx(3.8415 / 35.8415, rel=1e-4)
    lo, hi = wilson_interval(16, 32)
    assert lo == pytest.approx(1 - hi) and 0.33 < lo < 0.34


def test_paired_bootstrap_is_paired_and_deterministic():
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0, 1.0, 16)  # large shared seed-to-seed variation
    a, b = seed_effect + 0.1, seed_effect  # a constant paired difference
    est, lo, hi = paired_bootstrap(a, b, mean_difference)
    assert est == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    assert paired_bootstrap(a, b, mean_difference) == (est, lo, hi)
    with pytest.raises(ValueError, match="equal length"):
        paired_bootstrap([1.0, 2.0], [1.0], mean_difference)


def test_bootstrap_intervals_cover_the_truth_most_of_the_time():
    rng = np.random.default_rng(1)
    covered = 0
    for rep in range(100):
        x = rng.normal(1.0, 0.5, 16)
        _, lo, hi = bootstrap_mean(x, resamples=2000, seed=rep)
        covered += lo <= 1.0 <= hi
    assert 85 <= covered <= 100  # nominal 95 %; percentile intervals undercover slightly at n = 16
    est, lo, hi = paired_bootstrap([2.0, 4.0, 6.0], [1.0, 2.0, 3.0], mean_ratio)
    assert est == pytest.approx(2.0) and lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
