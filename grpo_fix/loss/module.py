""":class:`GroupSurrogateLoss`, the ``nn.Module`` face of the unified surrogate (paper Eq. 1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..options import Backend, CompileMath, check_backend, check_compile_math
from .config import SurrogateConfig, resolve_config
from .hidden import linear_surrogate_loss
from .logits import logits_surrogate_loss
from .surrogate import SurrogateOutput, surrogate_loss


class GroupSurrogateLoss(nn.Module):
    """GRPO-family policy loss: one implementation of Eq. 1 configured by (weighting, ratio, regulariser).

    Args:
        preset: a name of :data:`grpo_fix.PRESETS` (default ``"uniform"``, the corrected loss) or
            a :class:`SurrogateConfig`.
        backend: where :meth:`forward_logits` / :meth:`forward_hidden` do the vocabulary work:
            ``"auto"`` (Triton kernels for CUDA tensors, torch otherwise), ``"torch"`` or
            ``"triton"`` (:mod:`grpo_fix.options`).  :meth:`forward` takes log-probs and is torch.
        compile_math: ``"auto"`` (default: the per-token math under ``torch.compile`` for CUDA
            tensors), ``"always"`` or ``"never"`` (:mod:`grpo_fix.loss.compiled`).
        **overrides: fields of :class:`SurrogateConfig` to change (e.g. ``beta=0.04``).

    Call::

        out = loss_fn(logp, old_logp, advantages, mask, *, group_size, completion_ids=None,
                      ref_logp=None, window=Window(tokens=..., micro_batches=..., dp_size=...))

    (arguments of :func:`grpo_fix.surrogate_loss`); ``out.loss`` is scaled for gradient
    accumulation and data parallelism, ``out.signal`` goes to :class:`grpo_fix.ClipAwareAdamW`.
    """

    def __init__(
        self,
        preset: str | SurrogateConfig | None = "uniform",
        *,
        backend: Backend = "auto",
        compile_math: CompileMath = "auto",
        **overrides: Any,
    ) -> None:
        super().__init__()
        self.config = resolve_config(preset, **overrides)
        self.backend = check_backend(backend)
        self.compile_math = check_compile_math(compile_math)

    def extra_repr(self) -> str:
        settings = {**self.config.as_dict(), "backend": self.backend, "compile_math": self.compile_math}
        return ", ".join(f"{k}={v!r}" for k, v in settings.items())

    def forward(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor | None,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        *,
        group_size: int | None,
        **kwargs: Any,
    ) -> SurrogateOutput:
        """Eq. 1 on log-probs; keyword arguments as :func:`grpo_fix.surrogate_loss`."""
        kwargs.setdefault("compile_math", self.compile_math)
        return surrogate_loss(self.config, logp, old_logp, advantages, mask, group_size=group_size, **kwargs)

    def forward_logits(
        self,
        logits: torch.Tensor,
        completion_ids: torch.Tensor,
        old_logp: torch.Tensor | None,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        *,
        group_size: int | None,
        temperature: float = 1.0,
        **kwargs: Any,
    ) -> SurrogateOutput:
        """The loss from materialised logits ``(B, T, V)`` or ``(B, T + 1, V)`` (last position
        unused): :func:`grpo_fix.logits_surrogate_loss` on this module's backend."""
        kwargs.setdefault("compile_math", self.compile_math)
        kwargs.setdefault("backend", self.backend)
        return logits_surrogate_loss(
            self.config,
            logits,
            completion_ids,
            old_logp,
            advantages,
            mask,
            group_size=group_size,
            temperature=temperature,
            **kwargs,
        )

    def forward_hidden(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        completion_ids: torch.Tensor,
        old_logp: torch.Tensor | None,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        *,
        group_size: int | None,
        bias: torch.Tensor | None = None,
        temperature: float = 1.0,
        **kwargs: Any,
    ) -> SurrogateOutput:
        """The loss from the last hidden states ``(B, T, H)`` and ``lm_head.weight`` ``(V, H)``:
        :func:`grpo_fix.linear_surrogate_loss` on this module's backend (Triton never
        materialises the ``[tokens, V]`` logits; torch does, as the reference)."""
        kwargs.setdefault("compile_math", self.compile_math)
        kwargs.setdefault("backend", self.backend)
        return linear_surrogate_loss(
            self.config,
            hidden,
            weight,
            completion_ids,
            old_logp,
            advantages,
            mask,
            group_size=group_size,
            bias=bias,
            temperature=temperature,
            **kwargs,
        )
