"""grpo-fix: drop-in fixes for the hidden objective biases of GRPO-style RL (arXiv 2601.05002).

Three rooms and the adapters around them:

- the loss (:mod:`grpo_fix.loss`): :class:`GroupSurrogateLoss`, one implementation of the unified
  surrogate (Eq. 1) whose presets (:data:`PRESETS`) reproduce GRPO, BNPO, Dr GRPO, DAPO, GSPO,
  CISPO, GPG, GCPO, CPPO, ...; the default ``"uniform"`` preset is the corrected loss (uniform
  per-token weighting over the optimizer :class:`Window`, token ratios, prefix-consistent
  clipping), which removes the prefix bias of Prop. 1.  :func:`group_advantages` and
  :func:`prefix_consistent_advantages` compute rollout-time advantages.
- the optimizer (:mod:`grpo_fix.optim`): :class:`ClipAwareAdamW`, a drop-in AdamW that keeps
  multi-step updates inside the clipping trust region against Prop. 3's momentum overshoot, fed
  the :class:`TrustRegionSignal` the loss measures (summed by a :class:`SignalAccumulator`);
  :func:`adam_eps_report` checks the condition of Prop. 2.
- the kernels (:mod:`grpo_fix.kernels`): Triton for the vocabulary work only, a torch reference
  beside each.
- the adapters (:mod:`grpo_fix.integration`): TRL, DeepSpeed, verl.  The lab (demo, toy task,
  experiments) lives in :mod:`grpo_fix.lab` and uses only this public API.
"""

from .loss import (
    PRESETS,
    GroupSurrogateLoss,
    PrefixClasses,
    SurrogateConfig,
    SurrogateOutput,
    group_advantages,
    linear_surrogate_loss,
    logits_surrogate_loss,
    prefix_classes,
    prefix_consistent_advantages,
    resolve_config,
    surrogate_loss,
)
from .optim import AdamEpsReport, ClipAwareAdamW, adam_eps_report
from .signal import SignalAccumulator, TrustRegionSignal
from .window import Window

__version__ = "0.2.0"

__all__ = [
    "PRESETS",
    "AdamEpsReport",
    "ClipAwareAdamW",
    "GroupSurrogateLoss",
    "PrefixClasses",
    "SignalAccumulator",
    "SurrogateConfig",
    "SurrogateOutput",
    "TrustRegionSignal",
    "Window",
    "adam_eps_report",
    "group_advantages",
    "linear_surrogate_loss",
    "logits_surrogate_loss",
    "prefix_classes",
    "prefix_consistent_advantages",
    "resolve_config",
    "surrogate_loss",
]
