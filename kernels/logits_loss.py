"""GRPO-family loss from materialised logits: Triton selected log-probs + the torch surrogate.

The vocab-heavy work (online logsumexp, selected log-prob, softmax gradient written in place into
the logits buffer) runs in the Triton kernels of :mod:`.logprob`; the per-token GRPO math runs in
:func:`grpo_fix.surrogate.surrogate_loss`, the single source of truth, so every preset, weighting,
KL estimator, prefix-consistent variant and the trust-region signal are those of the oracle.
"""

from __future__ import annotations

import torch

from grpo_fix.config import SurrogateConfig, resolve_config
from grpo_fix.surrogate import GroupSurrogateLoss, SurrogateOutput, surrogate_loss

from .logprob import selective_logprob


def resolve_loss_config(cfg_or_loss_fn) -> SurrogateConfig:
    """A :class:`SurrogateConfig`, a preset name, or a :class:`GroupSurrogateLoss` -> its config."""
    if isinstance(cfg_or_loss_fn, GroupSurrogateLoss):
        return cfg_or_loss_fn.config
    if isinstance(cfg_or_loss_fn, (SurrogateConfig, str)) or cfg_or_loss_fn is None:
        return resolve_config(cfg_or_loss_fn)
    raise ValueError(
        f"expected a SurrogateConfig, a preset name or a GroupSurrogateLoss, got {type(cfg_or_loss_fn).__name__}"
    )


def logits_surrogate_loss(
    cfg_or_loss_fn,
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    group_size: int | None,
    temperature: float = 1.0,
    ref_logp: torch.Tensor | None = None,
    num_window_tokens=None,
    num_window_seqs=None,
    num_micro_batches: int = 1,
    dp_size: int = 1,
    inplace_backward: bool = True,
) -> SurrogateOutput:
    """The surrogate of ``cfg`` on ``log_softmax(logits / temperature)[completion_ids]``.

    - ``logits``: ``(B, T, V)`` or ``(B, T + 1, V)`` (the model output with ``logits_to_keep=T+1``;
      the last position is ignored and gets a zero gradient), any float dtype, any row strides,
      vocab stride 1.  With ``inplace_backward=True`` (default) the gradient is written into the
      logits buffer during backward: do not read the logits after ``backward()``.
    - ``completion_ids`` ``(B, T)``: the target ids; also used for prefix-consistent advantages
      and W_agg when ``group_size`` is given (whole groups).
    - every other argument is that of :func:`grpo_fix.surrogate_loss`.

    Returns the :class:`SurrogateOutput` of :func:`grpo_fix.surrogate_loss` (loss with grad to
    ``logits``, signal, metrics).
    """
    cfg = resolve_loss_config(cfg_or_loss_fn)
    if completion_ids.dim() != 2 or logits.dim() != 3:
        raise ValueError(
            f"logits_surrogate_loss needs logits (B, T, V) and completion_ids (B, T), got {tuple(logits.shape)} "
            f"and {tuple(completion_ids.shape)}"
        )
    if tuple(mask.shape) != tuple(completion_ids.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} != completion_ids shape {tuple(completion_ids.shape)}")
    logp = selective_logprob(logits, completion_ids, mask, temperature, inplace=inplace_backward)
    return surrogate_loss(
        cfg,
        logp,
        old_logp,
        advantages,
        mask,
        group_size=group_size,
        completion_ids=completion_ids if group_size is not None else None,
        ref_logp=ref_logp,
        num_window_tokens=num_window_tokens,
        num_window_seqs=num_window_seqs,
        num_micro_batches=num_micro_batches,
        dp_size=dp_size,
    )
