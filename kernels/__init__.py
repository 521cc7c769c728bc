"""Triton kernels for the vocabulary-heavy work of GRPO-family losses (``grpo_fix.kernels``).

The kernels take tensors and return log-probs or gradients; nothing here knows the loss.  The
expensive part of a policy loss is the vocabulary: the passes over the ``[N, V]`` logits
(logsumexp, selected log-prob, softmax gradient) and the lm_head GEMMs.  The GRPO math (every
preset, the trust-region signal) stays in one torch implementation in :mod:`grpo_fix.loss`, which
calls these kernels or their torch references (:mod:`.reference`) through
``GroupSurrogateLoss(backend=...)``.

- :mod:`.logprob`: :func:`selective_logprob` (differentiable; the gradient can be written in place
  into the logits), :func:`selective_logprob_nograd`, and the raw :func:`logprob_forward` /
  :func:`logprob_backward`.
- :mod:`.linear`: :func:`fused_linear_logprob` (logits-free: three GEMMs per chunk, fp32 dW, the
  upstream gradient from a callback) and :func:`linear_logprobs` (no grad).
- :mod:`.adamw_step`: the clip-aware AdamW update of :class:`grpo_fix.ClipAwareAdamW` (one multi-tensor
  launch per param group, a device-side skip flag).
- :mod:`.reference`: the torch reference of each; :mod:`.checks`: the input checks both share.

``import grpo_fix.kernels`` needs neither triton nor CUDA (triton is imported on first launch).
Calling a kernel needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before triton
is imported (tests); otherwise it raises ``RuntimeError``.  Bad input raises ``ValueError`` naming
the argument.  Packed (padding-free) inputs take ``(N, V)`` logits and ``(N,)`` ids.
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Any

from .checks import SUPPORTED_LOGIT_DTYPES
from .linear import LinearLogprobs, dw_accumulation, fused_linear_logprob, linear_logprobs
from .logprob import logprob_backward, logprob_forward, selective_logprob, selective_logprob_nograd
from .reference import adamw_step_reference, linear_logprob_reference, selective_logprob_reference


def is_available(device: Any = None) -> bool:
    """Whether the Triton kernels can run here: triton importable and CUDA (or TRITON_INTERPRET=1)."""
    import importlib.util
    import os

    import torch

    if importlib.util.find_spec("triton") is None:
        return False
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device is not None and torch.device(device).type == "cpu":
        return interpret
    return torch.cuda.is_available() or interpret


#: Loss entry points that lived here in 0.1 and moved to the loss room (``grpo_fix``); the old
#: names still resolve, with a DeprecationWarning, until the next release.  They are looked up on
#: the parent package, which is fully imported before any of its subpackages is used, so this
#: package never imports the layer above it.
_MOVED = {
    "logits_surrogate_loss": "logits_surrogate_loss",
    "linear_surrogate_loss": "linear_surrogate_loss",
    "resolve_loss_config": "loss.backend.loss_config",
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    new = _MOVED[name]
    warnings.warn(
        f"grpo_fix.kernels.{name} is deprecated and will be removed in the next release; use "
        f"grpo_fix.{new} (the loss entry points take backend='triton' to force the kernels)",
        DeprecationWarning,
        stacklevel=2,
    )
    target: Any = sys.modules[__name__.rpartition(".")[0]]
    for part in new.split("."):
        target = getattr(target, part)
    if name == "resolve_loss_config":
        return target
    return functools.partial(target, backend="triton")


__all__ = [
    "SUPPORTED_LOGIT_DTYPES",
    "LinearLogprobs",
    "adamw_step_reference",
    "dw_accumulation",
    "fused_linear_logprob",
    "is_available",
    "linear_logprob_reference",
    "linear_logprobs",
    "logprob_backward",
    "logprob_forward",
    "selective_logprob",
    "selective_logprob_nograd",
    "selective_logprob_reference",
]
