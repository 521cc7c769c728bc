"""The trust-region controller's rule: the step multiplier ``alpha`` of the next optimizer window,
with its floor, and how long it has been stuck there.

Pure functions of the previous state and the window's measurement, so that the rule can be tested
on its own; :class:`grpo_fix.ClipAwareAdamW` applies them once per window, at ``observe``.

The floor ``alpha_min`` keeps a persistent overshoot from halving ``alpha`` into the subnormals
(training silently frozen after ~30 windows, ``lr * alpha`` underflowing after ~1,000).  A
window that overshoots while ``alpha`` is already at the floor is *stuck*: the controller wants
a smaller step than it may take.  After :data:`STUCK_WINDOWS` consecutive stuck windows the
optimizer warns once (:func:`stuck_message`): a persistent overshoot usually is not the policy
moving too fast but a measurement that is wrong from the start.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CONTROLLER_SETTINGS", "STUCK_WINDOWS", "advance_controller", "next_alpha", "next_stuck", "stuck_message"]

#: The settings of ClipAwareAdamW that :func:`advance_controller` reads.
CONTROLLER_SETTINGS = ("alpha_init", "reset_on_rollout", "tau", "shrink", "grow", "alpha_min")

#: Consecutive stuck windows after which the optimizer warns.
STUCK_WINDOWS = 10


def next_alpha(
    alpha: float,
    overshoot_fraction: float,
    *,
    informative: bool,
    tau: float,
    shrink: float,
    grow: float,
    alpha_min: float,
) -> float:
    """The step multiplier after one window::

        alpha <- max(alpha_min, alpha * shrink)    if overshoot_fraction > tau
        alpha <- min(1, alpha * grow)              elif the window was informative
        alpha <- alpha                             otherwise

    Args:
        alpha: the multiplier before the window, in ``[alpha_min, 1]``.
        overshoot_fraction: the window's fraction of eligible tokens already beyond the clip
            region in their advantage's direction (``TrustRegionSignal.overshoot_fraction``).
        informative: whether the window had eligible tokens (a non-zero advantage); without
            them no overshoot could be measured and ``alpha`` is held.
        tau: the overshoot fraction above which the step shrinks.
        shrink: the factor in (0, 1) applied on an overshooting window.
        grow: the factor >= 1 applied on an informative window within the bound.
        alpha_min: the floor, in (0, 1].
    """
    if overshoot_fraction > tau:
        return max(alpha_min, alpha * shrink)
    if informative:
        return min(1.0, alpha * grow)
    return alpha


def next_stuck(
    stuck: int, alpha: float, overshoot_fraction: float, *, informative: bool, tau: float, alpha_min: float
) -> int:
    """The count of consecutive stuck windows after one window (``alpha`` is the multiplier the
    window started from): +1 when it overshoots with ``alpha`` at the floor, unchanged when it
    measured nothing, 0 otherwise."""
    if overshoot_fraction > tau:
        return stuck + 1 if alpha <= alpha_min else 0
    return stuck if not informative else 0


def stuck_message(windows: int, *, alpha_min: float, tau: float, overshoot_fraction: float) -> str:
    """The warning for a controller stuck at its floor for ``windows`` windows."""
    return (
        f"ClipAwareAdamW: the trust-region controller has held alpha at its floor alpha_min={alpha_min:g} for "
        f"{windows} consecutive windows while the overshoot fraction stayed above tau={tau:g} (last "
        f"{overshoot_fraction:.3g}); the policy barely moves. A persistent overshoot usually means the measurement "
        "is wrong from the start: the old log-probs do not come from the policy that sampled the rollouts (a "
        "sampler/trainer log-prob mismatch: another dtype, temperature or model version), tau is too small for "
        "this run, or the loss maps its clip range wrongly (a cap below 1 counts every token as overshoot). "
        "last_stats['stuck_windows'] counts the windows."
    )


def advance_controller(
    group: dict[str, Any],
    overshoot_fraction: float,
    *,
    informative: bool,
    rollout_start: bool,
    alpha_init: float,
    reset_on_rollout: bool,
    tau: float,
    shrink: float,
    grow: float,
    alpha_min: float,
) -> tuple[bool, bool]:
    """Apply one window to a param group's controller state (``ca_alpha``, ``ca_started``,
    ``ca_stuck``; :mod:`grpo_fix.optim.group_state`), in place.

    The window starts from 1 on a rollout boundary with ``reset_on_rollout``, from ``alpha_init``
    before the first window, from the group's alpha otherwise; then :func:`next_alpha` and
    :func:`next_stuck`.  Returns whether alpha shrank and whether the group just became stuck
    (its count reached :data:`STUCK_WINDOWS`)."""
    if rollout_start and reset_on_rollout:
        start = 1.0
    elif not group["ca_started"]:
        start = alpha_init
    else:
        start = float(group["ca_alpha"])
    limits: dict[str, Any] = dict(informative=informative, tau=tau, alpha_min=alpha_min)
    group["ca_started"] = True
    group["ca_alpha"] = next_alpha(start, overshoot_fraction, shrink=shrink, grow=grow, **limits)
    group["ca_stuck"] = next_stuck(int(group["ca_stuck"]), start, overshoot_fraction, **limits)
    return group["ca_alpha"] < start, group["ca_stuck"] == STUCK_WINDOWS
