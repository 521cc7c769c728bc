"""Triton kernels over the vocabulary: selected log-probs (forward) and the softmax gradient (backward).

Forward, one program per token (token axis on grid x, so no 65,535 limit): an online logsumexp
over ``BLOCK_V`` blocks of the row (one read of the logits), then the log-prob of the target id
``logp = (z[id] / T - max) - log sum exp(z / T - max)``.  Rows whose mask is 0 are skipped (``logp = 0``).

Backward, one program per token: ``dlogits = (onehot(id) - softmax(z / T)) * dlogp / T``, written
in place into the logits buffer when asked (no extra ``[N, V]`` tensor).  Rows whose upstream
gradient is exactly 0 (masked tokens, tokens whose ratio is clipped, zero advantages without KL)
are written as zeros without reading their logits: with a PPO clip that is typically a large share
of the rows, so the backward moves less than its "one read + one write" of the logits.

All math is fp32 whatever the logits dtype (bf16 / fp16 loads are upcast right after loading:
the Triton CPU interpreter gets bf16 arithmetic wrong).  Logits rows may have any strides; the
vocab dimension must be contiguous (stride 1).  ``triton`` is imported lazily so that
``import grpo_fix.kernels`` works without it.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from .checks import SUPPORTED_LOGIT_DTYPES, check_logits, check_temperature, raise_on_bad_logprobs


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(t: torch.Tensor, what: str = "input") -> None:
    """CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; anything else raises."""
    if t.is_cuda:
        return
    if t.device.type == "cpu":
        if _interpret():
            return
        raise RuntimeError(
            f"grpo_fix.kernels needs CUDA tensors ({what} is on CPU). On CPU the Triton kernels only run "
            "under the interpreter: set TRITON_INTERPRET=1 before importing triton (tests), or use the "
            "torch backend (grpo_fix.surrogate_loss on torch.log_softmax log-probs)."
        )
    raise ValueError(f"unsupported device {t.device} for {what}: the Triton kernels run on CUDA (or CPU interpreter)")


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """Define the kernels on first use (lazy ``import triton``): ``(forward, backward)``."""
    try:
        import triton
        import triton.language as tl
    except ImportError as e:  # pragma: no cover - triton ships with CUDA torch
        raise RuntimeError("grpo_fix.kernels needs triton (pip install triton)") from e

    # Triton types the kernels' arguments from their annotations (pointers, scalars, constexprs)
    @triton.jit
    def logprob_fwd_kernel(  # type: ignore[no-untyped-def]
        logits_ptr,
        ids_ptr,
        mask_ptr,
        logp_ptr,
        lse_ptr,
        T,
        V,
        s_lb,
        s_lt,
        s_ib,
        s_it,
        s_mb,
        s_mt,
        inv_temp,
        HAS_MASK: tl.constexpr,
        SAVE_LSE: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        n = tl.program_id(0).to(tl.int64)
        b = n // T
        t = n - b * T
        if HAS_MASK:
            valid = tl.load(mask_ptr + b * s_mb + t * s_mt) != 0
        else:
            valid = True
        if valid:
            row = logits_ptr + b * s_lb + t * s_lt
            offs = tl.arange(0, BLOCK_V)
            m = float("-inf")  # running max and sum (fp32 scalars once the loop starts)
            s = 0.0
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                x = tl.load(row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temp
                m_new = tl.maximum(m, tl.max(x, 0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
                m = m_new
            m_fin = tl.where(m == float("-inf"), 0.0, m)
            log_s = tl.log(s)
            tgt = tl.load(ids_ptr + b * s_ib + t * s_it).to(tl.int64)
            in_range = (tgt >= 0) & (tgt < V)
            z = tl.load(row + tl.where(in_range, tgt, 0)).to(tl.float32) * inv_temp
            # (z - max) - log(sum): no rounding of a large logsumexp (|logits| ~ 1e4 stay exact)
            logp = tl.where(in_range, (z - m_fin) - log_s, float("nan"))
            tl.store(logp_ptr + n, logp)
            if SAVE_LSE:
                tl.store(lse_ptr + 2 * n, m_fin)
                tl.store(lse_ptr + 2 * n + 1, log_s)
        else:
            tl.store(logp_ptr + n, 0.0)
            if SAVE_LSE:
                tl.store(lse_ptr + 2 * n, 0.0)
                tl.store(lse_ptr + 2 * n + 1, 0.0)

    @triton.jit
    def logprob_bwd_kernel(  # type: ignore[no-untyped-def]
        logits_ptr,
        grad_ptr,
        ids_ptr,
        mask_ptr,
        lse_ptr,
        dlogp_ptr,
        T,
        V,
        s_lb,
        s_lt,
        s_gb,
        s_gt,
        s_ib,
        s_it,
        s_mb,
        s_mt,
        inv_temp,
        HAS_MASK: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        n = tl.program_id(0).to(tl.int64)
        b = n // T
        t = n - b * T
        g = tl.load(dlogp_ptr + n).to(tl.float32) * inv_temp
        live = g != 0.0  # masked, clipped or zero-advantage tokens: zeros, the logits are not read
        if HAS_MASK:
            live = live & (tl.load(mask_ptr + b * s_mb + t * s_mt) != 0)
        grow = grad_ptr + b * s_gb + t * s_gt
        offs = tl.arange(0, BLOCK_V)
        if live:
            row = logits_ptr + b * s_lb + t * s_lt
            m_fin = tl.load(lse_ptr + 2 * n)
            log_s = tl.load(lse_ptr + 2 * n + 1)
            tgt = tl.load(ids_ptr + b * s_ib + t * s_it).to(tl.int64)
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                cmask = cols < V
                x = tl.load(row + cols, mask=cmask, other=0.0).to(tl.float32) * inv_temp
                p = tl.exp((x - m_fin) - log_s)
                d = (tl.where(cols == tgt, 1.0, 0.0) - p) * g
                tl.store(grow + cols, d.to(grad_ptr.dtype.element_ty), mask=cmask)
        else:
            zero = tl.zeros((BLOCK_V,), tl.float32)
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                tl.store(grow + cols, zero.to(grad_ptr.dtype.element_ty), mask=cols < V)

    return logprob_fwd_kernel, logprob_bwd_kernel


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _block_v(V: int, interpret: bool) -> int:
    # interpreter: cost ~ programs x iterations, so one big block; GPU: 4096 fp32 lanes per program
    cap = 16384 if interpret else 4096
    return max(16, min(_next_pow2(V), cap))


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def _as_3d(t: torch.Tensor, B: int, T: int) -> tuple[int, int]:
    """(row-b stride, row-t stride) of a (B, T) or packed (N,) tensor indexed as (b, t)."""
    if t.dim() == 2:
        return t.stride(0), t.stride(1)
    return 0, t.stride(0)  # (N,): B == 1, t == n


def _prepare(
    logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None
) -> tuple[int, int, int, int, int, torch.Tensor, torch.Tensor | None]:
    """Validate (:mod:`.checks` plus what the Triton launch needs) and return
    ``(B, T, V, logits strides, ids, mask view)``."""
    V = check_logits(logits, ids, mask)
    if logits.dtype not in SUPPORTED_LOGIT_DTYPES:
        raise ValueError(
            f"logits dtype {logits.dtype} is not supported by the Triton kernels; use one of "
            f"{SUPPORTED_LOGIT_DTYPES} (or the torch backend)"
        )
    check_device(logits, "logits")
    if logits.stride(-1) != 1:
        raise ValueError(
            f"logits must be contiguous along the vocab dimension (stride(-1) == 1), got strides {logits.stride()}; "
            "rows may have any stride"
        )
    if ids.dim() == 2:
        B, T = ids.shape
        s_lb, s_lt = logits.stride(0), logits.stride(1)
    else:
        B, T = 1, ids.shape[0]
        s_lb, s_lt = 0, logits.stride(0)
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same strides, loadable
    return B, T, V, s_lb, s_lt, ids, mask


def logprob_forward(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    save_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Selected log-probs ``log_softmax(logits / T)[id]`` (fp32, shape of ``ids``; 0 where masked)
    and the per-row softmax statistics ``(..., 2)`` = (max, log-sum-exp past the max) of
    ``logits / T`` for :func:`logprob_backward` (or None)."""
    temperature = check_temperature(temperature)
    B, T, V, s_lb, s_lt, ids, mask = _prepare(logits, ids, mask)
    N = B * T
    logp = torch.empty(ids.shape, dtype=torch.float32, device=logits.device)
    # per row: the max of logits / T and log sum exp(logits / T - max) (lse = their sum)
    lse = torch.empty((*ids.shape, 2), dtype=torch.float32, device=logits.device) if save_lse else logp
    if N == 0:
        return logp, (lse if save_lse else None)
    fwd, _ = _kernels()
    s_ib, s_it = _as_3d(ids, B, T)
    s_mb, s_mt = _as_3d(mask, B, T) if mask is not None else (0, 0)
    block = _block_v(V, _interpret())
    fwd[(N,)](
        logits,
        ids,
        mask if mask is not None else ids,
        logp,
        lse,
        T,
        V,
        s_lb,
        s_lt,
        s_ib,
        s_it,
        s_mb,
        s_mt,
        1.0 / float(temperature),
        HAS_MASK=mask is not None,
        SAVE_LSE=save_lse,
        BLOCK_V=block,
        num_warps=_num_warps(block),
    )
    return logp, (lse if save_lse else None)


