"""Backtracking: pull an optimizer step back along its own direction until the re-measured
overshoot is within the bound (the exact trust region of :class:`grpo_fix.ClipAwareAdamW`).

After a step from ``theta_before`` to ``theta_before + delta``, the trainer's re-measure callable
returns a fresh :class:`~grpo_fix.TrustRegionSignal`; while its overshoot fraction exceeds
``bound = max(tau, f_before)`` (at most ``max_backtracks`` times) the parameters are set to
``theta_before + a * delta`` with ``a`` halved.  The first ``a`` within the bound is accepted and
the first moment is scaled by it; when none is, the step is rejected (``a = 0``: parameters
restored, first moment zeroed), so after every step the re-measured overshoot is at most the bound.

A backtracked step is all or nothing: :class:`StepSnapshot` records the parameters and their
optimizer state before the update, and the optimizer restores it when the update or a re-measure
raises (out of memory, a bug in the callable) or when a re-measure is not finite
(:class:`NonFiniteRemeasure`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from ..signal import TrustRegionSignal

__all__ = ["NonFiniteRemeasure", "StepSnapshot", "backtrack_step", "measure_overshoot"]


class NonFiniteRemeasure(FloatingPointError):
    """The backtrack's re-measure returned a signal with NaN or infinite fields."""


class StepSnapshot:
    """The values of ``params`` and their optimizer state (``state[p]``: tensors cloned, scalars
    copied; absent for a parameter not stepped yet), taken before a step, to undo it exactly."""

    def __init__(self, params: list[torch.Tensor], state: dict[Any, dict[str, Any]]) -> None:
        self.params = params
        self.values = [p.detach().clone() for p in params]
        self.states = [
            {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in state[p].items()}
            if p in state
            else None
            for p in params
        ]

    @torch.no_grad()
    def restore(self, state: dict[Any, dict[str, Any]]) -> None:
        """Put the parameters and their state back (tensors in place, where they still exist)."""
        for p, value, saved in zip(self.params, self.values, self.states):
            p.copy_(value)
            if saved is None:
                state.pop(p, None)
                continue
            current = state[p]
            for k in [k for k in current if k not in saved]:
                del current[k]
            for k, v in saved.items():
                old = current.get(k)
                if torch.is_tensor(v) and torch.is_tensor(old) and old.shape == v.shape and old.dtype == v.dtype:
                    old.copy_(v)
                else:
                    current[k] = v


def measure_overshoot(fn: Callable[[], TrustRegionSignal]) -> float:
    """Call the re-measure ``fn`` without autograd and return its overshoot fraction.

    Raises ``TypeError`` when ``fn`` returns something else than a signal,
    :class:`NonFiniteRemeasure` when the signal has non-finite fields and ``ValueError`` when it
    is otherwise invalid (:meth:`TrustRegionSignal.validate`)."""
    with torch.no_grad():
        sig = fn()
    if not isinstance(sig, TrustRegionSignal):
        raise TypeError(f"the backtrack fn must return a TrustRegionSignal, got {type(sig).__name__}")
    if not sig.is_finite():
        raise NonFiniteRemeasure(
            f"ClipAwareAdamW: the backtrack re-measure returned a non-finite TrustRegionSignal: {sig.as_dict()}"
        )
    sig.validate()
    return float(sig.overshoot_fraction)


@torch.no_grad()
def backtrack_step(
    fn: Callable[[], TrustRegionSignal],
    stepped: list[torch.Tensor],
    before: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    *,
    bound: float,
    max_backtracks: int,
) -> dict[str, float]:
    """Backtrack the step just taken on ``stepped`` (from ``before``), in place.

    Args:
        fn: the re-measure callable (module docstring).
        stepped: the parameters after the step.
        before: their values before the step (same order).
        exp_avgs: their first moments, scaled by the accepted ``a``.
        bound: the largest acceptable overshoot fraction, ``max(tau, f_before)``.
        max_backtracks: the most halvings of ``a``.

    Returns the statistics ``backtracks`` (halvings), ``backtrack_scale`` (``a``), ``rejected``
    (1.0 when no ``a`` was within the bound) and ``overshoot_after``.
    """
    deltas = torch._foreach_sub(stepped, before)
    a, tries = 1.0, 0
    f = measure_overshoot(fn)
    while f > bound and tries < max_backtracks:
        a *= 0.5
        tries += 1
        for p, b, d in zip(stepped, before, deltas):
            p.copy_(b + a * d)
        f = measure_overshoot(fn)
    rejected = f > bound
    if rejected:
        a = 0.0
        for p, b in zip(stepped, before):
            p.copy_(b)
    if a != 1.0:
        torch._foreach_mul_(exp_avgs, a)
    return {"backtracks": float(tries), "backtrack_scale": a, "rejected": float(rejected), "overshoot_after": f}
