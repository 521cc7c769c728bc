"""The surrogate from materialised logits: selected log-probs (Triton kernel or torch reference),
then the one GRPO math of :func:`grpo_fix.surrogate_loss`."""

from __future__ import annotations

from typing import Any

import torch

from ..kernels.checks import IDS_OUT_OF_RANGE, check_logits, check_temperature, ids_out_of_range
from ..kernels.logprob import selective_logprob
from ..kernels.reference import selective_logprob_reference
from ..options import Backend, CompileMath
from ..window import Window
from .backend import LossSpec, loss_config, use_triton
from .packed import PackedLayout
from .prefix import PrefixClasses, prefix_classes
from .surrogate import SurrogateOutput, check_call, surrogate_loss
from .validation import Checks, ValueChecks


def vocab_logprob(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    *,
    triton: bool,
    inplace: bool,
) -> torch.Tensor:
    """Differentiable selected log-probs on the chosen backend (inputs already checked)."""
    if triton:
        return selective_logprob(logits, ids, mask, temperature, inplace, check_values=False)
    return selective_logprob_reference(logits, ids, mask, temperature, check_values=False)


def classes_before_launch(
    completion_ids: torch.Tensor | None, group_size: int | None, mask: torch.Tensor
) -> PrefixClasses | None:
    """The prefix classes (None without ``group_size``), found before the kernels are launched
    because finding them (``torch.unique``) syncs with the host."""
    if completion_ids is None or not group_size:
        return None
    return prefix_classes(completion_ids, group_size, mask)


def logits_surrogate_loss(
    cfg_or_loss_fn: LossSpec,
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    group_size: int | None,
    temperature: float = 1.0,
    ref_logp: torch.Tensor | None = None,
    window: Window | None = None,
    is_ratio: torch.Tensor | None = None,
    policy_mask: torch.Tensor | None = None,
    inplace_backward: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    compile_math: CompileMath = "auto",
    backend: Backend = "auto",
    checks: Checks = "eager",
    **legacy_window: Any,
) -> SurrogateOutput:
    """The surrogate of ``cfg_or_loss_fn`` on ``log_softmax(logits / temperature)[completion_ids]``.

    - ``cfg_or_loss_fn``: a :class:`~grpo_fix.SurrogateConfig`, a preset name or a
      :class:`~grpo_fix.GroupSurrogateLoss`.
    - ``logits``: ``(B, T, V)`` or ``(B, T + 1, V)`` (the model output with ``logits_to_keep=T+1``;
      the last position is ignored and gets a zero gradient), any float dtype (the Triton kernels:
      fp32 / bf16 / fp16), any row strides.  With the Triton backend and ``inplace_backward=True``
      (default) the gradient is written into the logits buffer during backward: do not read the
      logits after ``backward()``, which runs once.
    - ``completion_ids`` ``(B, T)``: the target ids (anything at masked positions, ``-100``
      included); also used for prefix-consistent advantages and W_agg with ``group_size``.
    - ``cu_seqlens`` ``(B + 1,)``: packed (padding-free) inputs: ``logits`` ``(N, V)``,
      ``completion_ids`` / ``mask`` / ``old_logp`` / ``ref_logp`` ``(N,)`` (``mask`` may be None:
      all tokens), ``advantages``, ``is_ratio`` and ``policy_mask`` ``(B,)`` or ``(N,)``; the loss
      is that of the padded batch.
    - ``backend``: ``"auto"`` (Triton for CUDA tensors), ``"torch"`` or ``"triton"``
      (:mod:`grpo_fix.options`); both check their inputs the same way.
    - every other argument is that of :func:`grpo_fix.surrogate_loss`.

    What syncs and does not depend on the log-probs (the packed layout, the prefix classes) runs
    before the kernel launch; the value checks, out-of-range token ids included, are read once
    after the forward math is queued (``checks="eager"``) or left to the caller.
    """
    cfg = loss_config(cfg_or_loss_fn)
    win = Window.resolve(window, legacy_window)
    temperature = check_temperature(temperature)
    triton = use_triton(backend, logits) if isinstance(logits, torch.Tensor) else False
    if cu_seqlens is not None:
        lay, mask, advantages = PackedLayout.for_inputs(
            cu_seqlens,
            logits,
            "logits",
            mask,
            advantages,
            completion_ids=completion_ids,
            old_logp=old_logp,
            ref_logp=ref_logp,
        )
        V = check_logits(logits, completion_ids, mask)
        valid = lay.pad(mask.to(torch.bool), "mask", False)
        ids = lay.pad(completion_ids, "completion_ids")
        old_logp, ref_logp = lay.pad(old_logp, "old_logp"), lay.pad(ref_logp, "ref_logp")
        is_ratio, policy_mask = (
            lay.pad_token_weights(is_ratio, "is_ratio"),
            lay.pad_token_weights(policy_mask, "policy_mask"),
        )
    else:
        V = check_logits(logits, completion_ids, mask)
        valid, ids = mask, completion_ids
    check_call(
        cfg,
        torch.empty(valid.shape, device=logits.device),
        old_logp,
        advantages,
        valid,
        group_size,
        ids if group_size is not None else None,
        ref_logp,
        checks,
    )
    id_check = ValueChecks().extend([ids_out_of_range(completion_ids, mask, V)], [IDS_OUT_OF_RANGE])
    classes = classes_before_launch(ids, group_size, valid)
    logp = vocab_logprob(logits, completion_ids, mask, temperature, triton=triton, inplace=inplace_backward)
    if cu_seqlens is not None:
        logp = lay.pad(logp, "logp")
    return surrogate_loss(
        cfg,
        logp,
        old_logp,
        advantages,
        valid,
        group_size=group_size,
        completion_ids=ids if group_size is not None else None,
        ref_logp=ref_logp,
        window=win,
        classes=classes,
        compile_math=compile_math,
        checks=checks,
        extra_checks=id_check,
        is_ratio=is_ratio,
        policy_mask=policy_mask,
    )
