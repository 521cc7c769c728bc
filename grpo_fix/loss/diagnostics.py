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
    alpha: torch.Tensor,
    classes: PrefixClasses | None,
    group_size: int | None,
) -> tuple[TrustRegionSignal, dict[str, torch.Tensor]]:
    """The :class:`TrustRegionSignal` and the metrics (``clip_low/high/region``, ``kl``,
    ``w_agg``/``w_agg_abs``) of one call."""
    f64 = torch.float64
    m = valid.to(terms.per_token_loss.dtype)
    adv, s, log_s, zeroed, kl = terms.adv, terms.ratio, terms.log_ratio, terms.zeroed, terms.kl
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    s_b = s.expand_as(m)
    pos, neg = (adv > 0) & valid, (adv < 0) & valid
    coeff = alpha * adv * terms.grad_scale  # signed advantage-gradient coefficient omega * A, unclipped
    mass = (coeff.abs() * m).to(f64)
    zeroed = zeroed.expand_as(m) & valid
    over_high, over_low = pos & (s_b > hi), neg & (s_b < lo)
    # the signal's trust region is the clip range widened to contain ratio 1: a CISPO cap below 1
    # (TRL's cispo with its default epsilon_high) bounds an IS weight; it must not make on-policy
    # tokens count as overshoot.  For every clipped preset lo <= 1 <= hi, so nothing changes there.
    tr_lo, tr_hi = min(lo, 1.0), max(hi, 1.0)
    overshoot = (pos & (s_b > tr_hi)) | (neg & (s_b < tr_lo))
    log_hi = math.log(tr_hi)
    log_lo = math.log(tr_lo) if tr_lo > 0 else -math.inf
    log_s_b = log_s.expand_as(m)
    excess = torch.where(pos, log_s_b - log_hi, torch.where(neg, log_lo - log_s_b, torch.zeros_like(log_s_b)))
    excess = torch.where(valid, excess.clamp_min(0.0), torch.zeros_like(excess))
    signal = TrustRegionSignal(
        active_mass=(mass * (~zeroed)).sum(),
        total_mass=mass.sum(),
        num_tokens=m.to(f64).sum(),
        num_eligible=(pos | neg).to(f64).sum(),
        num_clipped=zeroed.to(f64).sum(),
        num_overshoot=overshoot.to(f64).sum(),
        max_excess=excess.amax().to(f64) if excess.numel() else torch.zeros((), dtype=f64, device=m.device),
    )
    n_valid = m.sum().clamp_min(1.0)
    metrics = {
        "clip_low": (over_low.to(m.dtype).sum() / n_valid),
        "clip_high": (over_high.to(m.dtype).sum() / n_valid),
        "clip_region": ((over_low | over_high).to(m.dtype).sum() / n_valid),
    }
    if kl is not None:
        metrics["kl"] = (kl * m).sum() / n_valid
    if classes is not None:
        coefficient = logp_gradient_coefficient(cfg, coeff, zeroed, m, terms.lengths)
        metrics["w_agg"], metrics["w_agg_abs"] = whole_group_prefix_aggregate(classes, coefficient, valid, group_size)
    return signal, metrics


def logp_gradient_coefficient(
    cfg: SurrogateConfig, coeff: torch.Tensor, zeroed: torch.Tensor, m: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """``-dL_adv/dlogp_{i,t}``: the signed gradient coefficient of each token's log-prob.

    Token-level and IS-weighted ratios: ``alpha A s`` where not clipped.  Sequence ratios spread
    the row's summed weight over its tokens: ``(sum_t alpha) A s / |o|`` (``sequence``) or
    ``(sum_t alpha) A s`` (``sequence_unnormalized``).
    """
    coeff = torch.where(zeroed, torch.zeros_like(coeff.expand_as(m)), coeff.expand_as(m)) * m
    if cfg.ratio in ("sequence", "sequence_unnormalized"):
        row_weight = coeff.sum(-1, keepdim=True)
        if cfg.ratio == "sequence":
            row_weight = row_weight / lengths.clamp_min(1.0)
        coeff = row_weight * m
    return coeff
