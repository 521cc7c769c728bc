r"""The clip-aware AdamW update as a function of tensors: :func:`clip_aware_adamw`.

The functional form of :class:`grpo_fix.ClipAwareAdamW`, as torch's ``adamw()`` beside ``AdamW``:
it holds no state, takes the tensors and the window's scalars, and dispatches to one of the
update implementations (the class keeps the param groups, the state and the controller).

For each tensor (decoupled weight decay, the carried momentum gated, the step scaled)::

    g     <- -grad if maximize else grad
    theta <- theta * (1 - lr * weight_decay)                     decay: not scaled by alpha
    m     <- beta1 * kappa * s * m + (1 - beta1) * g              the gate (paper Eqs. 29-37)
    v     <- beta2 * v + (1 - beta2) * g^2
    m_hat <- m / (1 - beta1^t),  v_hat <- v / (1 - beta2^t)       (v_hat from max(v) with amsgrad)
    theta <- theta - lr * alpha * m_hat / (sqrt(v_hat) + eps)

with ``t`` the tensor's step count after increment, ``kappa`` the window's unclipped share of the
advantage-gradient mass and ``s`` the tensor's pending momentum scale.  With ``kappa * s == 1``
and ``alpha == 1`` this is ``torch.optim.AdamW``'s update.

Implementations (``backend``):

- ``"torch"``: without the gate and the controller (``kappa * s == 1``, ``alpha == 1``) torch's
  own ``adam()`` (single-tensor, ``foreach`` or ``fused``, as torch picks them from ``foreach`` /
  ``fused``), bit for bit; otherwise the same three with the gate and ``alpha`` folded in
  (:mod:`grpo_fix.optim.torch_update`);
- ``"triton"``: the multi-tensor kernel of :mod:`grpo_fix.kernels.adamw_step`, one launch per
  param group (real, contiguous tensors, no ``amsgrad``, a float ``lr``; the step counts on the
  parameters' device);
- ``"auto"``: Triton for CUDA tensors when triton imports, the tensors qualify and ``fused=True``
  does not ask for torch's fused kernel; torch otherwise.
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam as _torch_adam
from torch.optim.optimizer import _default_to_fused_or_foreach

from ..options import Backend, check_backend
from .torch_update import StepScalars, fused_update, multi_tensor_update, single_tensor_update

__all__ = ["clip_aware_adamw", "uses_triton"]


def uses_triton(
    backend: Backend,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    amsgrad: bool,
    fused: bool | None,
) -> bool:
    """Whether :func:`clip_aware_adamw` runs the Triton kernel for these tensors.

    ``"torch"``: never.  ``"triton"``: always; ``ValueError`` when the tensors do not qualify
    (complex, non-contiguous, ``amsgrad``, a tensor ``lr``).  ``"auto"``: when they qualify, are
    CUDA tensors, ``fused=True`` does not ask for torch's fused kernel, and triton imports.
    """
    backend = check_backend(backend)
    if backend == "torch":
        return False
    qualifies = (
        not amsgrad
        and not torch.is_tensor(lr)
        and all(p.is_floating_point() and p.is_contiguous() for p in params)
        and all(g.is_contiguous() for g in grads)
    )
    if backend == "triton":
        if not qualifies:
            raise ValueError(
                "backend='triton' supports real, contiguous tensors without amsgrad and a float lr; "
                "pass backend='torch' (or 'auto') for these parameters"
            )
        return True
    if not qualifies or fused or not all(p.is_cuda for p in params):
        return False
    from grpo_fix.kernels.adamw_step import triton_available

    return triton_available()


def clip_aware_adamw(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    max_exp_avg_sqs: list[torch.Tensor] | None = None,
    lr: float | torch.Tensor,
    alpha: float = 1.0,
    kappa: float = 1.0,
    m_scales: list[float] | None = None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool = False,
    maximize: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
    backend: Backend = "auto",
    has_complex: bool = False,
    ok: torch.Tensor | None = None,
) -> list[float]:
    """One clip-aware AdamW step on every tensor, in place (see the module docstring); returns
    each tensor's momentum storage scale after the step (1.0 except on torch's fused CPU kernel,
    which keeps the first moment lazily scaled: the true moment is that scale times
    ``exp_avgs[i]``; pass it back in ``m_scales`` at the next step).

    Args:
        params, grads, exp_avgs, exp_avg_sqs: the parameters, their gradients and Adam moments
            (equal lengths; index ``i`` of each list belongs to one parameter).
        state_steps: each parameter's step count (a 0-dim tensor, incremented here, as torch does).
        max_exp_avg_sqs: the running maxima of ``v`` (required with ``amsgrad``).
        lr: the learning rate ``lr`` (the group's, never modified).
        alpha: the controller's step multiplier (scales the Adam step, not the weight decay).
        kappa: the gate, the window's unclipped share of the advantage-gradient mass, in [0, 1].
        m_scales: per-tensor momentum scales ``s``: ``s * exp_avgs[i]`` is the first moment
            (default 1; a pending shrink, or the scale this function returned last step).
        beta1, beta2, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``.
        foreach, fused: torch's implementation choice (``backend="torch"`` or the torch fallback).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (module docstring).
        has_complex: whether any parameter is complex (torch's ``_init_group`` reports it).
        ok: Triton backend only: a 0-dim fp32 device flag (1 = step, 0 = skip) the kernel reads,
            e.g. cleared by :func:`grpo_fix.kernels.adamw_step.nonfinite_check_`; the Triton
            backend needs ``state_steps`` on the parameters' device (it advances them there).
    """
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(state_steps) == n):
        raise ValueError("params, grads, exp_avgs, exp_avg_sqs and state_steps must have the same length")
    ones = [1.0] * n
    if n == 0:
        return ones
    scales = [kappa * float(s) for s in m_scales] if m_scales is not None else [float(kappa)] * n
    if uses_triton(backend, params, grads, lr=lr, amsgrad=amsgrad, fused=fused):
        from grpo_fix.kernels.adamw_step import adamw_step_

        adamw_step_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            state_steps,
            lr=float(lr),
            alpha=alpha,
            beta1=float(beta1),
            beta2=float(beta2),
            eps=eps,
            weight_decay=weight_decay,
            m_scales=scales,
            maximize=maximize,
            ok=ok,
        )
        return ones
    if ok is not None:
        raise ValueError("ok (a device skip flag) is read by the Triton backend only")

    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if max_exp_avg_sqs is not None else [], state_steps)
    if alpha == 1.0 and all(s == 1.0 for s in scales):
        _torch_adam(
            *lists,
            foreach=foreach,
            fused=fused,
            has_complex=has_complex,
            decoupled_weight_decay=True,
            amsgrad=amsgrad,
            beta1=beta1,
            beta2=beta2,
            lr=lr,
            weight_decay=weight_decay,
            eps=eps,
            maximize=maximize,
        )
        return ones
    if fused is None and foreach is None:
        fused, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    h = StepScalars(lr, alpha, beta1, beta2, eps, weight_decay, amsgrad, maximize)
    if not fused and torch.is_tensor(lr):
        raise ValueError("a tensor lr needs fused=True (as in torch's AdamW); pass a float lr")
    if fused:
        return fused_update(*lists, scales, h)
    (multi_tensor_update if foreach else single_tensor_update)(*lists, scales, h)
    return ones
