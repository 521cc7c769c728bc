"""Input checks of the public loss entry points: clear ``ValueError`` messages, never a silent NaN.

Shape/dtype checks are static and always run.  Value checks (non-finite log-probs at valid
positions, a mask that is not 0/1, a window count smaller than the call's own tokens) need one
host synchronisation; they run in eager mode and are skipped while ``torch.compile`` traces, so
the compiled common path has no graph break.  Non-finite values at *masked* positions are
allowed: they are replaced before any arithmetic, so they cannot leak into the loss or gradient.
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


def check_values(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None,
    num_window_tokens: torch.Tensor | int | float | None,
) -> None:
    """Value checks with a single host sync; skipped under ``torch.compile`` tracing."""
    if torch.compiler.is_compiling() or logp.numel() == 0:
        return
    valid = mask.to(torch.bool)
    flags = [
        ((mask != 0) & (mask != 1)).any() if mask.dtype != torch.bool else torch.zeros((), dtype=torch.bool),
        (~torch.isfinite(logp) & valid).any(),
        (~torch.isfinite(old_logp) & valid).any() if old_logp is not None else torch.zeros((), dtype=torch.bool),
        (~torch.isfinite(ref_logp) & valid).any() if ref_logp is not None else torch.zeros((), dtype=torch.bool),
        (~torch.isfinite(advantages)).any(),
        (valid.sum() > num_window_tokens)
        if num_window_tokens is not None
        else torch.zeros((), dtype=torch.bool),
    ]
    bad = torch.stack([f.to(torch.bool).reshape(()).cpu() for f in flags]).tolist()
    messages = (
        "mask must contain only 0 and 1",
        "logp has NaN/inf at valid (mask=1) positions",
        "old_logp has NaN/inf at valid (mask=1) positions",
        "ref_logp has NaN/inf at valid (mask=1) positions",
        "advantages contain NaN/inf",
        "num_window_tokens is smaller than the valid tokens of this call; it must count the whole optimizer "
        "window (all micro-batches, all ranks)",
    )
    errors = [m for m, b in zip(messages, bad) if b]
    if errors:
        raise ValueError("; ".join(errors))
