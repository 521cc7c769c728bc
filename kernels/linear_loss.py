"""Logits-free GRPO-family loss: ``hidden`` + ``lm_head.weight`` in, loss out, never ``[N, V]``.

Per chunk of valid tokens (whole rows when the config has sequence-level ratios or the
off-policy sequence mask, which reduce over a row):

1. GEMM ``X_c W^T (+ b)`` into one reused ``[chunk, V]`` buffer (compute dtype of ``hidden``);
2. Triton forward kernel -> ``logp_c`` (fp32) and the logsumexp;
3. :func:`grpo_fix.surrogate.token_loss` on the chunk with a leaf ``logp_c`` and
   ``torch.autograd.grad`` -> ``dL/dlogp_c`` (the GRPO math of the oracle, nothing re-derived;
   compiled on CUDA, see :mod:`grpo_fix.compiled_math`);
4. Triton backward kernel writes ``dlogits`` in place into the buffer;
5. ``dX_c = dlogits W`` and ``dW += dlogits^T X_c`` (fp32 accumulator), ``db += sum dlogits``.

So all three GEMMs run inside forward and backward only scales the saved ``dX``, ``dW``, ``db``
by the incoming scalar.  Advantages (prefix-consistent class means need whole groups) and the
weights alpha (they depend only on the mask and window counts) are computed once on the full
batch; the returned loss, signal and metrics come from :func:`grpo_fix.surrogate_loss` on the
assembled (detached) log-probs, so they are exactly the oracle's.  Masked tokens are skipped
entirely (no GEMM work; one host sync to compact the valid positions).
"""

from __future__ import annotations

import functools

import torch

from grpo_fix.compiled_math import run_math, use_compiled
from grpo_fix.surrogate import SurrogateOutput, surrogate_loss, token_advantages, token_loss, window_alpha
from grpo_fix.validation import check_shapes

from .logits_loss import PackedLayout, prefix_classes_before_launch, resolve_loss_config
from .logprob import SUPPORTED_LOGIT_DTYPES, check_device, logprob_backward, logprob_forward

TOKEN_LOCAL_RATIOS = ("token", "sg_logp", "logp")


def _check_linear(hidden, weight, bias, B, T, packed=False):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (N, H) or (B, T, H), got {getattr(hidden, 'shape', type(hidden))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be the (V, H) lm_head weight, got {getattr(weight, 'shape', type(weight))}")
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {H} (expected (V, {H}))")
    if hidden.dtype not in SUPPORTED_LOGIT_DTYPES:
        raise ValueError(f"hidden dtype {hidden.dtype} is not supported; use one of {SUPPORTED_LOGIT_DTYPES}")
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"weight dtype {weight.dtype} != hidden dtype {hidden.dtype}; cast one of them (the GEMMs run in one dtype)"
        )
    check_device(hidden, "hidden")
    if weight.device != hidden.device:
        raise ValueError(f"weight on {weight.device} but hidden on {hidden.device}")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],) or bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(
                f"bias must be ({weight.shape[0]},) {weight.dtype} on {weight.device}, got {tuple(bias.shape)} "
                f"{bias.dtype} on {bias.device}"
            )
    if packed:
        if hidden.dim() != 2:
            raise ValueError(f"with cu_seqlens, hidden must be packed (N, H), got {tuple(hidden.shape)}")
    elif hidden.dim() == 3:
        if tuple(hidden.shape[:2]) != (B, T):
            raise ValueError(f"hidden shape {tuple(hidden.shape)} does not match mask (B, T) = {(B, T)}")
    elif hidden.shape[0] != B * T:
        raise ValueError(f"hidden (N, H) needs N = B * T = {B * T} (mask {(B, T)}), got N = {hidden.shape[0]}")


