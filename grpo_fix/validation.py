"""Input checks of the public loss entry points: clear ``ValueError`` messages, never a silent NaN.

Shape/dtype checks are static and always run.  Value checks (non-finite log-probs at valid
positions, a mask that is not 0/1, a window count smaller than the call's own tokens) need one
host synchronisation: :func:`value_flags` computes them on the device, :func:`raise_on_bad_values`
reads them once the forward math is queued.  They run in eager mode and are skipped while
``torch.compile`` traces, so the compiled common path has no graph break.  Non-finite values at
*masked* positions are allowed: they are replaced before any arithmetic, so they cannot leak into
the loss or gradient.
"""

from __future__ import annotations

import torch


def _is_float(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point


def check_shapes(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    group_size: int | None,
    completion_ids: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
) -> None:
    """Static checks (shapes, dtypes, group layout)."""
    if not isinstance(logp, torch.Tensor) or logp.dim() != 2:
        raise ValueError(f"logp must be a (B, T) tensor, got {getattr(logp, 'shape', type(logp))}")
    if not _is_float(logp):
        raise ValueError(f"logp must be a floating tensor, got {logp.dtype}")
    shape = tuple(logp.shape)
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != logp shape {shape}")
        if not _is_float(t):
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != logp shape {shape}")
    if mask.dtype.is_complex:
        raise ValueError(f"mask must be bool or 0/1 numeric, got {mask.dtype}")
    if not (advantages.dim() == 1 and advantages.shape[0] == shape[0]) and tuple(advantages.shape) != shape:
        raise ValueError(f"advantages must be (B,) = ({shape[0]},) or (B, T) = {shape}, got {tuple(advantages.shape)}")
    if not _is_float(advantages):
        raise ValueError(f"advantages must be a floating tensor, got {advantages.dtype}")
    if completion_ids is not None:
        if tuple(completion_ids.shape) != shape:
            raise ValueError(f"completion_ids shape {tuple(completion_ids.shape)} != logp shape {shape}")
        if completion_ids.dtype.is_floating_point or completion_ids.dtype == torch.bool:
            raise ValueError(f"completion_ids must be an integer tensor, got {completion_ids.dtype}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
        if shape[0] % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide the batch of {shape[0]} rows; groups are consecutive "
                "blocks of group_size rows. If this micro-batch holds partial groups, precompute per-token "
                "advantages with prefix_consistent_advantages() over whole groups and pass group_size=None."
            )


def value_flags(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None,
    num_window_tokens: torch.Tensor | int | float | None,
) -> torch.Tensor | None:
    """The value checks as one bool vector on the inputs' device (no host sync; see
    :data:`VALUE_CHECKS` for what each entry means).  ``None`` while ``torch.compile`` traces or
    for an empty batch: nothing to check."""
    if torch.compiler.is_compiling() or logp.numel() == 0:
        return None
    valid = mask.to(torch.bool)
    no = torch.zeros((), dtype=torch.bool, device=logp.device)
    flags = [
        ((mask != 0) & (mask != 1)).any() if mask.dtype != torch.bool else no,
        (~torch.isfinite(logp) & valid).any(),
        (~torch.isfinite(old_logp) & valid).any() if old_logp is not None else no,
        (~torch.isfinite(ref_logp) & valid).any() if ref_logp is not None else no,
        (~torch.isfinite(advantages)).any(),
        (valid.sum() > num_window_tokens) if num_window_tokens is not None else no,
    ]
    return torch.stack([f.to(device=logp.device, dtype=torch.bool).reshape(()) for f in flags])


#: What each entry of :func:`value_flags` reports when it is set.
VALUE_CHECKS = (
    "mask must contain only 0 and 1",
    "logp has NaN/inf at valid (mask=1) positions",
    "old_logp has NaN/inf at valid (mask=1) positions",
    "ref_logp has NaN/inf at valid (mask=1) positions",
    "advantages contain NaN/inf",
    "num_window_tokens is smaller than the valid tokens of this call; it must count the whole optimizer "
    "window (all micro-batches, all ranks)",
)


def raise_on_bad_values(flags: torch.Tensor | None) -> None:
    """Read the flags of :func:`value_flags` (the one host sync) and raise ``ValueError`` naming
    every failed check.  Callers read them after queueing the forward math, so that on CUDA the
    sync waits for work already queued instead of stalling the GPU while the math is launched."""
    if flags is None or not flags.any().item():
        return
    raise ValueError("; ".join(m for m, bad in zip(VALUE_CHECKS, flags.tolist()) if bad))
