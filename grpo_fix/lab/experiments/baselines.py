"""Optimizers compared in the overshoot experiment: AdamW, ClipAwareAdamW variants and prior art.

Prior-art baselines (see DESIGN section 2):
- ``adam_reset``: AdamW whose moments and step count are reset at every rollout boundary
  (optimizer resets in RL: Asadi et al. 2023; GLM-5 / prime-rl resets after each weight sync).
- ``beta1_zero``: AdamW without momentum (beta1 = 0), the bluntest way to remove Prop. 3's carry.
- ``cautious``: C-AdamW (Liang et al. 2024): update coordinates whose sign disagrees with the
  current gradient are dropped and the rest rescaled by 1/mean(mask).

ClipAwareAdamW: ``clip_aware_gate`` (gate only), ``clip_aware`` (the defaults), ``clip_aware_warm``
(the defaults + the warm start ``alpha_init=0.1``, what the TRL integration uses when rollouts are
replayed), ``clip_aware_backtrack`` and ``clip_aware_tau02`` (the earlier default threshold).
"""

from __future__ import annotations

import torch

OPTIMIZERS = (
    "adamw",
    "adam_reset",
    "beta1_zero",
    "cautious",
    "clip_aware_gate",
    "clip_aware",
    "clip_aware_warm",
    "clip_aware_backtrack",
    "clip_aware_tau02",
)


class CautiousAdamW(torch.optim.AdamW):
    """C-AdamW: AdamW's update masked where ``update * grad <= 0``, rescaled by 1/mean(mask)."""

    @torch.no_grad()
    def step(self, closure=None):
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


def make_optimizer(name: str, params, *, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
    """Build optimizer ``name`` (one of :data:`OPTIMIZERS`)."""
    kw = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if name in ("adamw", "adam_reset"):
        opt = torch.optim.AdamW(params, **kw)
        opt.reset_on_rollout = name == "adam_reset"
        return opt
    if name == "beta1_zero":
        return torch.optim.AdamW(params, **{**kw, "betas": (0.0, betas[1])})
    if name == "cautious":
        return CautiousAdamW(params, **kw)
    if name.startswith("clip_aware"):
        from grpo_fix import ClipAwareAdamW

        variant = {
            "clip_aware_gate": dict(gate=True, controller=False),
            "clip_aware": {},
            "clip_aware_warm": dict(alpha_init=0.1),
            "clip_aware_backtrack": dict(backtrack=True),
            "clip_aware_tau02": dict(tau=0.02),  # the controller's earlier default threshold
        }[name]
        return ClipAwareAdamW(params, **kw, **variant)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def on_rollout_start(opt: torch.optim.Optimizer) -> None:
    """Apply a baseline's rollout-boundary action (only ``adam_reset`` has one)."""
    if getattr(opt, "reset_on_rollout", False):
        opt.state.clear()
