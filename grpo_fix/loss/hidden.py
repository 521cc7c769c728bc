"""The surrogate from the last hidden states and ``lm_head.weight``, without materialising the
``[tokens, V]`` logits on the Triton backend.

The chunked vocabulary pass (three GEMMs in one pass, fp32 ``dW``) is
:func:`grpo_fix.kernels.linear.fused_linear_logprob`; this module hands it, per chunk, the
upstream gradient of the GRPO loss: :func:`grpo_fix.loss.math.token_loss` on the chunk's
log-probs and ``torch.autograd.grad`` (the math of the oracle, nothing re-derived; compiled on
CUDA, :mod:`grpo_fix.loss.compiled`).  What needs whole groups or the whole window (prefix-
consistent advantages, the weights alpha) is computed once on the full batch, and the returned
loss, signal and metrics are :func:`grpo_fix.surrogate_loss` on the assembled log-probs, so they
are exactly the oracle's.

Tokens whose loss cannot depend on their log-prob (zero effective advantage and no KL term: every
group whose rewards are all equal, and the prefixes a whole group shares under prefix-consistent
clipping) are left out of every chunk, so they cost no GEMM at all.  Masked tokens likewise.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..kernels.checks import IDS_OUT_OF_RANGE, check_linear, check_mask, check_temperature, ids_out_of_range
from ..kernels.linear import balanced_chunks, fused_linear_logprob
from ..kernels.logprob import check_device
from ..kernels.reference import linear_logprob_reference
from ..options import Backend, CompileMath, check_compile_math
from ..window import Window
from .backend import LossSpec, loss_config, use_triton
from .compiled import run_math, use_compiled
from .config import SurrogateConfig
from .logits import classes_before_launch
from .math import token_advantages, token_loss, window_alpha
from .packed import PackedLayout
from .surrogate import WINDOW_NORMALISED, SurrogateOutput, as_token_weights, check_call, surrogate_loss
from .validation import Checks, ValueChecks

logger = logging.getLogger(__name__)
_REPORTED_DW_MODES: set[tuple[str, str]] = set()

#: Ratios whose terms are local to a token (chunks may split rows).
TOKEN_LOCAL_RATIOS = ("token", "sg_logp", "logp")


class _Precomputed(torch.autograd.Function):
    """Returns a loss whose gradients were computed in forward; backward scales them (once)."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        loss: torch.Tensor,
        grads: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    ) -> torch.Tensor:
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("linear_surrogate_loss: backward can run only once per forward")
        grads, ctx.grads = ctx.grads, None
        return (*(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads), None, None)


def _live_tokens(cfg: SurrogateConfig, adv: torch.Tensor, valid: torch.Tensor, has_ref: bool) -> torch.Tensor:
    """Valid tokens whose loss may depend on their log-prob: all of them with a KL term; else those
    with a non-zero effective advantage (whole rows for row-coupled ratios)."""
    if has_ref:
        return valid
    live = adv.abs() > cfg.adv_threshold if cfg.adv_threshold is not None else adv != 0
    if cfg.ratio not in TOKEN_LOCAL_RATIOS or cfg.off_policy_mask_threshold is not None:
        live = live.any(-1, keepdim=True)
    return valid & live


