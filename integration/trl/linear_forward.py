"""The logits-free loss path of ``GRPOFixTrainer``, and where it is chosen.

On this path the backbone's last hidden states and ``lm_head.weight`` go straight into
:func:`grpo_fix.linear_surrogate_loss` on the Triton backend (three GEMMs per chunk, the
``[tokens, V]`` logits never exist, tokens with no gradient are skipped).  The loss must run
*inside* the model's forward so that DDP and ZeRO-3 hooks fire: :func:`linear_loss` reroutes the
call through the wrapper's ``forward`` (TRL's ``_ForwardRedirection``), with the inputs of the
loss in a typed :class:`LinearLossRequest` (nothing is passed through ``model.forward``'s
keywords, and the model is not patched).  ``lm_head`` is gathered under ZeRO-3
(``maybe_gather_lm_head_ctx``); the decoder is found through a PEFT wrapper; under autocast the
GEMMs run in the autocast dtype (``bf16=True`` with an fp32 model).

:func:`choose_loss_path` picks this path (``loss_backend="auto"``) only for a CUDA model without
any feature it does not support (:func:`linear_path_blockers`); ``loss_backend="triton"`` forces it
and refuses those features at construction.  The other path ("torch") is TRL's own log-prob
forward (``_get_per_token_logps_and_entropies``) followed by :func:`grpo_fix.surrogate_loss`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from grpo_fix import GroupSurrogateLoss, SurrogateOutput, Window

from .checks import uses_entropy

__all__ = ["LinearLossRequest", "LossPath", "causal_lm", "choose_loss_path", "linear_loss", "linear_path_blockers"]


@dataclass
class LinearLossRequest:
    """The inputs of one logits-free loss call (the arguments of
    :meth:`grpo_fix.GroupSurrogateLoss.forward_hidden` besides the hidden states and weights);
    ``output`` receives the :class:`grpo_fix.SurrogateOutput`."""

    loss_fn: GroupSurrogateLoss
    completion_ids: torch.Tensor
    old_logp: torch.Tensor | None
    advantages: torch.Tensor
    mask: torch.Tensor
    window: Window
    group_size: int | None
    ref_logp: torch.Tensor | None = None
    is_ratio: torch.Tensor | None = None
    temperature: float = 1.0
    output: SurrogateOutput | None = None


def causal_lm(model: nn.Module) -> Any:
    """The transformers causal LM inside ``model`` (a PEFT ``PeftModel`` is unwrapped)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _hidden_states_loss(
    unwrapped: nn.Module, request: LinearLossRequest, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Backbone -> completion positions' hidden states -> the logits-free loss (runs inside forward)."""
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    lm = causal_lm(unwrapped)
    hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    T = request.completion_ids.size(1)
    head = lm.get_output_embeddings()
    weight, bias = head.weight, head.bias
    hidden = hidden[:, -T - 1 : -1].to(weight.device)  # position t predicts completion token t
    if not torch.is_autocast_enabled(hidden.device.type) and hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    with maybe_gather_lm_head_ctx(weight, bias):
        out = request.loss_fn.forward_hidden(
            hidden,
            weight,
            request.completion_ids,
            request.old_logp,
            request.advantages,
            request.mask,
            group_size=request.group_size,
            bias=bias,
            temperature=request.temperature,
            ref_logp=request.ref_logp,
            window=request.window,
            is_ratio=request.is_ratio,
            backend="triton",
        )
    request.output = out
    return out.loss


def linear_loss(
    model: nn.Module,
    unwrapped: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    request: LinearLossRequest,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
) -> tuple[torch.Tensor, SurrogateOutput]:
    """Run the logits-free loss through ``model``'s forward (``model`` wraps ``unwrapped``: DDP, a
    DeepSpeed engine, or the module itself) under ``autocast`` (the accelerator's; the redirection
    bypasses the autocast accelerate wraps around ``unwrapped.forward``)."""
    from trl.models.utils import _ForwardRedirection

    def method(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return _hidden_states_loss(unwrapped, request, input_ids, attention_mask)

    with autocast if autocast is not None else contextlib.nullcontext():
        loss = _ForwardRedirection()(model, unwrapped, method, input_ids, attention_mask)
    assert request.output is not None
    return loss, request.output


@dataclass(frozen=True)
class LossPath:
    """Which loss path a trainer runs, and why (logged once at construction)."""

    linear: bool
    reason: str

    def describe(self) -> str:
        name = "logits-free Triton loss" if self.linear else "TRL log-probs + grpo_fix torch loss"
        return f"{name} ({self.reason})"


def linear_path_blockers(model: nn.Module, args: Any, aux_loss_enabled: bool, fsdp: bool) -> list[str]:
    """The features of this model and config the logits-free path does not support (empty: it can run)."""
    lm = causal_lm(model)
    text_config = lm.config.get_text_config()
    scaled = any(
        getattr(text_config, a, None) not in (None, 1, 1.0)
        for a in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
    )
    head = lm.get_output_embeddings()
    peft_config = getattr(model, "peft_config", None)
    prompt_learning = isinstance(peft_config, dict) and any(
        getattr(c, "is_prompt_learning", False) for c in peft_config.values()
    )
    vllm_is = args.use_vllm and args.vllm_importance_sampling_correction
    candidates = (
        ("final_logit_softcapping", getattr(text_config, "final_logit_softcapping", None) is not None),
        ("a logit scale (logit_scale / output_multiplier / lm_head_multiplier / logits_scaling)", scaled),
        ("an MoE auxiliary loss", aux_loss_enabled),
        ("a multimodal model", text_config is not lm.config),
        ("a model without output embeddings", head is None),
        ("a prompt-learning PEFT adapter", prompt_learning),
        ("FSDP (sharded DTensor lm_head)", fsdp),
        ("the entropy mask / entropy bonus (needs per-token entropies)", uses_entropy(args)),
        (
            "off_policy_mask_threshold with vLLM (needs the sampler's log-probs)",
            vllm_is and args.off_policy_mask_threshold is not None,
        ),
        ("cast_lm_head_to_fp32", bool(args.cast_lm_head_to_fp32)),
    )
    return [name for name, present in candidates if present]


def choose_loss_path(model: nn.Module, args: Any, aux_loss_enabled: bool, fsdp: bool) -> LossPath:
    """The loss path for ``args.loss_backend``: ``"torch"``; ``"triton"`` (``ValueError`` naming the
    blockers and ``loss_backend="torch"``); ``"auto"``: Triton only for a CUDA model with Triton
    installed and no blocker."""
    choice = args.loss_backend
    if choice == "torch":
        return LossPath(False, "loss_backend='torch'")
    blockers = linear_path_blockers(model, args, aux_loss_enabled, fsdp)
    try:
        import triton  # noqa: F401

        has_triton = True
    except ImportError:
        has_triton = False
    on_cuda = next(model.parameters()).is_cuda
    if choice == "triton":
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if not has_triton:
            blockers.append("triton is not installed")
        if not (on_cuda or interpreted):
            blockers.append("the model is not on CUDA (and TRITON_INTERPRET=1 is not set)")
        if blockers:
            raise ValueError(
                f"loss_backend='triton' (the logits-free loss) does not support: {'; '.join(blockers)}. Set "
                "loss_backend='torch' (or 'auto', which picks the path that works)."
            )
        return LossPath(True, "loss_backend='triton'")
    if not on_cuda:
        return LossPath(False, "loss_backend='auto', the model is not on CUDA")
    if not has_triton:
        return LossPath(False, "loss_backend='auto', triton is not installed")
    if blockers:
        return LossPath(False, f"loss_backend='auto', the logits-free path does not support {', '.join(blockers)}")
    return LossPath(True, "loss_backend='auto', CUDA model")
