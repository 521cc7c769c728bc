"""Fused Triton kernels for the vocab-heavy part of GRPO-family losses (``grpo_fix.kernels``).

**Design: the kernels do only the vocabulary work; the GRPO math stays in one torch function.**
The expensive part of a policy loss is the vocabulary: the passes over the ``[N, V]`` logits
(logsumexp, selected log-prob, softmax gradient) and the lm_head GEMMs.  So the kernels compute
log-probs (forward) and ``dlogits = (onehot - softmax) * dlogp / T`` (backward), and the loss
always runs through :func:`grpo_fix.surrogate.surrogate_loss` / ``token_loss``: every preset,
weighting, KL estimator, prefix-consistent variant and the :class:`TrustRegionSignal` are
identical to the oracle by construction.  A second copy of the loss in Triton is how the Liger /
TRL copies drifted apart.  The per-token arithmetic is 130 to 200 small ops; launched eagerly
that is a fixed cost per call of the order of the whole vocabulary pass at V = 32k, so on CUDA
it runs under ``torch.compile`` (``compile_math="auto"``, :mod:`grpo_fix.compiled_math`), which
fuses the same source into a few kernels.  Host syncs that do not depend on the log-probs (the
prefix classes) happen before the kernel launch, and the value checks are read after the
forward math is queued.

Entry points:

- :func:`logits_surrogate_loss`: from materialised logits ``(B, T[+1], V)``; the gradient is
  written in place into the logits buffer (``inplace_backward=True``).
- :func:`linear_surrogate_loss`: logits-free, from ``hidden`` and ``lm_head.weight`` (three
  GEMMs in all, computed during forward, dW accumulated in fp32, frozen weight skips dW).
- :func:`selective_logprob` (differentiable), :func:`selective_logprob_nograd` and
  :func:`linear_logprobs` (no grad, for old / reference policies).

``import grpo_fix.kernels`` needs neither triton nor CUDA (triton is imported on first launch).
Calling a kernel needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before triton
is imported (tests); otherwise it raises ``RuntimeError``.  Unsupported dtypes, devices or shapes
raise ``ValueError``.  Packed (padding-free) inputs: pass ``cu_seqlens`` to either loss; position
ids are not accepted (derive ``cu_seqlens`` from them).
"""

from .linear_loss import dw_accumulation, linear_logprobs, linear_surrogate_loss
from .logits_loss import logits_surrogate_loss, resolve_loss_config
from .logprob import (
    SUPPORTED_LOGIT_DTYPES,
    logprob_backward,
    logprob_forward,
    selective_logprob,
    selective_logprob_nograd,
)


def is_available(device=None) -> bool:
    """Whether the Triton kernels can run here: triton importable and CUDA (or TRITON_INTERPRET=1)."""
    import importlib.util
    import os

    import torch

    if importlib.util.find_spec("triton") is None:
        return False
    if device is not None and torch.device(device).type == "cpu":
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


__all__ = [
    "SUPPORTED_LOGIT_DTYPES",
    "dw_accumulation",
    "is_available",
    "linear_logprobs",
    "linear_surrogate_loss",
    "logits_surrogate_loss",
    "logprob_backward",
    "logprob_forward",
    "resolve_loss_config",
    "selective_logprob",
    "selective_logprob_nograd",
]