def _gemm(out, x, weight, bias):
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)
    return out


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
    """How :func:`linear_surrogate_loss` accumulates ``dW`` in fp32 on ``device`` for ``dtype`` weights:

    - ``"fp32"``: fp32 weights, ``addmm_`` into the fp32 accumulator;
    - ``"fp32-output gemm"``: one 16-bit GEMM per chunk writing into the fp32 accumulator (no
      rounding of a chunk's product, no ``[V, H]`` temporary);
    - ``"16-bit product + fp32 add"``: where that GEMM is missing (CPU, older torch), each chunk's
      ``[V, H]`` product is rounded to the 16-bit dtype, then added in fp32 (one ``[V, H]``
      16-bit temporary per chunk).
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


def _chunks(valid: torch.Tensor, token_local: bool, chunk_tokens: int):
    """Yield (flat valid indices, row range or None) per chunk."""
    B, T = valid.shape
    idx_all = valid.reshape(-1).nonzero().squeeze(1)
    if token_local:
        for idx in idx_all.split(chunk_tokens):
            yield idx, None
        return
    rows_per = max(1, chunk_tokens // max(T, 1))
    ends = valid.sum(1).cumsum(0).tolist()
    start = 0
    for r0 in range(0, B, rows_per):
        r1 = min(B, r0 + rows_per)
        end = int(ends[r1 - 1])
        yield idx_all[start:end], (r0, r1)
        start = end


class _LinearSurrogate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, state):
        dX, dW, db, loss = _forward_chunks(hidden, weight, bias, state)
        ctx.grads = (dX, dW, db)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("linear_surrogate_loss: backward can run only once per forward")
        dX, dW, db = ctx.grads
        ctx.grads = None
        out = []
        for g in (dX, dW, db):
            out.append(None if g is None else g.mul_(grad_loss.to(g.dtype)))
        return out[0], out[1], out[2], None


def _forward_chunks(hidden, weight, bias, st):
    cfg, valid, T = st["cfg"], st["valid"], st["T"]
    B = valid.shape[0]
    N, H = B * T, hidden.shape[-1]
    V = weight.shape[0]
    cdt, dev = hidden.dtype, hidden.device
    need_dx, need_dw, need_db = st["need_dx"], st["need_dw"], st["need_db"]
    need_grad = need_dx or need_dw or need_db
    h2 = hidden.reshape(-1, H)
    row_map = st.get("row_map")  # packed inputs: flat (B, T_max) position -> hidden row
    ids_flat = st["ids"].reshape(-1)
    adv, alpha = st["adv"], st["alpha"]
    old, ref = st["old_logp"], st["ref_logp"]
    token_local = st["token_local"]
    temp = st["temperature"]
    compiled = st["compiled"]

    plan = list(_chunks(valid, token_local, st["chunk_tokens"]))
    max_n = max((int(idx.numel()) for idx, _ in plan), default=0)
    buf = torch.empty((max_n, V), dtype=cdt, device=dev) if max_n else None
    logp_flat = torch.zeros(N, dtype=torch.float32, device=dev)
    dX = torch.zeros((h2.shape[0], H), dtype=cdt, device=dev) if need_dx else None
    dW32 = torch.zeros((V, H), dtype=torch.float32, device=dev) if need_dw else None
    db32 = torch.zeros((V,), dtype=torch.float32, device=dev) if need_db else None
    alpha_flat = alpha.expand(B, T).reshape(-1) if token_local else None

    for idx, rows in plan:
        n = int(idx.numel())
        if n == 0:
            continue
        hrows = idx if row_map is None else row_map.index_select(0, idx)
        x_c = h2.index_select(0, hrows)
        logits_c = _gemm(buf[:n], x_c, weight, bias)
        ids_c = ids_flat.index_select(0, idx)
        logp_c, lse_c = logprob_forward(logits_c, ids_c, None, temp, save_lse=need_grad)
        logp_flat.index_copy_(0, idx, logp_c)
        if not need_grad:
            continue
        with torch.enable_grad():
            leaf = logp_c.detach().requires_grad_(True)
            if rows is None:  # token-local: the chunk is one (1, n) "row" of valid tokens
                def pick(t):
                    return None if t is None else t.reshape(-1).index_select(0, idx)[None]

                loss_c = run_math(
                    token_loss, cfg, compiled, leaf[None], pick(old), pick(adv),
                    torch.ones((1, n), dtype=torch.bool, device=dev), pick(ref), alpha_flat.index_select(0, idx)[None],
                )
            else:  # whole rows r0:r1 (sequence ratios / off-policy sequence mask)
                r0, r1 = rows
                local = idx - r0 * T
                lp_rows = torch.zeros((r1 - r0) * T, dtype=torch.float32, device=dev).index_copy(0, local, leaf)
                sl = slice(r0, r1)
                loss_c = run_math(
                    token_loss, cfg, compiled, lp_rows.view(r1 - r0, T), None if old is None else old[sl], adv[sl],
                    valid[sl], None if ref is None else ref[sl], alpha.expand(B, T)[sl],
                )
            (dlogp,) = torch.autograd.grad(loss_c, leaf, allow_unused=True)
        if dlogp is None:
            dlogp = torch.zeros_like(logp_c)
        dlogits = logprob_backward(logits_c, ids_c, None, lse_c, dlogp, temp, inplace=True)
        if need_dx:
            dX.index_copy_(0, hrows, torch.mm(dlogits, weight))
        if need_dw:
            _acc_mm(dW32, dlogits.t(), x_c)
        if need_db:
            db32.add_(dlogits.sum(0, dtype=torch.float32))
    del buf

    with torch.no_grad():
        out = surrogate_loss(
            cfg, logp_flat.view(B, T), old, st["advantages"], st["mask"],
            group_size=st["group_size"], completion_ids=st["ids"] if st["group_size"] is not None else None,
            ref_logp=ref, num_window_tokens=st["num_window_tokens"],
            num_window_seqs=st["num_window_seqs"], num_micro_batches=st["num_micro_batches"], dp_size=st["dp_size"],
            classes=st["classes"], compile_math=compiled,
        )
    st["signal"], st["metrics"], st["logp"] = out.signal, out.metrics, logp_flat.view(B, T)
    dW = None
    if need_dw:
        dW = dW32 if weight.dtype == torch.float32 else dW32.to(weight.dtype)
        del dW32
    db = None if db32 is None else db32.to(weight.dtype)
    dX = None if dX is None else dX.view(hidden.shape)
    return dX, dW, db, out.loss.detach()


def linear_surrogate_loss(
    cfg_or_loss_fn,
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
    num_window_tokens=None,
    num_window_seqs=None,
    num_micro_batches: int = 1,
    dp_size: int = 1,
    chunk_tokens: int = 4096,
    cu_seqlens: torch.Tensor | None = None,
    compile_math: bool | str = "auto",
) -> SurrogateOutput:
    """The surrogate of ``cfg`` on ``log_softmax((hidden W^T + b) / temperature)[completion_ids]``
    without materialising the ``[N, V]`` logits.

    - ``hidden`` ``(B, T, H)`` or ``(B * T, H)``: the final hidden states aligned with
      ``completion_ids`` (position t predicts ``completion_ids[:, t]``); fp32 / bf16 / fp16.
    - ``weight`` ``(V, H)`` (``lm_head.weight``, same dtype); a frozen weight
      (``requires_grad=False``, e.g. LoRA) skips the dW GEMM.  ``bias`` ``(V,)`` optional.
    - ``chunk_tokens``: valid tokens per chunk (token-level ratios) or ``chunk_tokens // T`` whole
      rows per chunk (sequence ratios / off-policy mask); the chunk buffer is ``[chunk, V]``.
    - ``cu_seqlens`` ``(B + 1,)``: packed (padding-free) inputs: ``hidden`` ``(N, H)`` and
      ``completion_ids`` / ``mask`` (None: all) / ``old_logp`` / ``ref_logp`` ``(N,)``,
      ``advantages`` ``(B,)`` or ``(N,)``; the loss is that of the padded ``(B, T_max)`` batch.
    - ``compile_math``: the per-token math under ``torch.compile`` (``"auto"``: on CUDA; see
      :mod:`grpo_fix.compiled_math`).
    - every other argument is that of :func:`grpo_fix.surrogate_loss`.

    Gradients (dX in the hidden dtype, dW / db accumulated in fp32 and returned in the weight
    dtype) are computed during forward; ``backward()`` only scales them, and can run once.
    """
    cfg = resolve_loss_config(cfg_or_loss_fn)
    row_map = None
    if cu_seqlens is not None:
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
            raise ValueError(f"with cu_seqlens, hidden must be packed (N, H), got {getattr(hidden, 'shape', None)}")
        lay, mask, advantages = PackedLayout.for_inputs(
            cu_seqlens, hidden.shape[0], hidden.device, mask, advantages,
            completion_ids=completion_ids, old_logp=old_logp, ref_logp=ref_logp,
        )
        completion_ids = lay.pad(completion_ids, "completion_ids")
        old_logp, ref_logp = lay.pad(old_logp, "old_logp"), lay.pad(ref_logp, "ref_logp")
        mask = lay.pad(mask.to(torch.bool), "mask", False)
        row_map = lay.index.reshape(-1)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"mask must be (B, T), got {getattr(mask, 'shape', type(mask))}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, T = mask.shape
    _check_linear(hidden, weight, bias, B, T, packed=row_map is not None)
    if completion_ids is None or completion_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("completion_ids must be an int64 / int32 (B, T) tensor")
    dummy = torch.zeros((B, T), dtype=torch.float32, device=hidden.device)
    check_shapes(dummy, old_logp, advantages, mask, group_size, completion_ids, ref_logp)
    if cfg.beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={cfg.beta} needs ref_logp (reference-policy log-probs); pass it or set beta=0")
    for name, t in (("completion_ids", completion_ids), ("mask", mask), ("advantages", advantages),
                    ("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} on {t.device} but hidden on {hidden.device}")

    compiled = use_compiled(compile_math, hidden)
    valid = mask.to(torch.bool)
    classes = prefix_classes_before_launch(completion_ids, group_size, valid)
    adv = token_advantages(cfg, advantages, valid, classes)
    alpha = window_alpha(
        cfg, valid, num_window_tokens=num_window_tokens, num_window_seqs=num_window_seqs,
        num_micro_batches=num_micro_batches, dp_size=dp_size,
    )
    grad_on = torch.is_grad_enabled()
    state = dict(
        cfg=cfg, valid=valid, T=T, ids=completion_ids, adv=adv, alpha=alpha, classes=classes, compiled=compiled,
        old_logp=old_logp, ref_logp=ref_logp,
        advantages=advantages, mask=mask, group_size=group_size, num_window_tokens=num_window_tokens,
        num_window_seqs=num_window_seqs, num_micro_batches=num_micro_batches, dp_size=dp_size,
        token_local=cfg.ratio in TOKEN_LOCAL_RATIOS and cfg.off_policy_mask_threshold is None,
        temperature=float(temperature), chunk_tokens=int(chunk_tokens), row_map=row_map,
        need_dx=grad_on and hidden.requires_grad,
        need_dw=grad_on and weight.requires_grad,
        need_db=grad_on and bias is not None and bias.requires_grad,
    )
    loss = _LinearSurrogate.apply(hidden, weight, bias, state)
    return SurrogateOutput(loss=loss, signal=state["signal"], metrics=state["metrics"])


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
    with ``ids`` ``(B, T)``, or ``(N, H)`` with ``ids`` ``(N,)`` / ``(B, T)``."""
    if ids.dim() not in (1, 2):
        raise ValueError(f"ids must be (B, T) or (N,), got {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids must be int64 or int32, got {ids.dtype}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    ids2 = ids if ids.dim() == 2 else ids[None]
    B, T = ids2.shape
    _check_linear(hidden, weight, bias, B, T)
    if mask is not None and tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} != ids shape {tuple(ids.shape)}")
    N, H, V = B * T, hidden.shape[-1], weight.shape[0]
    valid = torch.ones(N, dtype=torch.bool, device=hidden.device) if mask is None else mask.reshape(-1).to(torch.bool)
    idx_all = valid.nonzero().squeeze(1)
    out = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    if idx_all.numel():
        h2 = hidden.reshape(-1, H)
        ids_flat = ids2.reshape(-1)
        buf = torch.empty((min(chunk_tokens, idx_all.numel()), V), dtype=hidden.dtype, device=hidden.device)
        for idx in idx_all.split(chunk_tokens):
            n = idx.numel()
            logits_c = _gemm(buf[:n], h2.index_select(0, idx), weight, bias)
            lp, _ = logprob_forward(logits_c, ids_flat.index_select(0, idx), None, temperature, save_lse=False)
            out.index_copy_(0, idx, lp)
    return out.view(ids.shape)
