"""Logits-free log-probs and their gradients: ``hidden`` + ``lm_head.weight`` in, never ``[N, V]``.

:func:`fused_linear_logprob` runs, per chunk of tokens (index tensors chosen by the caller):

1. GEMM ``X_c W^T (+ b)`` into one reused ``[chunk, V]`` buffer (in ``compute_dtype``);
2. Triton forward kernel -> ``logp_c`` (fp32) and the log-sum-exp;
3. ``dlogp_c = grad_fn(k, idx, logp_c)``: the caller's upstream gradient of the chunk (a loss
   computes it from ``logp_c``; nothing about the loss lives here);
4. Triton backward kernel writes ``dlogits`` in place into the buffer;
5. ``dX_c = dlogits W`` and ``dW += dlogits^T X_c`` (fp32 accumulator), ``db += sum dlogits``.

So all three GEMMs run in one pass and a loss's backward only scales the results.  Tokens the
caller leaves out of every chunk cost nothing (no GEMM): a loss leaves out tokens whose upstream
gradient is known to be zero before any GEMM.  Autocast is off inside: the GEMMs run in
``compute_dtype`` (an autocast caller passes its autocast dtype), ``dX`` is returned in
``hidden``'s dtype and ``dW`` / ``db`` in the weight's.

:func:`linear_logprobs` is the no-grad form for the old / reference policy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .checks import check_linear, check_mask, check_temperature, raise_on_bad_logprobs
from .logprob import check_device, logprob_backward, logprob_forward

#: ``grad_fn(chunk_number, token_index, logp_chunk) -> dlogp_chunk`` (fp32, or None for zeros).
GradFn = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


@functools.cache
def _fp32_output_gemm(device_type: str) -> bool:
    """Whether ``torch.addmm(acc32, a16, b16, out_dtype=torch.float32)`` (a 16-bit GEMM that
    accumulates straight into an fp32 output) works on this device type (CUDA, torch >= 2.8)."""
    if device_type != "cuda":
        return False
    a = torch.ones((2, 3), dtype=torch.bfloat16, device=device_type)
    acc = torch.ones((2, 2), dtype=torch.float32, device=device_type)
    try:
        torch.addmm(acc, a, a.t(), out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return bool((acc == 4.0).all())


def dw_accumulation(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> str:
    """How :func:`fused_linear_logprob` accumulates ``dW`` in fp32 on ``device`` for ``dtype`` GEMMs:

    - ``"fp32"``: fp32 GEMMs, ``addmm_`` into the fp32 accumulator;
    - ``"fp32-output gemm"``: one 16-bit GEMM per chunk writing into the fp32 accumulator (no
      rounding of a chunk's product, no ``[V, H]`` temporary);
    - ``"16-bit product + fp32 add"``: where that GEMM is missing (CPU, older torch), each chunk's
      ``[V, H]`` product is rounded to the 16-bit dtype, then added in fp32.
    """
    if dtype == torch.float32:
        return "fp32"
    return "fp32-output gemm" if _fp32_output_gemm(torch.device(device).type) else "16-bit product + fp32 add"


def _acc_mm(acc32: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc32 += a @ b`` into an fp32 accumulator (see :func:`dw_accumulation`)."""
    if a.dtype == torch.float32:
        acc32.addmm_(a, b)
    elif _fp32_output_gemm(a.device.type):
        torch.addmm(acc32, a, b, out_dtype=torch.float32, out=acc32)
    else:
        acc32.add_(torch.mm(a, b))


def _gemm(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


@dataclass
class LinearLogprobs:
    """Result of :func:`fused_linear_logprob`: ``logp`` (fp32, one per token, 0 for tokens in no
    chunk), ``grad_hidden`` (rows of ``hidden``, its dtype), ``grad_weight`` / ``grad_bias`` (the
    weight's dtype), each None when not asked for, and the ``dw_mode`` that ran."""

    logp: torch.Tensor
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None
    dw_mode: str


def fused_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    chunks: Sequence[torch.Tensor],
    *,
    rows: torch.Tensor | None = None,
    grad_rows: tuple[torch.Tensor | None, int] | None = None,
    temperature: float = 1.0,
    grad_fn: GradFn | None = None,
    need_grad_hidden: bool = False,
    need_grad_weight: bool = False,
    need_grad_bias: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> LinearLogprobs:
    """Log-probs of ``ids`` under ``softmax((hidden W^T + b) / temperature)`` and, with ``grad_fn``,
    the gradients of the caller's loss (module docstring).  Inputs are assumed checked.  Runs
    without autograd (``grad_fn`` enables it for itself).

    Args:
        hidden: ``(R, H)``: the rows the tokens read (``rows[n]`` is token n's row; default
            ``rows = arange(N)``); any extra rows are never touched, so a caller can pass a
            strided view of the model's whole last hidden state and read the completion positions
            without a copy.
        grad_rows: ``(index, count)``: the gradient w.r.t. ``hidden`` is returned as ``(count, H)``
            with token n's row at ``index[n]`` (at row n when ``index`` is None; default:
            ``hidden``'s own rows, ``rows``).
        weight, bias: ``(V, H)`` and ``(V,)``.
        ids: ``(N,)`` target ids (valid for every token in a chunk).
        chunks: index tensors into ``[0, N)``, disjoint; tokens in none of them get ``logp = 0``.
        grad_fn: the upstream gradient of each chunk's log-probs (``None``: forward only).
        compute_dtype: dtype of the GEMMs (default the weight's).
    """
    cdt = compute_dtype or weight.dtype
    dev = hidden.device
    N, V, H = ids.numel(), weight.shape[0], hidden.shape[-1]
    temperature = check_temperature(temperature)
    want_grads = grad_fn is not None
    w = weight.to(cdt)
    b = None if bias is None else bias.to(cdt)
    logp = torch.zeros(N, dtype=torch.float32, device=dev)
    dx_index, dx_count = grad_rows if grad_rows is not None else (rows, hidden.shape[0])
    dX = torch.zeros((dx_count, H), dtype=hidden.dtype, device=dev) if want_grads and need_grad_hidden else None
    dW32 = torch.zeros((V, H), dtype=torch.float32, device=dev) if want_grads and need_grad_weight else None
    db32 = torch.zeros((V,), dtype=torch.float32, device=dev) if want_grads and need_grad_bias else None
    largest = max((int(c.numel()) for c in chunks), default=0)
    buf = torch.empty((largest, V), dtype=cdt, device=dev) if largest else None
    with torch.no_grad(), torch.autocast(dev.type, enabled=False):
        for k, idx in enumerate(chunks):
            n = int(idx.numel())
            if n == 0:
                continue
            hrows = idx if rows is None else rows.index_select(0, idx)
            x_c = hidden.index_select(0, hrows).to(cdt)
            assert buf is not None  # a non-empty chunk: largest >= n > 0
            logits_c = _gemm(buf[:n], x_c, w, b)
            ids_c = ids.index_select(0, idx)
            logp_c, lse_c = logprob_forward(logits_c, ids_c, None, temperature, save_lse=want_grads)
            logp.index_copy_(0, idx, logp_c)
            if grad_fn is None:
                continue
            dlogp = grad_fn(k, idx, logp_c)
            if dlogp is None:
                continue
            assert lse_c is not None  # saved: save_lse=want_grads
            dlogits = logprob_backward(logits_c, ids_c, None, lse_c, dlogp, temperature, inplace=True)
            if dX is not None:
                drows = idx if dx_index is None else dx_index.index_select(0, idx)
                dX.index_copy_(0, drows, torch.mm(dlogits, w).to(dX.dtype))
            if dW32 is not None:
                _acc_mm(dW32, dlogits.t(), x_c)
            if db32 is not None:
                db32.add_(dlogits.sum(0, dtype=torch.float32))
    del buf
    dW = None if dW32 is None else (dW32 if weight.dtype == torch.float32 else dW32.to(weight.dtype))
    db = None if db32 is None or bias is None else db32.to(bias.dtype)
    return LinearLogprobs(logp, dX, dW, db, dw_accumulation(dev, cdt))


def balanced_chunks(index: torch.Tensor, max_tokens: int) -> list[torch.Tensor]:
    """``index`` split into ``ceil(n / max_tokens)`` chunks of (nearly) equal size."""
    n = int(index.numel())
    if n == 0:
        return []
    count = -(-n // max(int(max_tokens), 1))
    return list(index.tensor_split(count))


@torch.no_grad()
def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
) -> torch.Tensor:
    """No-grad ``log_softmax((hidden W^T + b) / temperature)[ids]`` in fp32 (old / reference
    policies), chunked over the valid tokens; 0 where ``mask`` is 0.  ``hidden`` ``(B, T, H)``
    with ``ids`` ``(B, T)``, or ``(N, H)`` with ``ids`` ``(N,)`` / ``(B, T)``.  Ids outside
    ``[0, V)`` or NaN/inf log-probs at valid positions raise ``ValueError`` (one host sync)."""
    check_linear(hidden, weight, bias, ids)
    check_mask(mask, ids)
    check_device(hidden, "hidden")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
    valid = (
        torch.ones(ids.numel(), dtype=torch.bool, device=hidden.device)
        if mask is None
        else mask.reshape(-1).to(torch.bool)
    )
    chunks = balanced_chunks(valid.nonzero().squeeze(1), chunk_tokens)
    out = fused_linear_logprob(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, ids.reshape(-1), chunks, temperature=temperature
    )
    logp = out.logp.view(ids.shape)
    raise_on_bad_logprobs(logp, ids, mask, weight.shape[0], source="hidden states and weight")
    return logp
