"""Torch references of the kernels: the CPU (``backend="torch"``) path, and what the tests compare
the Triton kernels against.

- :func:`selective_logprob_reference`: ``log_softmax(logits / T)[ids]`` in fp32 (fp64 for fp64), differentiable,
  like :func:`grpo_fix.kernels.selective_logprob`.  It reads only valid rows (NaN/inf at masked
  positions never reach the loss or the gradient) in chunks of rows, keeps one fp32 log-sum-exp
  per row for the backward and writes the gradient in the logits' dtype, so its peak memory
  beyond the logits is the gradient (1x the logits bytes) plus one chunk of fp32 rows, against
  ~5x for ``log_softmax(logits.float() / T)`` with autograd.
- :func:`linear_logprob_reference`: the same from ``hidden @ weight.T + bias`` (materialised).
- :func:`adamw_step_reference`: one tensor's clip-aware AdamW update, the math of
  :mod:`grpo_fix.kernels.adamw_step` in torch (and the single-tensor update of
  :func:`grpo_fix.optim.clip_aware_adamw`).
"""

from __future__ import annotations

from typing import Any

import torch

from .checks import check_linear, check_logits, check_mask, raise_on_bad_logprobs

#: fp32 elements per chunk of rows (4 MiB) at most, and at most 1/16 of the rows, so that the
#: temporaries of a chunk stay small against the logits (peak: the gradient, 1x the logits bytes).
_CHUNK_ELEMENTS = 1 << 20
_MIN_CHUNKS = 16


