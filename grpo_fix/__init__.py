"""grpo-fix: drop-in fixes for the hidden objective biases of GRPO-style RL (arXiv 2601.05002).

- :class:`GroupSurrogateLoss`: one implementation of the unified surrogate (Eq. 1) whose presets
  (:data:`PRESETS`) reproduce GRPO, BNPO, Dr GRPO, DAPO, GSPO, CISPO, GPG, GCPO, CPPO, ...; the
  default ``"uniform"`` preset is the corrected loss (uniform per-token weighting over the optimizer
  window, token ratios, prefix-consistent clipping), which removes the prefix bias of Prop. 1.
- :func:`group_advantages`, :func:`prefix_consistent_advantages`: rollout-time advantages.
- :class:`TrustRegionSignal`: what the loss measured about clipping, for the optimizer.
- :class:`ClipAwareAdamW`: a drop-in AdamW that keeps multi-step updates inside the clipping
  trust region (gate, trust-region controller, backtrack), against Prop. 3's momentum overshoot.
- :func:`adam_eps_report`: whether Adam's eps is negligible (the condition of Prop. 2).
"""

from .advantages import group_advantages
from .clip_aware_adamw import ClipAwareAdamW
from .config import PRESETS, SurrogateConfig, resolve_config
from .diagnostics import AdamEpsReport, adam_eps_report
from .prefix import PrefixClasses, prefix_classes, prefix_consistent_advantages
from .signal import TrustRegionSignal
from .surrogate import GroupSurrogateLoss, SurrogateOutput, surrogate_loss

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "AdamEpsReport",
    "ClipAwareAdamW",
    "GroupSurrogateLoss",
    "PrefixClasses",
    "SurrogateConfig",
    "SurrogateOutput",
    "TrustRegionSignal",
    "adam_eps_report",
    "group_advantages",
    "prefix_classes",
    "prefix_consistent_advantages",
    "resolve_config",
    "surrogate_loss",
]
