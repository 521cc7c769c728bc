"""The optimizer room: :class:`ClipAwareAdamW` (state, param groups, the window signal) beside
its functional form :func:`clip_aware_adamw` (the single-tensor / foreach / fused / Triton
update), as torch's ``AdamW`` / ``adamw()``; and :func:`adam_eps_report` (paper Prop. 2)."""

from .clip_aware_adamw import ClipAwareAdamW
from .diagnostics import AdamEpsReport, adam_eps_report
from .functional import clip_aware_adamw

__all__ = ["AdamEpsReport", "ClipAwareAdamW", "adam_eps_report", "clip_aware_adamw"]
