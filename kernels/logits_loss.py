"""GRPO-family loss from materialised logits: Triton selected log-probs + the torch surrogate.

The vocab-heavy work (online logsumexp, selected log-prob, softmax gradient written in place into
the logits buffer) runs in the Triton kernels of :mod:`.logprob`; the per-token GRPO math runs in
:func:`grpo_fix.surrogate.surrogate_loss`, the single source of truth, so every preset, weighting,
KL estimator, prefix-consistent variant and the trust-region signal are those of the oracle.
"""

from __future__ import annotations

import torch

from grpo_fix.compiled_math import check_compile_choice
from grpo_fix.config import SurrogateConfig, resolve_config
from grpo_fix.prefix import PrefixClasses, prefix_classes
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


class PackedLayout:
    """Padded ``(B, T_max)`` view of a packed (padding-free) batch described by ``cu_seqlens``.

    ``index[b, t]`` is the packed row of position (b, t) (0 for padding) and ``valid[b, t]`` says
    whether the position exists (``t < len_b``).  Building it needs one host sync (``T_max``).
    """

    def __init__(self, cu_seqlens: torch.Tensor, total: int) -> None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D tensor [0, len_0, len_0 + len_1, ...] of B + 1 offsets")
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
            raise ValueError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
        cu = cu_seqlens.to(torch.int64)
        lengths = cu[1:] - cu[:-1]
        first, last = int(cu[0]), int(cu[-1])
        if first != 0 or last != total or bool((lengths < 0).any()):
            raise ValueError(
                f"cu_seqlens must start at 0, be non-decreasing and end at the packed length {total}; "
                f"got start {first}, end {last}"
            )
        self.B = lengths.numel()
        self.T = max(int(lengths.max()), 1)
        t = torch.arange(self.T, device=cu.device)
        self.valid = t[None, :] < lengths[:, None]
        self.index = torch.where(self.valid, cu[:-1, None] + t[None, :], torch.zeros((), dtype=torch.int64,
                                                                                     device=cu.device))

    def pad(self, x: torch.Tensor | None, name: str, fill=0) -> torch.Tensor | None:
        """A packed ``(N,)`` tensor as ``(B, T_max)`` (differentiable gather; ``fill`` at padding)."""
        if x is None:
            return None
        if x.dim() != 1:
            raise ValueError(f"with cu_seqlens, {name} must be packed (N,), got {tuple(x.shape)}")
        out = x[self.index]
        return torch.where(self.valid, out, torch.full((), fill, dtype=x.dtype, device=x.device))


    @classmethod
    def for_inputs(cls, cu_seqlens: torch.Tensor, total: int, device, mask, advantages, **packed):
        """Validate packed ``(N,)`` inputs and build the layout; returns ``(layout, mask, advantages)``
        with a default all-true mask and per-token packed advantages padded to ``(B, T_max)``."""
        if mask is None:
            mask = torch.ones(total, dtype=torch.bool, device=device)
        _check_packed_len(total, mask=mask, **packed)
        lay = cls(cu_seqlens.to(device), total)
        if advantages.dim() == 1 and advantages.shape[0] == total and total != lay.B:
            advantages = lay.pad(advantages, "advantages")
        return lay, mask, advantages


def _check_packed_len(layout_total: int, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and (t.dim() != 1 or t.shape[0] != layout_total):
            raise ValueError(f"with cu_seqlens, {name} must be packed ({layout_total},), got {tuple(t.shape)}")


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
    cu_seqlens: torch.Tensor | None = None,
    compile_math: bool | str = "auto",
) -> SurrogateOutput:
    """The surrogate of ``cfg`` on ``log_softmax(logits / temperature)[completion_ids]``.

    - ``logits``: ``(B, T, V)`` or ``(B, T + 1, V)`` (the model output with ``logits_to_keep=T+1``;
      the last position is ignored and gets a zero gradient), any float dtype, any row strides,
      vocab stride 1.  With ``inplace_backward=True`` (default) the gradient is written into the
      logits buffer during backward: do not read the logits after ``backward()``.
    - ``completion_ids`` ``(B, T)``: the target ids; also used for prefix-consistent advantages
      and W_agg when ``group_size`` is given (whole groups).
    - every other argument is that of :func:`grpo_fix.surrogate_loss`.

    - ``cu_seqlens`` ``(B + 1,)``: packed (padding-free) inputs: ``logits`` ``(N, V)``,
      ``completion_ids`` / ``mask`` / ``old_logp`` / ``ref_logp`` ``(N,)`` (``mask`` may be None:
      all tokens), ``advantages`` ``(B,)`` or ``(N,)``; sequence b is rows
      ``cu_seqlens[b]:cu_seqlens[b+1]``.  The loss is that of the padded ``(B, T_max)`` batch.
    - ``compile_math``: the per-token math under ``torch.compile`` (``"auto"``: on CUDA; see
      :mod:`grpo_fix.compiled_math`).

    Everything that needs a host sync and does not depend on the log-probs (the packed layout,
    the prefix classes) runs before the kernel is launched; the value checks are read after the
    forward math is queued (:func:`grpo_fix.surrogate_loss`).

    Returns the :class:`SurrogateOutput` of :func:`grpo_fix.surrogate_loss` (loss with grad to
    ``logits``, signal, metrics).
    """
    cfg = resolve_loss_config(cfg_or_loss_fn)
    check_compile_choice(compile_math)
    if cu_seqlens is not None:
        if logits.dim() != 2:
            raise ValueError(f"with cu_seqlens, logits must be packed (N, V), got {tuple(logits.shape)}")
        lay, mask, advantages = PackedLayout.for_inputs(
            cu_seqlens, logits.shape[0], logits.device, mask, advantages,
            completion_ids=completion_ids, old_logp=old_logp, ref_logp=ref_logp,
        )
        valid = lay.pad(mask.to(torch.bool), "mask", False)
        ids_padded = lay.pad(completion_ids, "completion_ids") if group_size is not None else None
        classes = prefix_classes_before_launch(ids_padded, group_size, valid)
        logp_packed = selective_logprob(logits, completion_ids, mask, temperature, inplace=inplace_backward)
        return surrogate_loss(
            cfg,
            lay.pad(logp_packed, "logp"),
            lay.pad(old_logp, "old_logp"),
            advantages,
            valid,
            group_size=group_size,
            completion_ids=ids_padded,
            ref_logp=lay.pad(ref_logp, "ref_logp"),
            num_window_tokens=num_window_tokens,
            num_window_seqs=num_window_seqs,
            num_micro_batches=num_micro_batches,
            dp_size=dp_size,
            classes=classes,
            compile_math=compile_math,
        )
    if completion_ids.dim() != 2 or logits.dim() != 3:
        raise ValueError(
            f"logits_surrogate_loss needs logits (B, T, V) and completion_ids (B, T), got {tuple(logits.shape)} "
            f"and {tuple(completion_ids.shape)}"
        )
    if tuple(mask.shape) != tuple(completion_ids.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} != completion_ids shape {tuple(completion_ids.shape)}")
    classes = prefix_classes_before_launch(completion_ids, group_size, mask)
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
        classes=classes,
        compile_math=compile_math,
    )


def prefix_classes_before_launch(
    completion_ids: torch.Tensor | None, group_size: int | None, mask
) -> PrefixClasses | None:
    """The prefix classes of ``completion_ids`` (None without ``group_size``), found before the
    kernels are launched because finding them (``torch.unique``) syncs with the host."""
    if completion_ids is None or not group_size:
        return None
    return prefix_classes(completion_ids, group_size, mask)