def _row_chunks(live: torch.Tensor, chunk_tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Whole rows per chunk (``chunk_tokens // T`` rows): (flat token indices, row indices) each."""
    B, T = live.shape
    rows = live.any(-1).nonzero().squeeze(1)
    per = max(1, chunk_tokens // max(T, 1))
    tokens, row_sets = [], []
    for r in rows.split(per):
        i, t = live.index_select(0, r).nonzero(as_tuple=True)
        tokens.append(r[i] * T + t)
        row_sets.append(r)
    return tokens, row_sets


def _strided_rows(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(hidden2d, rows)``: a 2-D view over ``hidden``'s storage and the row of each (b, t), so a
    strided ``(B, T, H)`` slice of the model's hidden states is read without a copy."""
    H = hidden.shape[-1]
    if hidden.dim() == 2 or hidden.is_contiguous():
        return hidden.reshape(-1, H), None
    B, T, _ = hidden.shape
    s0, s1, s2 = hidden.stride()
    if s2 != 1 or s1 < H or s0 % s1:
        return hidden.reshape(-1, H), None  # an exotic layout: one copy
    step = s0 // s1
    flat = hidden.as_strided(((B - 1) * step + T, H), (s1, 1))
    rows = (torch.arange(B, device=hidden.device)[:, None] * step + torch.arange(T, device=hidden.device)).reshape(-1)
    return flat, rows


def input_checks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    vocab_size: int,
) -> ValueChecks:
    """Device flags of what the loss cannot see in the log-probs: out-of-range ids, and NaN/inf in
    the weight, the bias or the hidden states of valid tokens (an inf weight element leaves the
    log-probs finite but turns the hidden states' gradient into NaN).  No host sync."""
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    rows = hidden.reshape(*ids.shape, hidden.shape[-1]) if hidden.numel() else hidden
    flags = [
        ids_out_of_range(ids, mask, vocab_size),
        ~torch.isfinite(weight).all() | (~torch.isfinite(bias).all() if bias is not None else False),
        (~torch.isfinite(rows).all(-1) & valid).any() if hidden.numel() else torch.zeros((), dtype=torch.bool),
    ]
    return ValueChecks().extend(
        [torch.as_tensor(f, device=hidden.device) for f in flags],
        [IDS_OUT_OF_RANGE, "weight (lm_head) or bias has NaN/inf", "hidden has NaN/inf at valid (mask=1) positions"],
    )


def linear_surrogate_loss(
    cfg_or_loss_fn: LossSpec,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    group_size: int | None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ref_logp: torch.Tensor | None = None,
    window: Window | None = None,
    is_ratio: torch.Tensor | None = None,
    policy_mask: torch.Tensor | None = None,
    chunk_tokens: int = 4096,
    cu_seqlens: torch.Tensor | None = None,
    compile_math: CompileMath = "auto",
    backend: Backend = "auto",
    checks: Checks = "eager",
    **legacy_window: Any,
) -> SurrogateOutput:
    """The surrogate of ``cfg_or_loss_fn`` on ``log_softmax((hidden W^T + b) / temperature)[completion_ids]``.

    - ``hidden`` ``(B, T, H)`` or ``(B * T, H)``: the final hidden states aligned with
      ``completion_ids`` (position t predicts ``completion_ids[:, t]``); a strided slice of the
      model's output is read in place.  ``weight`` ``(V, H)`` (``lm_head.weight``); a frozen
      weight (``requires_grad=False``, e.g. LoRA) skips the dW GEMM.  ``bias`` ``(V,)`` optional.
      Under autocast the GEMMs run in the autocast dtype; gradients come back in each input's dtype.
    - ``chunk_tokens``: at most this many tokens per chunk (balanced; whole rows of
      ``chunk_tokens // T`` for sequence ratios / the off-policy mask); the buffer is ``[chunk, V]``.
    - ``cu_seqlens`` ``(B + 1,)``: packed inputs: ``hidden`` ``(N, H)``, ``completion_ids`` /
      ``mask`` (None: all) / ``old_logp`` / ``ref_logp`` ``(N,)``, ``advantages``, ``is_ratio``
      and ``policy_mask`` ``(B,)`` or ``(N,)``.
    - ``backend``: ``"auto"`` (Triton for CUDA tensors), ``"torch"`` (materialises the logits:
      the reference) or ``"triton"``.
    - every other argument is that of :func:`grpo_fix.surrogate_loss`.

    On the Triton backend the gradients are computed during forward and ``backward()`` (once)
    only scales them.
    """
    cfg = loss_config(cfg_or_loss_fn)
    win = Window.resolve(window, legacy_window)
    temperature = check_temperature(temperature)
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
    packed_ids = completion_ids
    lay = None
    if cu_seqlens is not None:
        lay, mask, advantages = PackedLayout.for_inputs(
            cu_seqlens,
            hidden,
            "hidden",
            mask,
            advantages,
            completion_ids=completion_ids,
            old_logp=old_logp,
            ref_logp=ref_logp,
        )
    V = check_linear(hidden, weight, bias, completion_ids, packed=lay is not None)
    check_mask(mask, completion_ids)
    packed_mask = mask
    if lay is not None:
        completion_ids, mask = lay.pad(completion_ids, "completion_ids"), lay.pad(mask.to(torch.bool), "mask", False)
        old_logp, ref_logp = lay.pad(old_logp, "old_logp"), lay.pad(ref_logp, "ref_logp")
        is_ratio = lay.pad_token_weights(is_ratio, "is_ratio")
        policy_mask = lay.pad_token_weights(policy_mask, "policy_mask")
    check_call(
        cfg,
        torch.empty(mask.shape, device=hidden.device),
        old_logp,
        advantages,
        mask,
        group_size,
        completion_ids if group_size is not None else None,
        ref_logp,
        checks,
    )
    id_check = input_checks(hidden, weight, bias, packed_ids, packed_mask, V)
    shape_like = torch.empty(mask.shape, device=hidden.device)
    is_ratio = as_token_weights("is_ratio", is_ratio, shape_like)
    policy_mask = as_token_weights("policy_mask", policy_mask, shape_like)
    loss_args: dict[str, Any] = dict(
        is_ratio=is_ratio,
        policy_mask=policy_mask,
        group_size=group_size,
        completion_ids=completion_ids if group_size is not None else None,
        ref_logp=ref_logp,
        window=win,
        compile_math=compile_math,
        checks=checks,
        extra_checks=id_check,
    )
    if not use_triton(backend, hidden):
        logp = linear_logprob_reference(
            hidden, weight, packed_ids, packed_mask, bias=bias, temperature=temperature, check_values=False
        )
        if lay is not None:
            logp = lay.pad(logp, "logp")
        return surrogate_loss(cfg, logp, old_logp, advantages, mask, **loss_args)

    check_device(hidden, "hidden")
    compiled = use_compiled(check_compile_math(compile_math), hidden)
    valid = mask.to(torch.bool)
    B, T = valid.shape
    classes = classes_before_launch(completion_ids, group_size, valid)
    adv = token_advantages(cfg, advantages, valid, classes)
    alpha = window_alpha(cfg, valid, win).expand(B, T)
    weight_of = adv if policy_mask is None else adv * policy_mask
    if is_ratio is not None and cfg.ratio != "vespo":
        weight_of = weight_of * is_ratio
    live = _live_tokens(cfg, weight_of, valid, ref_logp is not None)
    full = lambda t: None if t is None else t.expand(B, T)  # noqa: E731
    is_ratio, policy_mask = full(is_ratio), full(policy_mask)
    if cfg.ratio in TOKEN_LOCAL_RATIOS and cfg.off_policy_mask_threshold is None:
        chunks, row_sets = balanced_chunks(live.reshape(-1).nonzero().squeeze(1), chunk_tokens), None
    else:
        chunks, row_sets = _row_chunks(live, chunk_tokens)

    def pick(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
        return None if t is None else t.reshape(-1).index_select(0, idx)[None]

    def grad_fn(k: int, idx: torch.Tensor, logp_c: torch.Tensor) -> torch.Tensor | None:
        with torch.enable_grad():
            leaf = logp_c.detach().requires_grad_(True)
            if row_sets is None:  # token-local: the chunk is one (1, n) "row" of valid tokens
                args = (
                    leaf[None],
                    pick(old_logp, idx),
                    pick(adv, idx),
                    torch.ones_like(leaf[None], dtype=torch.bool),
                    pick(ref_logp, idx),
                    pick(alpha, idx),
                    pick(is_ratio, idx),
                    pick(policy_mask, idx),
                )
            else:  # whole rows: scatter the chunk's log-probs into its rows
                r = row_sets[k]  # sorted row numbers
                pos = torch.searchsorted(r, idx // T) * T + idx % T
                lp_rows = torch.zeros(r.numel() * T, dtype=leaf.dtype, device=leaf.device).index_copy(0, pos, leaf)
                sel = lambda t: None if t is None else t.index_select(0, r)  # noqa: E731
                args = (
                    lp_rows.view(-1, T),
                    sel(old_logp),
                    adv.index_select(0, r),
                    valid.index_select(0, r),
                    sel(ref_logp),
                    alpha.index_select(0, r),
                    sel(is_ratio),
                    sel(policy_mask),
                )
            loss_c = run_math(token_loss, cfg, compiled, *args)
            (dlogp,) = torch.autograd.grad(loss_c, leaf, allow_unused=True)
        return dlogp

    grad_on = torch.is_grad_enabled()
    hidden2d, read_rows = _strided_rows(hidden)
    dx_rows: tuple[torch.Tensor | None, int] = (None, B * T)  # token n's gradient in row n
    if lay is not None:
        read_rows = lay.index.reshape(-1)
        dx_rows = (read_rows, hidden2d.shape[0])
    autocast = torch.is_autocast_enabled(hidden.device.type)
    result = fused_linear_logprob(
        hidden2d,
        weight,
        bias,
        completion_ids.reshape(-1),
        chunks,
        rows=read_rows,
        grad_rows=dx_rows,
        temperature=temperature,
        grad_fn=grad_fn if grad_on else None,
        need_grad_hidden=grad_on and hidden.requires_grad,
        need_grad_weight=grad_on and weight.requires_grad,
        need_grad_bias=grad_on and bias is not None and bias.requires_grad,
        compute_dtype=torch.get_autocast_dtype(hidden.device.type) if autocast else weight.dtype,
    )
    if weight.requires_grad and (hidden.device.type, result.dw_mode) not in _REPORTED_DW_MODES:
        _REPORTED_DW_MODES.add((hidden.device.type, result.dw_mode))
        logger.info(
            "grpo_fix logits-free loss: lm_head gradient accumulated as %s on %s (once per process)",
            result.dw_mode,
            hidden.device.type,
        )
    with torch.no_grad():
        out = surrogate_loss(cfg, result.logp.view(B, T), old_logp, advantages, mask, classes=classes, **loss_args)
    dX = None if result.grad_hidden is None else result.grad_hidden.view(hidden.shape)
    loss = _Precomputed.apply(hidden, weight, bias, out.loss.detach(), (dX, result.grad_weight, result.grad_bias))
    setattr(loss, WINDOW_NORMALISED, getattr(out.loss, WINDOW_NORMALISED))
    return SurrogateOutput(loss=loss, signal=out.signal, metrics={**out.metrics}, checks=out.checks)
