"""The loss room: one implementation of the unified surrogate (paper Eq. 1) and what feeds it.

- :mod:`.config`: :class:`SurrogateConfig` and the presets (data, never code paths);
- :mod:`.math`, :mod:`.diagnostics`, :mod:`.surrogate`: the per-token math, the trust-region
  signal and metrics, and :func:`surrogate_loss` (the single source of truth);
- :mod:`.advantages`, :mod:`.prefix`: rollout-time advantages and shared-prefix classes;
- :mod:`.logits`, :mod:`.hidden`, :mod:`.backend`: the loss from logits or hidden states, on the
  Triton kernels or their torch references;
- :mod:`.module`: :class:`GroupSurrogateLoss`; :mod:`.validation`, :mod:`.compiled`,
  :mod:`.packed`: input checks, ``torch.compile`` of the math, packed inputs.
"""

from .advantages import group_advantages
from .config import PRESETS, SurrogateConfig, resolve_config
from .hidden import linear_surrogate_loss
from .logits import logits_surrogate_loss
from .module import GroupSurrogateLoss
from .prefix import PrefixClasses, prefix_classes, prefix_consistent_advantages
from .surrogate import SurrogateOutput, surrogate_loss

__all__ = [
    "PRESETS",
    "GroupSurrogateLoss",
    "PrefixClasses",
    "SurrogateConfig",
    "SurrogateOutput",
    "group_advantages",
    "linear_surrogate_loss",
    "logits_surrogate_loss",
    "prefix_classes",
    "prefix_consistent_advantages",
    "resolve_config",
    "surrogate_loss",
]
