"""The statistics of the experiment protocols: sample SDs, paired bootstrap intervals, exact tests.

Every comparison in the experiments is *paired*: the arms run on the same seeds, so seed ``j`` of
arm a and seed ``j`` of arm b share the model initialisation, the prompts and (as long as the
parameters agree) the sampling noise.  Hence:

- intervals of a difference or a ratio of means resample **seeds**, the same resampled seeds for
  both arms (paired percentile bootstrap, :func:`paired_bootstrap`);
- paired binary outcomes (a run collapsed or not) are compared with the **exact McNemar test**
  (:func:`mcnemar_exact`: a binomial test on the discordant pairs), not Fisher's test, which
  assumes independent samples;
- spreads are **sample** standard deviations (``n - 1`` denominator, :func:`sample_sd`).

Everything is deterministic for a given ``seed`` of the bootstrap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

#: Bootstrap resamples behind every interval.
RESAMPLES = 10_000


def sample_sd(xs: Sequence[float]) -> float:
    """Sample standard deviation (``n - 1`` denominator); 0.0 for fewer than two values."""
    return float(np.std(np.asarray(xs, dtype=float), ddof=1)) if len(xs) > 1 else 0.0


def seed_resamples(n: int, *, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """``(resamples, n)`` indices of seeds drawn with replacement (one row per bootstrap replicate)."""
    if n < 1:
        raise ValueError(f"need at least one seed to resample, got n={n}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap replicates (non-finite ones dropped)."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    statistic: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(estimate, low, high)``: ``statistic(a, b)`` and its 95 % paired percentile interval.

    ``a[j]`` and ``b[j]`` are the two arms' outcomes on seed ``j``.  ``statistic`` maps two
    ``(R, n)`` arrays (R replicates of the resampled seeds) to ``(R,)`` values, e.g.
    :func:`mean_difference` or :func:`mean_ratio`.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must be 1-d and of equal length, got {x.shape} and {y.shape}")
    idx = seed_resamples(x.size, resamples=resamples, seed=seed)
    estimate = float(statistic(x[None, :], y[None, :])[0])
    return (estimate, *percentile_interval(statistic(x[idx], y[idx])))


def mean_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``mean(a) - mean(b)`` per replicate row."""
    return a.mean(-1) - b.mean(-1)


def mean_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``mean(a) / mean(b)`` per replicate row (inf where ``mean(b) == 0 < mean(a)``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return a.mean(-1) / b.mean(-1)


def bootstrap_mean(xs: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean over seeds and its 95 % percentile bootstrap interval."""
    x = np.asarray(xs, dtype=float)
    idx = seed_resamples(x.size, resamples=resamples, seed=seed)
    return (float(x.mean()), *percentile_interval(x[idx].mean(-1)))


def mcnemar_exact(a_only: int, b_only: int) -> dict[str, float]:
    """Exact McNemar test on paired binary outcomes.

    Args:
        a_only: pairs (seeds) where the event happened in arm a only.
        b_only: pairs where it happened in arm b only (concordant pairs carry no information).

    Under the null both kinds of discordant pair are equally likely, so ``a_only ~ Binomial(n, 1/2)``
    with ``n = a_only + b_only``.  Returns ``p_greater`` (one-sided: arm a has the event more
    often), ``p_two_sided`` (twice the smaller tail, capped at 1) and ``discordant`` (n).
    """
    if a_only < 0 or b_only < 0:
        raise ValueError(f"discordant counts must be >= 0, got {a_only} and {b_only}")
    n = a_only + b_only
    if n == 0:
        return {"p_greater": 1.0, "p_two_sided": 1.0, "discordant": 0}
    tail = lambda lo, hi: sum(math.comb(n, k) for k in range(lo, hi + 1)) / 2**n  # noqa: E731
    p_greater = tail(a_only, n)
    p_two = min(1.0, 2 * min(tail(0, min(a_only, b_only)), 0.5))
    return {"p_greater": p_greater, "p_two_sided": p_two, "discordant": n}


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion ``k / n`` ((0, 1) for n = 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
