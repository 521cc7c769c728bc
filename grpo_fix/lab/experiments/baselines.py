"""The optimizer arms of the experiments: AdamW, ClipAwareAdamW settings, design candidates, prior art.

ClipAwareAdamW through its constructor options:

- ``clip_aware``: the defaults (gate + trust-region controller, tau 0.05, alpha starts at 1);
- ``clip_aware_warm``: the defaults + ``alpha_init=0.1`` (the opt-in warm start);
- ``clip_aware_gate``: the gate alone (``controller=False``);
- ``clip_aware_tau20``: the controller with tau 0.2, a guard that acts only on large overshoot;
- ``clip_aware_backtrack``: the defaults + backtrack.

Design candidates prototyped here (not in the library), :class:`ExcessGuard`: a step multiplier
that halves when the window's max ``|log s|`` excess past the clip boundary exceeds a limit and
grows back by 1.25 per window otherwise (the controller's rule on the size of the worst excursion
instead of the share of tokens), in the settings of :data:`GUARD_VARIANTS`:

- ``clip_aware_guard`` (design round 1): the gate + a limit of log 4 (some token's ratio 4x past
  its clip boundary);
- design round 2: ``guard16`` (the gate + log 16), ``guard16_nogate`` (log 16, gate off),
  ``guard4_nogate`` (log 4, gate off).

Prior art: ``adam_reset`` (Adam moments reset at every rollout boundary: optimizer resets in RL,
Asadi et al. 2023), ``beta1_zero`` (no momentum), ``cautious`` (C-AdamW, Liang et al. 2024).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from grpo_fix import ClipAwareAdamW, TrustRegionSignal

#: Max |log s| excess past the clip boundary above which :class:`ExcessGuard` shrinks the step
#: (log 4: some token's ratio is 4x beyond the boundary).
GUARD_EXCESS = 1.3863
#: The guard's settings per arm (:class:`ExcessGuard` keyword arguments).
GUARD_VARIANTS: dict[str, dict[str, Any]] = {
    "clip_aware_guard": {},
    "guard16": {"excess_limit": 2.7726},
    "guard16_nogate": {"excess_limit": 2.7726, "gate": False},
    "guard4_nogate": {"gate": False},
}

CLIP_AWARE_VARIANTS: dict[str, dict[str, Any]] = {
    "clip_aware": {},
    "clip_aware_warm": {"alpha_init": 0.1},
    "clip_aware_gate": {"controller": False},
    "clip_aware_tau20": {"tau": 0.2},
    "clip_aware_backtrack": {"backtrack": True},
}
OPTIMIZERS = ("adamw", *CLIP_AWARE_VARIANTS, *GUARD_VARIANTS, "adam_reset", "beta1_zero", "cautious")


class ExcessGuard(ClipAwareAdamW):
    """ClipAwareAdamW's gate plus a step multiplier driven by the window's worst excursion.

    At :meth:`observe`: ``alpha <- alpha * shrink`` when ``signal.max_excess > excess_limit``,
    else ``alpha <- min(1, alpha * grow)`` when the window had eligible tokens; the step uses
    ``lr * alpha`` (applied to each group's ``lr``; the experiments use no weight decay, so
    nothing else changes).  A lab prototype: it scales ``group["lr"]``, so it cannot be combined
    with an LR scheduler.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        excess_limit: float = GUARD_EXCESS,
        guard_shrink: float = 0.5,
        guard_grow: float = 1.25,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, controller=False, **kwargs)
        self.excess_limit = float(excess_limit)
        self.guard_shrink, self.guard_grow = float(guard_shrink), float(guard_grow)
        self.guard_alpha = 1.0
        self.base_lrs = [float(g["lr"]) for g in self.param_groups]

    def observe(self, signal: TrustRegionSignal, *, all_reduce: bool = False) -> None:
        super().observe(signal, all_reduce=all_reduce)
        if float(signal.max_excess) > self.excess_limit:
            self.guard_alpha *= self.guard_shrink
        elif float(signal.num_eligible) > 0:
            self.guard_alpha = min(1.0, self.guard_alpha * self.guard_grow)
        for group, lr in zip(self.param_groups, self.base_lrs):
            group["lr"] = lr * self.guard_alpha

    @property
    def alpha(self) -> float:
        return self.guard_alpha


class CautiousAdamW(torch.optim.AdamW):
    """C-AdamW: AdamW's update masked where ``update * grad <= 0``, rescaled by 1/mean(mask)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        before = [[p.detach().clone() for p in g["params"]] for g in self.param_groups]
        grads = [[None if p.grad is None else p.grad.detach().clone() for p in g["params"]] for g in self.param_groups]
        loss = super().step(closure)
        kept = total = 0.0
        deltas = []
        for g, ps, gs in zip(self.param_groups, before, grads):
            for p, p0, gr in zip(g["params"], ps, gs):
                if gr is None:
                    continue
                decay = p0 * (1 - g["lr"] * g["weight_decay"])  # decoupled decay part of the step
                update = p - decay
                mask = (update * -gr) > 0  # the step descends along this coordinate
                deltas.append((p, decay, update, mask))
                kept += float(mask.sum())
                total += mask.numel()
        scale = total / max(kept, 1.0)
        for p, decay, update, mask in deltas:
            p.copy_(decay + update * mask * scale)
        return loss


def make_optimizer(
    name: str,
    params: Iterable[torch.Tensor],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` (one of :data:`OPTIMIZERS`)."""
    kw: dict[str, Any] = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
    if name in ("adamw", "adam_reset"):
        return torch.optim.AdamW(params, **kw)
    if name == "beta1_zero":
        return torch.optim.AdamW(params, **{**kw, "betas": (0.0, betas[1])})
    if name == "cautious":
        return CautiousAdamW(params, **kw)
    if name in CLIP_AWARE_VARIANTS:
        return ClipAwareAdamW(params, **kw, **CLIP_AWARE_VARIANTS[name])
    if name in GUARD_VARIANTS:
        return ExcessGuard(params, **kw, **GUARD_VARIANTS[name])
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def on_rollout_start(name: str, opt: torch.optim.Optimizer) -> None:
    """Apply an arm's rollout-boundary action (only ``adam_reset`` has one: clear the moments)."""
    if name == "adam_reset":
        opt.state.clear()


def step_multiplier(opt: torch.optim.Optimizer) -> float:
    """The step multiplier the next step uses (ClipAwareAdamW's ``alpha``; 1 for AdamW)."""
    return float(getattr(opt, "alpha", 1.0))