def logprob_backward(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    lse: torch.Tensor,
    dlogp: torch.Tensor,
    temperature: float = 1.0,
    inplace: bool = False,
) -> torch.Tensor:
    """``dlogits = (onehot(id) - softmax(logits / T)) * dlogp / T`` (0 where masked), in the logits
    dtype; written into ``logits`` itself when ``inplace`` (then returned).  With ``(B, T + 1, V)``
    logits the extra last position gets a zero gradient."""
    B, T, V, s_lb, s_lt, ids, mask = _prepare(logits, ids, mask)
    grad = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if logits.dim() == 3 and logits.shape[1] == T + 1:
        grad[:, T].zero_()
    N = B * T
    if N == 0:
        return grad
    dlogp = dlogp.to(device=logits.device, dtype=torch.float32).reshape(-1).contiguous()
    lse = lse.reshape(-1, 2).contiguous()
    if logits.dim() == 3:
        s_gb, s_gt = grad.stride(0), grad.stride(1)
    else:
        s_gb, s_gt = 0, grad.stride(0)
    _, bwd = _kernels()
    s_ib, s_it = _as_3d(ids, B, T)
    s_mb, s_mt = _as_3d(mask, B, T) if mask is not None else (0, 0)
    block = _block_v(V, _interpret())
    bwd[(N,)](
        logits,
        grad,
        ids,
        mask if mask is not None else ids,
        lse,
        dlogp,
        T,
        V,
        s_lb,
        s_lt,
        s_gb,
        s_gt,
        s_ib,
        s_it,
        s_mb,
        s_mt,
        1.0 / float(temperature),
        HAS_MASK=mask is not None,
        BLOCK_V=block,
        num_warps=_num_warps(block),
    )
    return grad


