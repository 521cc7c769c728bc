"""The clip-aware AdamW step as multi-tensor Triton kernels (CUDA): one launch per param group.

Per element (all math in fp32; parameters fp32 / bf16 / fp16, state fp32 or the parameter's
dtype, loaded values cast to fp32 and results cast back)::

    p <- p * (1 - lr * wd)                          decoupled weight decay (lr NOT scaled by alpha)
    m <- beta1 * m_scale * m + (1 - beta1) * g      m_scale = kappa * pending momentum scale
    v <- beta2 * v + (1 - beta2) * g * g
    p <- p - (lr * alpha / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)

with ``bc1 = 1 - beta1^t``, ``bc2 = 1 - beta2^t`` and ``t`` the tensor's step count after this
step.  With ``m_scale == 1`` and ``alpha == 1`` this is ``torch.optim.AdamW``'s update (the
operation order of torch's single-tensor / foreach path).

Launch layout: the tensors of one call are cut into chunks of :data:`CHUNK` elements.  A chunk
table (tensor index, chunk number; built on the host with integer arithmetic, cached per layout)
gives one program per chunk, and an offset table (each tensor's p, g, m, v and step as element
offsets from the first tensor of their kind, passed as the base pointers; rebuilt per call
because gradients move) lets one launch cover every tensor of one dtype combination: in
practice one launch per param group.  Offsets from a base pointer keep Triton's alignment
analysis: when every offset is a multiple of 16 bytes (checked on the host) the kernel says so
and its loads and stores are 128-bit.  Each program reads its tensor's step count on the device
and computes the bias corrections there (fp64), so the step counts live on the parameters'
device and the host never reads them; then it updates its chunk in blocks of :data:`BLOCK` (7
memory accesses per element, AdamW's bandwidth floor).

Skipping without a host sync (torch's ``found_inf`` pattern): :func:`nonfinite_check_` reads
every gradient once and clears a device flag ``ok`` (a 0-dim fp32 tensor, 1 = step) on a NaN
or an infinity; :func:`adamw_step_` given ``ok`` makes every program read it and touch nothing
when it is 0, and advances the step counts by ``ok``.

``triton`` is imported lazily: importing this module never requires it.  Under
``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (the tests; pointers are host
addresses there; the interpreter's bf16 arithmetic is wrong, hence the fp32 casts).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

__all__ = ["BLOCK", "CHUNK", "adamw_step_", "nonfinite_check_", "triton_available"]

#: Elements per block of a program's loop.
BLOCK = 1024
#: Elements per program (a multiple of BLOCK).
CHUNK = 64 * BLOCK


@functools.cache
def _kernel() -> tuple[Any, Any]:
    """The update kernel and the triton module (defined on first use)."""
    import triton
    import triton.language as tl

    # Triton types the kernel's arguments (pointers, scalars, constexprs)
    @triton.jit
    def _clip_aware_adamw_kernel(  # type: ignore[no-untyped-def]
        p_base,  # the first tensor of each kind: the offsets below are relative to them
        g_base,
        m_base,
        v_base,
        step_base,
        offsets,  # int64 [N, 5]: element offsets of each tensor's p, g, m, v, step
        sizes,  # int64 [N]
        m_scales,  # fp32 [N]
        chunks,  # int32 [C, 2]: tensor index, chunk number
        ok_ptr,  # fp32 0-dim: 1 = step, 0 = skip (read only when HAS_OK)
        decay,  # 1 - lr * weight_decay
        step_lr,  # lr * alpha
        beta1,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        log_beta1,  # ln(beta1) (-inf for beta1 == 0)
        log_beta2,
        eps,
        P_ALIGN: tl.constexpr,  # elements per 16 bytes (offsets are multiples of it when ALIGNED)
        G_ALIGN: tl.constexpr,
        S_ALIGN: tl.constexpr,
        HAS_OK: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        ALIGNED: tl.constexpr,
        CHUNK_SIZE: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        c = tl.program_id(0)
        i = tl.load(chunks + 2 * c).to(tl.int64)
        start = tl.load(chunks + 2 * c + 1).to(tl.int64) * CHUNK_SIZE
        n = tl.load(sizes + i)
        if HAS_OK:  # a skipped step masks every access: nothing loaded, nothing stored
            n = tl.where(tl.load(ok_ptr) != 0.0, n, 0)
        row = offsets + 5 * i
        p_off, g_off = tl.load(row), tl.load(row + 1)
        m_off, v_off = tl.load(row + 2), tl.load(row + 3)
        if ALIGNED:
            p_off = tl.multiple_of(p_off, P_ALIGN)
            g_off = tl.multiple_of(g_off, G_ALIGN)
            m_off = tl.multiple_of(m_off, S_ALIGN)
            v_off = tl.multiple_of(v_off, S_ALIGN)
        p_ptr, g_ptr = p_base + p_off, g_base + g_off
        m_ptr, v_ptr = m_base + m_off, v_base + v_off
        # bias corrections of this tensor's step t (after the increment), in fp64 on the device
        t = tl.load(step_base + tl.load(row + 4)).to(tl.float64) + 1.0
        bc1 = 1.0 - tl.exp(t * log_beta1)  # the fp32 scalars promote to fp64 exactly
        bc2 = 1.0 - tl.exp(t * log_beta2)
        step_size = (step_lr / bc1).to(tl.float32)
        bc2_sqrt = tl.sqrt(bc2).to(tl.float32)
        beta1_m = beta1 * tl.load(m_scales + i)
        limit = tl.minimum(n - start, CHUNK_SIZE)  # this chunk's elements (<= 0 when skipped)
        full = (limit // BLOCK_SIZE) * BLOCK_SIZE
        # whole blocks unmasked (a mask built from a loaded size defeats 128-bit accesses), then
        # the masked tail; TAIL is a compile-time constant of each unrolled pass
        for TAIL in tl.static_range(2):
            for off in range(full * TAIL, full + (limit - full) * TAIL, BLOCK_SIZE):
                offs = start + off + tl.arange(0, BLOCK_SIZE)
                mask, other = None, None
                if TAIL:
                    mask, other = offs < n, 0.0
                p = tl.load(p_ptr + offs, mask=mask, other=other).to(tl.float32)
                g = tl.load(g_ptr + offs, mask=mask, other=other).to(tl.float32)
                m = tl.load(m_ptr + offs, mask=mask, other=other).to(tl.float32)
                v = tl.load(v_ptr + offs, mask=mask, other=other).to(tl.float32)
                if MAXIMIZE:
                    g = -g
                p = p * decay
                m = beta1_m * m + one_minus_beta1 * g
                v = beta2 * v + one_minus_beta2 * (g * g)
                # IEEE round-to-nearest sqrt/div (tl.sqrt and "/" lower to approximate PTX ops);
                # the kernel is bandwidth-bound, so exact rounding costs nothing measurable
                denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
                p = p - step_size * tl.div_rn(m, denom)
                tl.store(p_ptr + offs, p.to(p_base.dtype.element_ty), mask=mask)
                tl.store(m_ptr + offs, m.to(m_base.dtype.element_ty), mask=mask)
                tl.store(v_ptr + offs, v.to(v_base.dtype.element_ty), mask=mask)

    return _clip_aware_adamw_kernel, triton


@functools.cache
def _check_kernel() -> Any:
    """The non-finite check kernel (defined on first use)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _nonfinite_kernel(  # type: ignore[no-untyped-def]
        x_base,
        offsets,  # int64 [N, 5]: column 0 is each tensor's element offset from x_base
        sizes,
        chunks,
        ok_ptr,  # fp32 0-dim: set to 0 on a NaN or an infinity
        X_ALIGN: tl.constexpr,
        ALIGNED: tl.constexpr,
        CHUNK_SIZE: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        c = tl.program_id(0)
        i = tl.load(chunks + 2 * c).to(tl.int64)
        start = tl.load(chunks + 2 * c + 1).to(tl.int64) * CHUNK_SIZE
        n = tl.load(sizes + i)
        x_off = tl.load(offsets + 5 * i)
        if ALIGNED:
            x_off = tl.multiple_of(x_off, X_ALIGN)
        x_ptr = x_base + x_off
        bad = tl.zeros((BLOCK_SIZE,), dtype=tl.int32)
        limit = tl.minimum(n - start, CHUNK_SIZE)
        full = (limit // BLOCK_SIZE) * BLOCK_SIZE
        for TAIL in tl.static_range(2):  # whole blocks unmasked (128-bit loads), then the tail
            for off in range(full * TAIL, full + (limit - full) * TAIL, BLOCK_SIZE):
                offs = start + off + tl.arange(0, BLOCK_SIZE)
                mask, other = None, None
                if TAIL:
                    mask, other = offs < n, 0.0
                x = tl.load(x_ptr + offs, mask=mask, other=other).to(tl.float32)
                bad += ((x != x) | (tl.abs(x) > 3.4028234663852886e38)).to(tl.int32)  # NaN, +-inf
        tl.store(ok_ptr, 0.0, mask=tl.sum(bad, axis=0) > 0)

    return _nonfinite_kernel


def triton_available() -> bool:
    """True when triton imports (the kernels additionally need CUDA tensors or TRITON_INTERPRET=1)."""
    try:
        _kernel()
    except Exception:  # ImportError, or a broken triton install
        return False
    return True


@functools.lru_cache(maxsize=64)
def _chunk_table(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int32 ``[C, 2]``: (tensor index, chunk number) of every chunk of tensors of ``sizes``."""
    rows = [(i, k) for i, n in enumerate(sizes) for k in range((n + CHUNK - 1) // CHUNK)]
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 2).to(device)


#: per dtype combination: tensor indices, offset table, sizes, chunk table, 16-byte aligned
_Layout = tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor, bool]


def _layouts(columns: list[list[torch.Tensor]]) -> list[_Layout]:
    """Split the tensors (``columns[k][i]``: kind ``k`` of tensor ``i``; five kinds) by dtype
    combination; per split: the tensor indices, the element offsets of every tensor from the
    split's first tensor of its kind (int64 ``[N, 5]``), the sizes, the chunk table, and whether
    the first four kinds' bases and offsets are all multiples of 16 bytes."""
    by_dtypes: dict[tuple[torch.dtype, ...], list[int]] = {}
    for i in range(len(columns[0])):
        by_dtypes.setdefault(tuple(col[i].dtype for col in columns), []).append(i)
    out = []
    device = columns[0][0].device
    for idx in by_dtypes.values():
        bases = [col[idx[0]].data_ptr() for col in columns]
        aligned = all(b % 16 == 0 for b in bases[:4])
        rows = []
        for i in idx:
            deltas = [col[i].data_ptr() - b for col, b in zip(columns, bases)]
            aligned = aligned and all(d % 16 == 0 for d in deltas[:4])
            rows.append([d // col[i].element_size() for d, col in zip(deltas, columns)])
        sizes = tuple(columns[0][i].numel() for i in idx)
        table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
        sizes_t = torch.tensor(sizes, dtype=torch.int64).to(device, non_blocking=True)
        out.append((idx, table, sizes_t, _chunk_table(sizes, device), aligned))
    return out


def _check_tensors(
    params: list[torch.Tensor], others: list[list[torch.Tensor]], state_steps: list[torch.Tensor]
) -> None:
    for k, p in enumerate(params):
        for t in [o[k] for o in others]:
            if not t.is_contiguous() or t.numel() != p.numel() or t.device != p.device:
                raise ValueError("adamw_step_ needs contiguous tensors of one size and device per parameter")
        if state_steps[k].device != p.device or state_steps[k].dtype != torch.float32:
            raise ValueError("adamw_step_ needs float32 step counts on the parameters' device")


def nonfinite_check_(tensors: list[torch.Tensor], ok: torch.Tensor) -> None:
    """Set the 0-dim fp32 ``ok`` (on the tensors' device) to 0 if any element of ``tensors`` is
    NaN or infinite (one read of each; one launch per dtype); leave it unchanged otherwise."""
    live = [t for t in tensors if t.numel()]
    if not live:
        return
    kernel = _check_kernel()
    for idx, offsets, sizes, chunks, aligned in _layouts([live] * 5):
        x = live[idx[0]]
        kernel[(chunks.shape[0],)](
            x,
            offsets,
            sizes,
            chunks,
            ok,
            X_ALIGN=16 // x.element_size(),
            ALIGNED=aligned,
            CHUNK_SIZE=CHUNK,
            BLOCK_SIZE=BLOCK,
        )


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
    ok: torch.Tensor | None = None,
) -> None:
    """In-place clip-aware AdamW step on every tensor (module docstring), one launch per dtype
    combination; advances ``state_steps`` (0-dim fp32 tensors on the parameters' device) by 1,
    or by ``ok`` when given (the 0-dim fp32 flag of :func:`nonfinite_check_`: at 0 nothing is
    touched and the steps stay).

    ``m_scales[i]`` multiplies the carried first moment of tensor ``i`` (the gate's kappa times
    any pending momentum scale); ``alpha`` scales the Adam step but not the weight decay.
    """
    _check_tensors(params, [grads, exp_avgs, exp_avg_sqs], state_steps)
    live = [i for i, p in enumerate(params) if p.numel()]
    if live:
        kernel, _ = _kernel()
        cols = [[x[i] for i in live] for x in (params, grads, exp_avgs, exp_avg_sqs, state_steps)]
        scales = torch.tensor([float(m_scales[i]) for i in live], dtype=torch.float32)
        for idx, offsets, sizes, chunks, aligned in _layouts(cols):
            first = [col[idx[0]] for col in cols]
            kernel[(chunks.shape[0],)](
                *first,
                offsets,
                sizes,
                scales[idx].to(first[0].device, non_blocking=True),
                chunks,
                ok if ok is not None else sizes,  # any device pointer when HAS_OK is False (never read)
                1.0 - lr * weight_decay,
                lr * alpha,
                beta1,
                1.0 - beta1,
                beta2,
                1.0 - beta2,
                math.log(beta1) if beta1 > 0 else -math.inf,
                math.log(beta2) if beta2 > 0 else -math.inf,
                eps,
                P_ALIGN=16 // first[0].element_size(),
                G_ALIGN=16 // first[1].element_size(),
                S_ALIGN=16 // first[2].element_size(),
                HAS_OK=ok is not None,
                MAXIMIZE=bool(maximize),
                ALIGNED=aligned,
                CHUNK_SIZE=CHUNK,
                BLOCK_SIZE=BLOCK,
            )
    if state_steps:  # by the flag as a tensor list (a tensor scalar would be read on the host)
        torch._foreach_add_(state_steps, [ok] * len(state_steps) if ok is not None else 1.0)
