"""The trust-region signal and the metrics of one loss call, from the terms of Eq. 1.

What is measured and why: :mod:`grpo_fix.signal` (the signal handed to the optimizer) and
:mod:`grpo_fix.loss.prefix` (W_agg, the shared-prefix aggregate of Prop. 1, Eq. 18).  Nothing
here has a gradient or a host sync.
"""

from __future__ import annotations

import math

import torch

from ..signal import TrustRegionSignal
from .config import SurrogateConfig
from .math import TokenTerms
from .prefix import PrefixClasses, whole_group_prefix_aggregate


def trust_region_diagnostics(
    cfg: SurrogateConfig,
    valid: torch.Tensor,
    terms: TokenTerms,
    classes: PrefixClasses | None,
    group_size: int | None,
) -> tuple[TrustRegionSignal, dict[str, torch.Tensor]]:
    """The :class:`TrustRegionSignal` and the metrics (``clip_low/high/region``, ``kl``,
    ``w_agg``/``w_agg_abs``) of one call, from the 0/1 masks the loss used (no grad, no host sync).

    Sums run in the masks' float dtype and are returned as float64 scalars; the masses are
    ``|alpha A| * grad_scale``; ``active_mass`` is ``total_mass`` minus the clipped tokens' mass, so
    it equals ``total_mass`` exactly when nothing is clipped (kappa exactly 1)."""
    f64 = torch.float64
    coeff = terms.weighted_adv * terms.grad_scale  # signed advantage-gradient coefficient omega * A, unclipped
    mass = coeff.abs()
    total = mass.sum().to(f64)
    zeroed = terms.zeroed
    if zeroed is None:
        active, num_clipped = total, total.new_zeros(())
    else:
        # the same reduction as total's, so that clipping everything leaves exactly 0 (never < 0)
        active = (total - (mass * zeroed).sum().to(f64)).clamp_min(0.0)
        num_clipped = zeroed.sum().to(f64)
    num_overshoot = num_clipped if terms.overshoot is zeroed else terms.overshoot.sum().to(f64)
    lo, hi = cfg.clip_bounds
    # how far log s is past the trust region in the advantage's direction: the largest log s of
    # the A > 0 tokens above log(hi) and the smallest of the A < 0 tokens below log(lo) (other
    # tokens contribute 0 to the max / min, which can only lie inside the region)
    log_s = terms.log_ratio
    excess = total.new_zeros(())
    if terms.pos.numel():  # not log_s: a sequence ratio's log s is (B, 1) even when T = 0
        excess = (log_s * terms.pos).amax() - math.log(max(hi, 1.0))
        if lo > 0:
            excess = torch.maximum(excess, math.log(min(lo, 1.0)) - (log_s * terms.neg).amin())
    n_tokens = terms.mask.sum().to(f64)
    signal = TrustRegionSignal(
        active_mass=active,
        total_mass=total,
        num_tokens=n_tokens,
        num_eligible=torch.count_nonzero(terms.adv).to(f64),
        num_clipped=num_clipped,
        num_overshoot=num_overshoot,
        max_excess=excess.clamp_min(0.0).to(f64),
    )
    n = n_tokens.clamp_min(1.0)
    if terms.over_high is None:  # the plain clip: past the range = zeroed, split by A's sign
        assert zeroed is not None
        high = _dot(zeroed, terms.pos).to(f64)
        region = num_clipped
    else:
        assert terms.over_low is not None  # set together with over_high
        high = terms.over_high.sum().to(f64)
        region = num_overshoot if lo <= 1.0 <= hi else (terms.over_high + terms.over_low).sum().to(f64)
    metrics = {"clip_low": (region - high) / n, "clip_high": high / n, "clip_region": region / n}
    if terms.kl is not None:
        metrics["kl"] = terms.kl.sum().to(f64) / n
    if classes is not None and group_size:
        coefficient = logp_gradient_coefficient(cfg, coeff, zeroed, terms.mask, terms.lengths)
        metrics["w_agg"], metrics["w_agg_abs"] = whole_group_prefix_aggregate(classes, coefficient)
    return signal, metrics


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum()`` in one pass when the shapes agree."""
    if a.shape == b.shape:
        return torch.dot(a.reshape(-1), b.reshape(-1))
    return (a * b).sum()


def logp_gradient_coefficient(
    cfg: SurrogateConfig,
    coeff: torch.Tensor,
    zeroed: torch.Tensor | None,
    mask: torch.Tensor,
    lengths: torch.Tensor | None,
) -> torch.Tensor:
    """``-dL_adv/dlogp_{i,t}``: the signed gradient coefficient of each token's log-prob.

    Token-level and IS-weighted ratios: ``alpha A s`` where not clipped.  Sequence ratios spread
    the row's summed weight over its tokens: ``(sum_t alpha) A s / |o|`` (``sequence``) or
    ``(sum_t alpha) A s`` (``sequence_unnormalized``).  ``zeroed`` and ``mask`` are 0/1 floats.
    """
    coeff = coeff.expand(mask.shape)
    if zeroed is not None:
        coeff = coeff * (1.0 - zeroed)
    if cfg.ratio in ("sequence", "sequence_unnormalized"):
        row_weight = coeff.sum(-1, keepdim=True)
        if cfg.ratio == "sequence":
            assert lengths is not None  # token_terms computes them for sequence ratios
            row_weight = row_weight / lengths.clamp_min(1.0)
        coeff = row_weight * mask
    return coeff
