"""What ``GRPOFixTrainer`` does to a freshly scored generation batch, before it is buffered.

- **Rewards** must be finite or NaN: TRL reads NaN as "this reward function does not apply to this
  completion" (``nansum`` over functions), and that is kept; ``+-inf`` would make every advantage
  of its group NaN/inf, every step would be skipped (ClipAwareAdamW) or the parameters would become
  NaN (AdamW), so it is refused with the reward function's name (:func:`check_rewards`), and so is
  a finite reward whose square overflows float32 (the group's standard deviation would be inf).
- **Prefix-consistent clipping** (:func:`prefix_consistent_inputs`): the advantages of completions
  that share a prefix inside a group are replaced, on the shared tokens, by their class mean, over
  whole groups (TRL spreads a group over processes: completion ids, masks and advantages are
  gathered, padded to a common length, and this process's rows sliced back).  Per-token vLLM
  importance weights get the same class mean: the members of a class are the same tokens in the
  same context, so their weights differ only by the sampler's numerical noise, and a
  class-consistent weight keeps them clipping, and cancelling (Prop. 1), as one token.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from grpo_fix import prefix_consistent_advantages

#: Largest reward magnitude whose square float32 holds (TRL computes group statistics in float32).
FLOAT32_SQRT_MAX = math.sqrt(torch.finfo(torch.float32).max)


def check_rewards(rewards_per_func: torch.Tensor, names: list[str]) -> None:
    """``ValueError`` naming the reward function and completion of the first reward that is
    ``+-inf``, or finite but so large that its square overflows float32 (TRL's group standard
    deviation would be inf and every advantage of the group 0)."""
    bad = torch.isinf(rewards_per_func.float().square())
    if not bool(bad.any()):
        return
    row, col = (int(i) for i in bad.nonzero()[0])
    value = float(rewards_per_func[row, col])
    why = (
        "an infinite reward makes its group's advantages NaN, so every optimizer step would be skipped"
        if math.isinf(value)
        else "its square overflows float32, so the group's standard deviation is inf and every advantage 0"
    )
    raise ValueError(
        f"reward function {names[col]!r} returned {value:.3g} for completion {row} of the generation batch: rewards "
        f"must be finite and below {FLOAT32_SQRT_MAX:.2g} in magnitude (NaN means 'not applicable' and is skipped, "
        f"as in TRL); {why}. Clip or rescale the reward (e.g. to [-1, 1])."
    )


def prefix_consistent_inputs(
    accelerator: Any, batch: dict[str, Any], mask: torch.Tensor, group_size: int, token_is: bool
) -> None:
    """Replace ``batch["advantages"]`` (and, with ``token_is``, the per-token
    ``batch["importance_sampling_ratio"]``) by their prefix-class means over whole groups, in place."""
    ids, adv = batch["completion_ids"], batch["advantages"]
    B, T = ids.shape
    weights = batch.get("importance_sampling_ratio") if token_is else None
    if accelerator.num_processes > 1:
        # the padding value is irrelevant: padded positions are masked and only follow other ones
        def gather(t: torch.Tensor, pad: float = 0) -> torch.Tensor:
            return accelerator.gather(t if t.dim() == 1 else accelerator.pad_across_processes(t, dim=1, pad_index=pad))

        ids_all, mask_all, adv_all = gather(ids), gather(mask), gather(adv)
        weights_all = None if weights is None else gather(weights, 1)
        start = accelerator.process_index * B
    else:
        ids_all, mask_all, adv_all, weights_all, start = ids, mask, adv, weights, 0
    rows = slice(start, start + B)
    batch["advantages"] = prefix_consistent_advantages(ids_all, adv_all.float(), group_size, mask_all)[rows, :T]
    if weights_all is not None:
        mean = prefix_consistent_advantages(ids_all, weights_all, group_size, mask_all)
        batch["importance_sampling_ratio"] = mean[rows, :T].contiguous()
