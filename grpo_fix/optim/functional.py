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

- ``"torch"``: torch's own AdamW kernels (single-tensor, ``foreach`` or ``fused``, as torch
  chooses them from ``foreach`` / ``fused``), after scaling the carried momentum by
  ``kappa * s`` where it is not 1;
- ``"triton"``: the single-pass kernel of :mod:`grpo_fix.kernels.adamw_step` (real, contiguous
  tensors, no ``amsgrad``, a float ``lr``);
- ``"auto"``: Triton for CUDA tensors when triton imports and the tensors qualify (and the step
  counts live on the host, as torch keeps them without ``fused``), torch otherwise.
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam as _torch_adam

from ..options import Backend, check_backend

__all__ = ["clip_aware_adamw", "uses_triton"]


def uses_triton(
    backend: Backend,
    params: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    amsgrad: bool,
    has_complex: bool,
) -> bool:
    """Whether :func:`clip_aware_adamw` runs the Triton kernel for these tensors.

    ``"torch"``: never.  ``"triton"``: always; ``ValueError`` when the tensors do not qualify
    (complex, non-contiguous, ``amsgrad``, a tensor ``lr``).  ``"auto"``: when they qualify, are
    CUDA tensors with host-resident step counts, and triton imports.
    """
    backend = check_backend(backend)
    if backend == "torch":
        return False
    qualifies = not has_complex and not amsgrad and not torch.is_tensor(lr) and all(p.is_contiguous() for p in params)
    if backend == "triton":
        if not qualifies:
            raise ValueError(
                "backend='triton' supports real, contiguous tensors without amsgrad and a float lr; "
                "pass backend='torch' (or 'auto') for these parameters"
            )
        return True
    if not qualifies or not all(p.is_cuda for p in params):
        return False
    if any(st.is_cuda for st in state_steps):
        # fused=True keeps `step` on the GPU: reading it per tensor would sync; torch's fused kernel runs instead
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
) -> None:
    """One clip-aware AdamW step on every tensor, in place (see the module docstring).

    Args:
        params, grads, exp_avgs, exp_avg_sqs: the parameters, their gradients and Adam moments
            (equal lengths; index ``i`` of each list belongs to one parameter).
        state_steps: each parameter's step count (a 0-dim tensor, incremented here, as torch does).
        max_exp_avg_sqs: the running maxima of ``v`` (required with ``amsgrad``).
        lr: the learning rate ``lr`` (the group's, never modified).
        alpha: the controller's step multiplier (scales the Adam step, not the weight decay).
        kappa: the gate, the window's unclipped share of the advantage-gradient mass, in [0, 1].
        m_scales: per-tensor pending momentum scales ``s`` (default 1).
        beta1, beta2, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``.
        foreach, fused: torch's implementation choice (``backend="torch"`` or the torch fallback).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (module docstring).
        has_complex: whether any parameter is complex (torch's ``_init_group`` reports it).
    """
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(state_steps) == n):
        raise ValueError("params, grads, exp_avgs, exp_avg_sqs and state_steps must have the same length")
    if n == 0:
        return
    scales = [kappa * float(s) for s in m_scales] if m_scales is not None else [float(kappa)] * n
    if uses_triton(backend, params, state_steps, lr=lr, amsgrad=amsgrad, has_complex=has_complex):
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
        )
        return

    # the gate and any pending momentum scale: one foreach multiply per distinct scale (usually one)
    by_scale: dict[float, list[torch.Tensor]] = {}
    for m, s in zip(exp_avgs, scales):
        if s != 1.0:
            by_scale.setdefault(s, []).append(m)
    for s, ms in by_scale.items():
        torch._foreach_mul_(ms, s)
    step_lr, step_wd = lr, weight_decay
    if alpha != 1.0:
        # torch's kernels decay by the lr they step with: decay by lr * weight_decay here
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        step_lr, step_wd = lr * alpha, 0.0
    _torch_adam(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs if max_exp_avg_sqs is not None else [],
        state_steps,
        foreach=foreach,
        capturable=False,
        differentiable=False,
        fused=fused,
        grad_scale=None,
        found_inf=None,
        has_complex=has_complex,
        decoupled_weight_decay=True,
        amsgrad=amsgrad,
        beta1=beta1,
        beta2=beta2,
        lr=step_lr,
        weight_decay=step_wd,
        eps=eps,
        maximize=maximize,
    )
