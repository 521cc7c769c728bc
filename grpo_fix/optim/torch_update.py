"""The torch implementations of the clip-aware AdamW update (:func:`grpo_fix.optim.clip_aware_adamw`
with ``backend="torch"``) when the gate or the controller is active; without them the update is
torch's own ``adam()``, bit for bit.

- :func:`multi_tensor_update`: torch's ``foreach`` AdamW with the gate and ``alpha`` folded in,
  no extra pass: the first moment ``m <- c * m + (1 - beta1) * g`` (``c = beta1 * kappa * s``,
  :func:`momentum_`) costs what torch's ``lerp`` costs, ``alpha`` rides in the per-tensor step
  sizes of the final ``addcdiv``, and the decay stays ``lr * weight_decay``;
- :func:`single_tensor_update`: the same one tensor at a time (torch's default on CPU: less
  temporary memory);
- :func:`fused_update`: torch's fused kernel (one pass), the gate applied to ``m`` first.  The
  kernel takes one learning rate for the decay and the step: it gets ``lr * alpha`` and the
  decay coefficient ``lr * weight_decay / (lr * alpha)``, so that the decay stays
  ``lr * weight_decay`` (``alpha >= alpha_min > 0`` keeps the ratio bounded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch.optim.adam import adam as _torch_adam
from torch.optim.optimizer import Optimizer

__all__ = ["StepScalars", "fused_update", "momentum_", "multi_tensor_update", "single_tensor_update"]


@dataclass(frozen=True)
class StepScalars:
    """The scalars of one update: AdamW's (``lr`` a tensor only for the fused kernel) and the
    controller's ``alpha``."""

    lr: float | torch.Tensor
    alpha: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool


def momentum_(exp_avgs: list[torch.Tensor], grads: list[torch.Tensor], carried: list[float], beta1: float) -> None:
    """``m_i <- carried[i] * m_i + (1 - beta1) * g_i`` in place, one pass over each tensor.

    ``carried == beta1`` everywhere is torch's ``lerp`` (bit for bit).  Otherwise a plain contiguous
    fp32/fp64 CPU tensor takes BLAS ``gemv`` with one column (``y <- a * x + b * y``, the
    ``axpby`` torch lacks; with ``b = 0`` the old ``m`` is not read at all); other tensors take a
    multiply and an add."""
    if all(c == beta1 for c in carried):
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        return
    rest: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    ones: dict[torch.dtype, torch.Tensor] = {}
    for m, g, c in zip(exp_avgs, grads, carried):
        plain = type(m) is torch.Tensor and type(g) is torch.Tensor  # not a DTensor shard
        blas = plain and m.device.type == "cpu" and m.dtype in (torch.float32, torch.float64) and g.dtype == m.dtype
        if blas and m.is_contiguous() and g.is_contiguous():
            one = ones.setdefault(m.dtype, torch.ones(1, dtype=m.dtype))
            m.view(-1).addmv_(g.view(-1, 1), one, beta=c, alpha=1.0 - beta1)
        else:
            ms, gs = rest.setdefault(c, ([], []))
            ms.append(m)
            gs.append(g)
    for c, (ms, gs) in rest.items():
        torch._foreach_mul_(ms, c)
        torch._foreach_add_(ms, gs, alpha=1.0 - beta1)


def _bias_corrections(steps: list[torch.Tensor], beta1: float, beta2: float) -> tuple[list[float], list[float]]:
    """``1 - beta1^t`` and ``sqrt(1 - beta2^t)`` per tensor, computed once per distinct ``t``."""
    seen: dict[float, tuple[float, float]] = {}
    bc1, bc2_sqrt = [], []
    for st in steps:
        t = float(st)
        if t not in seen:
            seen[t] = (1.0 - beta1**t, math.sqrt(1.0 - beta2**t))
        bc1.append(seen[t][0])
        bc2_sqrt.append(seen[t][1])
    return bc1, bc2_sqrt