def _chunk_rows(rows: int, vocab: int) -> int:
    return max(1, min(_CHUNK_ELEMENTS // vocab, -(-rows // _MIN_CHUNKS)))


def _valid_positions(ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Index tensors of the valid tokens: ``(b, t)`` for ``(B, T)`` ids, ``(n,)`` for packed ids."""
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    return tuple(valid.nonzero(as_tuple=True))


class _SelectiveLogProbReference(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None, temperature: float
    ) -> torch.Tensor:
        pos = _valid_positions(ids, mask)  # logits[pos] gathers rows without copying the rest
        tgt = ids[pos].long().clamp(0, logits.shape[-1] - 1)  # out of range: the caller's check raises
        cdt = torch.promote_types(logits.dtype, torch.float32)
        logp = torch.zeros(ids.shape, dtype=cdt, device=logits.device)
        lse = torch.empty(tgt.numel(), dtype=cdt, device=logits.device)
        step = _chunk_rows(tgt.numel(), logits.shape[-1])
        for s in range(0, tgt.numel(), step):
            chunk = tuple(p[s : s + step] for p in pos)
            x = logits[chunk].to(cdt)  # indexing copies: in-place ops below never touch the logits
            if temperature != 1.0:
                x.div_(temperature)
            lse[s : s + step] = torch.logsumexp(x, dim=-1)
            logp[chunk] = x.gather(1, tgt[s : s + step, None]).squeeze(1) - lse[s : s + step]
        ctx.save_for_backward(logits, tgt, lse, *pos)
        ctx.temperature = temperature
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dlogp: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        logits, tgt, lse, *pos = ctx.saved_tensors
        T = ctx.temperature
        grad = torch.zeros_like(logits, memory_format=torch.contiguous_format)
        g_all = dlogp[tuple(pos)].to(lse.dtype) / T
        step = _chunk_rows(tgt.numel(), logits.shape[-1])
        for s in range(0, tgt.numel(), step):
            chunk = tuple(p[s : s + step] for p in pos)
            d = logits[chunk].to(lse.dtype)  # a copy
            if T != 1.0:
                d.div_(T)
            g = g_all[s : s + step, None]
            d.sub_(lse[s : s + step, None]).exp_().mul_(-g)  # -softmax * g
            d.scatter_add_(1, tgt[s : s + step, None], g)
            grad[chunk] = d.to(grad.dtype)
        return grad, None, None, None


def selective_logprob_reference(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    *,
    check_values: bool = True,
) -> torch.Tensor:
    """Differentiable ``log_softmax(logits / temperature).gather(-1, ids)`` in fp32 (fp64 for fp64
    logits), 0 where masked.

    ``logits`` ``(B, T, V)`` / ``(B, T + 1, V)`` (the last position is ignored) or packed
    ``(N, V)``, any float dtype; ``ids`` / ``mask`` ``(B, T)`` or ``(N,)``; masked ids may hold
    anything.  ``check_values``: raise ``ValueError`` for ids outside ``[0, V)`` or NaN/inf
    log-probs at valid positions (one host sync); a loss that reads the same flags with its own
    checks passes False (out-of-range ids are then clamped for the gather).
    """
    check_logits(logits, ids, mask)
    safe = (
        ids
        if mask is None
        else torch.where(mask.to(torch.bool), ids, torch.zeros((), dtype=ids.dtype, device=ids.device))
    )
    logp = _SelectiveLogProbReference.apply(logits, safe, mask, float(temperature))
    if check_values:
        raise_on_bad_logprobs(logp, ids, mask, logits.shape[-1])
    return logp


def linear_logprob_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    check_values: bool = True,
) -> torch.Tensor:
    """:func:`selective_logprob_reference` of ``hidden @ weight.T + bias``, materialising the
    logits of the valid tokens only (masked hidden states never enter a GEMM, so NaN/inf there
    cannot reach the weight's gradient).  ``hidden`` ``(B, T, H)`` / ``(B * T, H)`` with ``(B, T)``
    ids, or ``(N, H)`` with ``(N,)`` ids."""
    check_linear(hidden, weight, bias, ids)
    check_mask(mask, ids)
    pos = _valid_positions(ids, mask)
    rows = (
        hidden[pos]
        if hidden.dim() == ids.dim() + 1
        else hidden.reshape(-1, hidden.shape[-1])[
            mask.reshape(-1).to(torch.bool).nonzero().squeeze(1) if mask is not None else slice(None)
        ]
    )
    logits = torch.nn.functional.linear(rows, weight, bias)
    lp = selective_logprob_reference(logits, ids[pos], None, temperature, check_values=False)
    logp = torch.zeros(ids.shape, dtype=lp.dtype, device=lp.device).index_put(pos, lp)
    if check_values:
        raise_on_bad_logprobs(logp, ids, mask, weight.shape[0], source="hidden states and weight")
    return logp


@torch.no_grad()
def adamw_step_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    *,
    lr: float,
    alpha: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    m_scale: float,
    maximize: bool = False,
) -> None:
    """One tensor's clip-aware AdamW update in place (``step`` is the count after this step)::

        p <- p * (1 - lr * wd)                        decoupled decay (not scaled by alpha)
        m <- beta1 * m_scale * m + (1 - beta1) * g    m_scale = kappa * pending momentum shrink
        v <- beta2 * v + (1 - beta2) * g^2
        p <- p - lr * alpha / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)

    in fp32 whatever the storage dtype (fp64 for fp64 tensors, which makes it an oracle for the
    others); with ``m_scale == alpha == 1`` this is torch's AdamW.
    """
    cdt = torch.promote_types(param.dtype, torch.float32)
    g = grad.to(cdt)
    if maximize:
        g = -g
    p, m, v = param.to(cdt), exp_avg.to(cdt), exp_avg_sq.to(cdt)
    p.mul_(1.0 - lr * weight_decay)
    m.mul_(beta1 * m_scale).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bc1 = 1.0 - beta1**step
    bc2_sqrt = (1.0 - beta2**step) ** 0.5
    p.addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(eps), value=-lr * alpha / bc1)
    for dst, src in ((param, p), (exp_avg, m), (exp_avg_sq, v)):
        if dst.data_ptr() != src.data_ptr():
            dst.copy_(src)
