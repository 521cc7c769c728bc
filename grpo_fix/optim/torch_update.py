"""The torch implementations of the clip-aware AdamW update (:func:`grpo_fix.optim.clip_aware_adamw`
with ``backend="torch"``) when the gate or the controller is active; without them the update is
torch's own ``adam()``, bit for bit.

- :func:`multi_tensor_update`: torch's ``foreach`` AdamW with the gate and ``alpha`` folded in,
  no extra pass: the first moment ``m <- c * m + (1 - beta1) * g`` (``c = beta1 * kappa * s``,
  :func:`momentum_`) costs what torch's ``lerp`` costs, ``alpha`` rides in the per-tensor step
  sizes of the final ``addcdiv``, and the decay stays ``lr * weight_decay``;
- :func:`single_tensor_update`: the same one tensor at a time (torch's default on CPU: less
  temporary memory);
- :func:`fused_update`: torch's fused kernel (one pass).  The kernel computes
  ``m <- b * m + (1 - b) * g`` with one coefficient; the gate needs ``beta1 * kappa * s`` on the
  old ``m`` and ``1 - beta1`` on ``g``, so on CPU the first moment is kept lazily scaled: the
  stored ``exp_avg`` times the tensor's scale ``s`` is the true moment, each step runs the
  kernel with ``b = 1 - (1 - beta1) / c'`` where ``c' = beta1 * kappa * s + (1 - beta1)`` (so
  ``c' * m_new`` is the gated moment; ``c'`` stays in ``[1 - beta1, 1]``), compensates ``c'`` and
  the kernel's bias correction in the step size, and returns ``c'`` as the new ``s``.  The
  optimizer keeps ``s`` as ``state["ca_m_scale"]`` and folds it into ``exp_avg`` in
  ``state_dict()``.  With the
  step counts on a GPU (no host read of ``t``) the gate scales ``m`` in place instead.  The
  kernel takes one learning rate for the decay and the step: it gets the step's and the decay
  coefficient ``lr * weight_decay / step_lr``, so that the decay stays ``lr * weight_decay``
  (``alpha >= alpha_min > 0`` keeps the ratio bounded).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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
) -> list[float]:
    """The clip-aware update with torch's fused AdamW kernel (module docstring); returns each
    tensor's momentum storage scale after the step (its first moment is that times ``exp_avg``)."""
    lazy = all(st.device.type == "cpu" for st in state_steps) and not torch.is_tensor(h.lr)
    if not lazy:  # steps on the device: no host read; the gate scales the first moment in place
        by_scale: dict[float, list[int]] = {}
        for i, s in enumerate(scales):
            if s != 1.0:
                by_scale.setdefault(s, []).append(i)
        for s, idx in by_scale.items():
            torch._foreach_mul_([exp_avgs[i] for i in idx], s)
        lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        _fused_call(*lists, range(len(params)), h, h.beta1, h.lr * h.alpha)
        return [1.0] * len(params)
    calls: dict[tuple[float, float], list[int]] = {}
    stored = []
    for i, (st, c) in enumerate(zip(state_steps, scales)):
        beta1_k, c_next = h.beta1, 1.0
        if c != 1.0:  # m_true = c' * m_stored with c' = beta1 * c + (1 - beta1): lerp weight (1 - beta1) / c'
            c_next = h.beta1 * c + (1.0 - h.beta1)
            beta1_k = 1.0 - (1.0 - h.beta1) / c_next
        t = float(st) + 1.0  # the kernel's bias correction uses beta1_k: step with lr * alpha * c' * bc1_k / bc1
        step_lr = float(h.lr) * h.alpha * c_next * (1.0 - beta1_k**t) / (1.0 - h.beta1**t)
        calls.setdefault((beta1_k, step_lr), []).append(i)
        stored.append(c_next)
    for (beta1_k, step_lr), idx in calls.items():
        _fused_call(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, idx, h, beta1_k, step_lr)
    return stored


def _fused_call(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    idx: Iterable[int],
    h: StepScalars,
    beta1: float,
    step_lr: float | torch.Tensor,
) -> None:
    """torch's fused kernel on the tensors ``idx``, stepping with ``step_lr`` and decaying by
    ``lr * weight_decay`` (the kernel decays by its own lr: the coefficient handed to it is
    ``lr * weight_decay / step_lr``, or the decay runs on its own for a tensor or zero lr)."""
    idx = list(idx)
    ps = [params[i] for i in idx]
    step_wd = 0.0
    if torch.is_tensor(step_lr) or step_lr == 0:
        if h.weight_decay != 0 and (torch.is_tensor(h.lr) or h.lr != 0):
            torch._foreach_mul_(ps, 1 - h.lr * h.weight_decay)
    else:
        step_wd = float(h.lr * h.weight_decay / step_lr)  # step_lr * step_wd == lr * weight_decay
    _torch_adam(
        ps,
        [grads[i] for i in idx],
        [exp_avgs[i] for i in idx],
        [exp_avg_sqs[i] for i in idx],
        [max_exp_avg_sqs[i] for i in idx] if h.amsgrad else [],
        [state_steps[i] for i in idx],
        fused=True,
        amsgrad=h.amsgrad,
        maximize=h.maximize,
        decoupled_weight_decay=True,
        beta1=beta1,
        beta2=h.beta2,
        lr=step_lr,
        weight_decay=step_wd,
        eps=h.eps,
    )