def multi_tensor_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    scales: list[float],
    h: StepScalars,
) -> None:
    """The clip-aware update with torch's ``_foreach`` ops (module docstring); ``scales[i]`` is
    ``kappa * s`` of tensor ``i``."""
    lr = float(h.lr)  # a tensor lr is for the fused kernel only
    lists: list[list[torch.Tensor | None]] = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps]  # type: ignore[list-item]
    grouped = Optimizer._group_tensors_by_device_and_dtype(lists, with_indices=True)
    for group_lists, indices in grouped.values():
        ps, gs, ms, vs, vmaxs, steps = (cast(list[torch.Tensor], xs) for xs in group_lists)
        ps, gs, ms, vs, vmaxs = (
            [torch.view_as_real(x) if x.is_complex() else x for x in xs] for xs in (ps, gs, ms, vs, vmaxs)
        )
        if h.maximize:
            gs = list(torch._foreach_neg(gs))
        if steps[0].is_cpu:
            torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)
        else:
            torch._foreach_add_(steps, 1)
        if h.weight_decay != 0:
            torch._foreach_mul_(ps, 1.0 - lr * h.weight_decay)
        momentum_(ms, gs, [h.beta1 * scales[i] for i in indices], h.beta1)
        torch._foreach_mul_(vs, h.beta2)
        torch._foreach_addcmul_(vs, gs, gs, 1.0 - h.beta2)
        del gs
        bc1, bc2_sqrt = _bias_corrections(steps, h.beta1, h.beta2)
        if h.amsgrad:
            torch._foreach_maximum_(vmaxs, vs)
        denom = torch._foreach_sqrt(vmaxs if h.amsgrad else vs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, h.eps)
        torch._foreach_addcdiv_(ps, ms, denom, [-lr * h.alpha / b for b in bc1])


def single_tensor_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    scales: list[float],
    h: StepScalars,
) -> None:
    """The same update one tensor at a time, with tensor methods (torch's single-tensor AdamW:
    temporaries of one tensor only)."""
    lr = float(h.lr)  # a tensor lr is for the fused kernel only
    for i, (p, g, m, v, st) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, state_steps)):
        vmax = max_exp_avg_sqs[i] if h.amsgrad else v
        if p.is_complex():
            p, g, m, v, vmax = (torch.view_as_real(x) for x in (p, g, m, v, vmax))
        if h.maximize:
            g = -g
        st += 1
        if h.weight_decay != 0:
            p.mul_(1.0 - lr * h.weight_decay)
        momentum_([m], [g], [h.beta1 * scales[i]], h.beta1)
        v.mul_(h.beta2).addcmul_(g, g, value=1.0 - h.beta2)
        (bc1,), (bc2_sqrt,) = _bias_corrections([st], h.beta1, h.beta2)
        if h.amsgrad:
            torch.maximum(vmax, v, out=vmax)
        p.addcdiv_(m, vmax.sqrt().div_(bc2_sqrt).add_(h.eps), value=-lr * h.alpha / bc1)


def fused_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    scales: list[float],
    h: StepScalars,
) -> None:
    """The clip-aware update with torch's fused AdamW kernel (module docstring)."""
    by_scale: dict[float, list[torch.Tensor]] = {}
    for m, s in zip(exp_avgs, scales):
        if s != 1.0:
            by_scale.setdefault(s, []).append(m)
    for s, ms in by_scale.items():
        torch._foreach_mul_(ms, s)
    step_lr = h.lr * h.alpha
    step_wd = 0.0
    if torch.is_tensor(step_lr) or step_lr == 0:  # a tensor lr (or lr == 0): the decay on its own
        if h.weight_decay != 0 and (torch.is_tensor(h.lr) or h.lr != 0):
            torch._foreach_mul_(params, 1 - h.lr * h.weight_decay)
    else:
        step_wd = float(h.lr * h.weight_decay / step_lr)  # step_lr * step_wd == lr * weight_decay
    _torch_adam(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        fused=True,
        amsgrad=h.amsgrad,
        maximize=h.maximize,
        decoupled_weight_decay=True,
        beta1=h.beta1,
        beta2=h.beta2,
        lr=step_lr,
        weight_decay=step_wd,
        eps=h.eps,
    )