class _SelectiveLogProb(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None, temperature: float, inplace: bool
    ) -> torch.Tensor:
        logp, lse = logprob_forward(logits, ids, mask, temperature, save_lse=True)
        ctx.save_for_backward(logits, ids, mask if mask is not None else torch.empty(0), lse)
        ctx.has_mask = mask is not None
        ctx.temperature = temperature
        ctx.inplace = inplace
        ctx.consumed = False
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dlogp: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        if ctx.inplace and ctx.consumed:
            raise RuntimeError(
                "selective_logprob(inplace=True): backward can run only once per forward (the first one wrote "
                "the gradient over the logits); recompute the forward, or pass inplace=False "
                "(inplace_backward=False in the loss) to keep the logits"
            )
        ctx.consumed = True
        logits, ids, mask, lse = ctx.saved_tensors
        grad = logprob_backward(
            logits, ids, mask if ctx.has_mask else None, lse, dlogp, ctx.temperature, inplace=ctx.inplace
        )
        return grad, None, None, None, None


def selective_logprob(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    inplace: bool = False,
    *,
    check_values: bool = True,
) -> torch.Tensor:
    """Differentiable ``log_softmax(logits / temperature).gather(-1, ids)`` in fp32, 0 where masked.

    ``logits`` ``(B, T, V)`` (or ``(B, T + 1, V)``: the last position is ignored) or packed
    ``(N, V)``; fp32 / bf16 / fp16, any row strides, vocab stride 1.  ``ids`` / ``mask``
    ``(B, T)`` or ``(N,)``, any strides; masked ids may hold anything.  ``inplace=True`` writes the
    gradient into the logits buffer during backward (the logits values are destroyed; nothing else
    may read them afterwards, and backward runs once).  ``check_values``: raise ``ValueError`` for
    ids outside ``[0, V)`` or NaN/inf log-probs at valid positions (one host sync; a loss that reads
    the same flags with its own checks passes False).
    """
    logp = _SelectiveLogProb.apply(logits, ids, mask, check_temperature(temperature), bool(inplace))
    if check_values:
        raise_on_bad_logprobs(logp, ids, mask, logits.shape[-1])
    return logp


@torch.no_grad()
def selective_logprob_nograd(
    logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """No-grad selected log-probs for the old / reference policy (no logsumexp saved); ids outside
    ``[0, V)`` or NaN/inf log-probs at valid positions raise ``ValueError`` (one host sync)."""
    logp, _ = logprob_forward(logits, ids, mask, temperature, save_lse=False)
    raise_on_bad_logprobs(logp, ids, mask, logits.shape[-1])
    return logp
