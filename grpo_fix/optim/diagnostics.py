"""Diagnostics for the reward-scale finding (paper Prop. 2, App. C).

Prop. 2: with beta = 0 and rewards scaled by phi > 0, the advantage gradient scales by phi
(Prop. 5), Adam's moments by phi and phi^2 (Prop. 6), and the update

    Delta theta* = -xi * phi m_hat / (phi sqrt(v_hat) + eps) - xi lambda theta              (Eq. 27)

equals the unscaled one in the limit eps / (phi sqrt(v_hat)) -> 0.  Whether that limit holds in a
real run is a property of the optimizer state, which :func:`adam_eps_report` measures: per
coordinate, the fraction by which eps shrinks the step, ``eps / (sqrt(v_hat) + eps)``.  When it is
negligible everywhere, reward scaling (and any global advantage scale) cannot change training;
when it is not (e.g. eps = 1e-5 with small gradients, Huang et al. 2022), it acts as a
scale-dependent damping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MAX_SAMPLES = 1 << 20


@dataclass(frozen=True)
class AdamEpsReport:
    """Summary of ``eps / (sqrt(v_hat) + eps)`` over the coordinates that have seen a gradient."""

    num_coordinates: int
    median_shrink: float
    p99_shrink: float
    max_shrink: float
    fraction_above_threshold: float
    threshold: float

    @property
    def negligible(self) -> bool:
        """True when eps shrinks fewer than 1% of the steps by more than ``threshold`` (Prop. 2 holds)."""
        return self.fraction_above_threshold < 0.01


@torch.no_grad()
def adam_eps_report(optimizer: torch.optim.Optimizer, threshold: float = 0.01) -> AdamEpsReport:
    """Measure whether Adam(W)'s eps is negligible against sqrt(v_hat) for ``optimizer``'s state.

    Works for any optimizer with torch's Adam state keys (``step``, ``exp_avg_sq``) and
    ``betas``/``eps`` in its param groups (``torch.optim.Adam``, ``AdamW``, ``ClipAwareAdamW``).
    Coordinates whose second moment is still 0 are ignored.  Raises ``ValueError`` if the
    optimizer has no Adam state yet (call it after at least one step).
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    chunks: list[torch.Tensor] = []
    total = 0
    for group in optimizer.param_groups:
        if "betas" not in group or "eps" not in group:
            raise ValueError("adam_eps_report needs an Adam-family optimizer (param groups with betas and eps)")
        beta2, eps = group["betas"][1], group["eps"]
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state:
                continue
            step = float(state["step"])
            v_hat = state["exp_avg_sq"].float().flatten() / (1.0 - beta2**step)
            v_hat = v_hat[v_hat > 0]
            if v_hat.numel() == 0:
                continue
            total += v_hat.numel()
            chunks.append(eps / (v_hat.sqrt() + eps))
    if not chunks:
        raise ValueError("the optimizer has no Adam state with a non-zero second moment yet; step it first")
    shrink = torch.cat([c.cpu() for c in chunks])
    above = float((shrink > threshold).double().mean())
    sample = shrink if shrink.numel() <= _MAX_SAMPLES else shrink[torch.randperm(shrink.numel())[:_MAX_SAMPLES]]
    q = torch.quantile(sample.double(), torch.tensor([0.5, 0.99], dtype=torch.float64))
    return AdamEpsReport(
        num_coordinates=total,
        median_shrink=float(q[0]),
        p99_shrink=float(q[1]),
        max_shrink=float(shrink.max()),
        fraction_above_threshold=above,
        threshold=threshold,
    )
