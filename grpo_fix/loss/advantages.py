"""Group-relative advantages (paper Eq. 2, with the std scalings used in practice).

    A_i = r_i - mean_{j in group(i)} r_j                                   (Eq. 2)

optionally divided by the group's std (GRPO R1, DAPO, CISPO, GSPO: the 1/sigma(r) of Table 1's
alpha^S) or by the std of the whole batch (PPO-Lite / TRL's ``scale_rewards="batch"``).  A per-group
constant factor keeps the weighting uniform inside the group, so it does not create prefix bias
(Prop. 1); note that 1/sigma makes alpha*A exactly reward-scale free, which is why Prop. 2's
reward-scale invariance under AdamW matters for the mean-only scaling ``"none"`` (Dr GRPO, v3.2).

Zero-variance groups (all rewards equal) get exactly zero advantage, never NaN, for every scaling.
"""

from __future__ import annotations

from typing import Literal

import torch

RewardScale = Literal["group", "batch", "none"]


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: RewardScale = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Advantages ``(B,)`` for rewards ``(B,)`` laid out as consecutive groups of ``group_size``.

    Args:
        rewards: ``(B,)`` finite rewards (any real dtype; integers are cast to float32).
        group_size: completions per prompt, must divide B.
        scale: ``"group"`` divides by each group's std (Bessel-corrected, as TRL), ``"batch"`` by
            the std of all B rewards, ``"none"`` only centres.
        eps: added to the std (TRL uses 1e-4).
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(
            f"rewards must be a torch.Tensor, got {type(rewards).__name__}; convert it with torch.as_tensor"
        )
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {rewards.numel()} rewards")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    out_dtype = rewards.dtype if rewards.dtype.is_floating_point else torch.float32
    r = rewards.to(torch.float64)  # a wider dtype: rewards near the float32 limit must not overflow
    if r.numel() and not bool(torch.isfinite(r).all()):
        raise ValueError("rewards contain NaN or inf; score unscorable completions explicitly (e.g. 0)")
    if r.numel() == 0:
        return rewards.to(out_dtype).clone()
    grouped = r.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    centred = torch.where(constant, torch.zeros_like(centred), centred)
    if scale == "group":
        centred = centred / _safe_denominator(grouped.std(dim=1, keepdim=True, correction=int(group_size > 1)) + eps)
    elif scale == "batch":
        centred = centred / _safe_denominator(r.std(correction=int(r.numel() > 1)) + eps)
    out = centred.reshape(-1).to(out_dtype)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(
            f"advantages overflow {out_dtype}: centred rewards reach {float(centred.abs().max()):.3g}; "
            "rescale the rewards or use scale='group'"
        )
    return out


def _safe_denominator(d: torch.Tensor) -> torch.Tensor:
    """A std + eps of 0 (constant rewards with eps=0) divides an all-zero numerator: use 1."""
    return torch.where(d > 0, d, torch.ones_like(d))
