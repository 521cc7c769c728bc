"""TRL 1.16's entropy mask and entropy bonus, handed to the grpo_fix loss as call arguments.

- The **entropy mask** (``top_entropy_quantile < 1``) is TRL's own
  ``get_high_entropy_mask`` (the quantile over every process's valid tokens); it becomes the
  loss's ``policy_mask``, so only high-entropy tokens get a policy gradient, and the entropy
  bonus acts on the same tokens.
- The **entropy bonus** ``- coef * mean H`` is the loss's ``entropy`` / ``entropy_coef``
  arguments (averaged as ``GRPOFixConfig.entropy_weighting`` says).  With
  ``use_adaptive_entropy`` the coefficient follows TRL's controller (Skywork-OR1): the window's
  global token-mean entropy is measured over every micro-batch and process, and at the end of the
  window ``entropy_coef`` moves by ``entropy_coef_delta`` towards ``entropy_target``; the bonus is
  applied only while the last measured entropy is at or below the target.  The controller state
  lives in TRL's own attributes (``entropy_coef``, ``_last_world_entropy``,
  ``_entropy_window_stats``), which TRL's checkpoints save and restore.
"""

from __future__ import annotations

from typing import Any

import torch


def entropy_policy_mask(trainer: Any, entropies: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    """TRL's high-entropy token mask as a float policy mask (None when ``top_entropy_quantile >= 1``)."""
    if trainer.top_entropy_quantile >= 1.0 or entropies is None:
        return None
    return trainer.get_high_entropy_mask(entropies, mask, 1 - trainer.top_entropy_quantile).to(entropies.dtype)


def bonus_enabled(trainer: Any) -> bool:
    return bool(trainer._entropy_bonus_enabled)


def bonus_coefficient(trainer: Any) -> float:
    """The coefficient every micro-batch of the current window applies (0 when the adaptive
    controller's last measured entropy is above ``entropy_target``)."""
    if not bonus_enabled(trainer):
        return 0.0
    if trainer.use_adaptive_entropy and trainer._last_world_entropy > trainer.args.entropy_target:
        return 0.0
    return float(trainer.entropy_coef)


def observe_entropy(trainer: Any, entropies: torch.Tensor, effective_mask: torch.Tensor, window_end: bool) -> None:
    """Add a training micro-batch to the adaptive controller's window; at ``window_end`` update
    ``entropy_coef`` from the window's global mean entropy (one all-reduce)."""
    if not trainer.use_adaptive_entropy:
        return
    stats = torch.stack([(entropies * effective_mask).sum(), effective_mask.sum()]).detach()
    previous = trainer._entropy_window_stats
    trainer._entropy_window_stats = stats if previous is None else previous + stats
    if not window_end:
        return
    totals = trainer.accelerator.reduce(trainer._entropy_window_stats, reduction="sum")
    world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
    args = trainer.args
    if world_entropy <= args.entropy_target:
        trainer.entropy_coef = min(trainer.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
    else:
        trainer.entropy_coef = max(trainer.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
    trainer._last_world_entropy = world_entropy
    trainer._entropy_window_stats = None
