"""Fused single-pass AdamW step with the clip-aware momentum gate, as a Triton kernel (CUDA).

One kernel reads ``p, g, m, v`` once and writes ``p, m, v`` once (7 memory accesses per element,
the bandwidth floor of AdamW) and applies, per element,

    p <- p * (1 - lr * wd)                          decoupled weight decay (lr NOT scaled by alpha)
    m <- beta1 * m_scale * m + (1 - beta1) * g      m_scale = kappa * pending momentum shrink
    v <- beta2 * v + (1 - beta2) * g * g
    p <- p - (lr * alpha / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)

with ``bc1 = 1 - beta1**t``, ``bc2 = 1 - beta2**t`` (t = the tensor's step after increment).
All math is fp32; parameters may be fp32, bf16 or fp16 and the state fp32 (or the parameter's
dtype, as torch's lazy init creates it): loaded values are cast to fp32 and results cast back to
the destination dtype.  With ``m_scale == 1`` and ``alpha == 1`` this is exactly the update of
``torch.optim.AdamW`` (same operation order as torch's single-tensor/foreach path).

Launch: one launch per tensor (under DeepSpeed ZeRO-1/2/3 a param group is one flat partition,
hence one launch).  Scalars are passed by value; no host sync besides reading the CPU-hosted
``state["step"]`` that torch keeps there anyway.

``triton`` is imported lazily: importing this module never requires it.  Under
``TRITON_INTERPRET=1`` the kernel also runs on CPU tensors (used by the tests; the interpreter's
bf16 arithmetic is wrong, which is why every loaded value is cast to fp32 first).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["triton_available", "adamw_step_"]

BLOCK = 1024


@functools.cache
def _kernel() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    # Triton types the kernel's arguments (pointers, scalars, constexprs)
    @triton.jit
    def _clip_aware_adamw_kernel(  # type: ignore[no-untyped-def]
        p_ptr,
        g_ptr,
        m_ptr,
        v_ptr,
        n_elements,
        decay,  # 1 - lr * weight_decay
        beta1_m,  # beta1 * m_scale
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        step_size,  # lr * alpha / bc1
        bc2_sqrt,
        eps,
        MAXIMIZE: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n_elements
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MAXIMIZE:
            g = -g
        p = p * decay
        m = beta1_m * m + one_minus_beta1 * g
        v = beta2 * v + one_minus_beta2 * (g * g)
        # IEEE round-to-nearest sqrt/div (tl.sqrt and "/" lower to approximate PTX ops); the
        # kernel is bandwidth-bound, so exact rounding costs nothing measurable
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p - step_size * tl.div_rn(m, denom)
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)

    return _clip_aware_adamw_kernel, triton


def triton_available() -> bool:
    """True when triton imports (the kernel itself additionally needs CUDA tensors or TRITON_INTERPRET=1)."""
    try:
        _kernel()
    except Exception:  # ImportError, or a broken triton install
        return False
    return True


def adamw_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    lr: float,
    alpha: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    m_scales: list[float],
    maximize: bool = False,
) -> None:
    """In-place clip-aware AdamW step on each tensor (increments ``state_steps`` like torch).

    ``m_scales[i]`` multiplies the carried first moment of tensor ``i`` (the gate's kappa times any
    pending momentum shrink of the controller); ``alpha`` scales the Adam step but not the weight
    decay.  All tensors of one index must be contiguous and have the same number of elements.
    """
    kernel, triton = _kernel()
    lr = float(lr)
    decay = 1.0 - lr * float(weight_decay)
    for p, g, m, v, st, ms in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps, m_scales, strict=True):
        if not (p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
            raise ValueError("adamw_step_ needs contiguous tensors")
        n = p.numel()
        st.add_(1)
        t = float(st)
        bc1 = 1.0 - beta1**t
        bc2_sqrt = (1.0 - beta2**t) ** 0.5
        if n == 0:
            continue
        grid = (triton.cdiv(n, BLOCK),)
        kernel[grid](
            p,
            g,
            m,
            v,
            n,
            decay,
            float(beta1) * float(ms),
            1.0 - float(beta1),
            float(beta2),
            1.0 - float(beta2),
            lr * float(alpha) / bc1,
            bc2_sqrt,
            float(eps),
            MAXIMIZE=bool(maximize),
            BLOCK_SIZE=BLOCK,
        )
