"""The trust-region controller's rule: the step multiplier ``alpha`` of the next optimizer window.

A pure function of the previous ``alpha`` and the window's measurement, so that the rule can be
tested on its own; :class:`grpo_fix.ClipAwareAdamW` applies it once per window, at ``observe``.
"""

from __future__ import annotations

__all__ = ["next_alpha"]


def next_alpha(
    alpha: float,
    overshoot_fraction: float,
    *,
    informative: bool,
    tau: float,
    shrink: float,
    grow: float,
) -> float:
    """The step multiplier after one window::

        alpha <- alpha * shrink            if overshoot_fraction > tau
        alpha <- min(1, alpha * grow)      elif the window was informative
        alpha <- alpha                     otherwise

    Args:
        alpha: the multiplier before the window, in (0, 1].
        overshoot_fraction: the window's fraction of eligible tokens already beyond the clip
            region in their advantage's direction (``TrustRegionSignal.overshoot_fraction``).
        informative: whether the window had eligible tokens (a non-zero advantage); without
            them no overshoot could be measured and ``alpha`` is held.
        tau: the overshoot fraction above which the step shrinks.
        shrink: the factor in (0, 1) applied on an overshooting window.
        grow: the factor >= 1 applied on an informative window within the bound.
    """
    if overshoot_fraction > tau:
        return alpha * shrink
    if informative:
        return min(1.0, alpha * grow)
    return alpha
