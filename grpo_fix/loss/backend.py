"""Which implementation does the vocabulary work of a loss call: the Triton kernels of
:mod:`grpo_fix.kernels` or their torch references (:mod:`grpo_fix.kernels.reference`).

This module sits above both and below the entry points (:func:`~grpo_fix.logits_surrogate_loss`,
:func:`~grpo_fix.linear_surrogate_loss`, :class:`~grpo_fix.GroupSurrogateLoss`); the GRPO math
itself is the same torch code on every backend (:mod:`grpo_fix.loss.surrogate`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..kernels import is_available
from ..options import Backend, check_backend
from .config import SurrogateConfig, resolve_config


class HasConfig(Protocol):
    """A loss object that carries its configuration (:class:`~grpo_fix.GroupSurrogateLoss`)."""

    @property
    def config(self) -> SurrogateConfig: ...


#: What the loss entry points take as their configuration (resolved by :func:`loss_config`).
LossSpec = SurrogateConfig | str | HasConfig | None


def use_triton(backend: Backend, t: torch.Tensor) -> bool:
    """Whether ``backend`` means the Triton kernels for tensors like ``t``: ``"auto"`` on CUDA when
    triton imports, ``"triton"`` always (``RuntimeError`` if they cannot run here)."""
    backend = check_backend(backend)
    if backend == "torch":
        return False
    if backend == "triton":
        if not is_available(t.device):
            raise RuntimeError(
                "backend='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU); "
                "use backend='torch' or 'auto'"
            )
        return True
    return t.is_cuda and is_available(t.device)


def loss_config(cfg_or_loss_fn: Any) -> SurrogateConfig:
    """A :class:`SurrogateConfig`, a preset name (None: ``"uniform"``) or a
    :class:`~grpo_fix.GroupSurrogateLoss` (anything with a ``config``) -> its configuration."""
    config = getattr(cfg_or_loss_fn, "config", None)
    if isinstance(config, SurrogateConfig):
        return config
    if isinstance(cfg_or_loss_fn, (SurrogateConfig, str)) or cfg_or_loss_fn is None:
        return resolve_config(cfg_or_loss_fn)
    raise ValueError(
        f"expected a SurrogateConfig, a preset name or a GroupSurrogateLoss, got {type(cfg_or_loss_fn).__name__}"
    )
