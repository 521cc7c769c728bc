"""What :meth:`grpo_fix.ClipAwareAdamW.observe` reads from a window's
:class:`~grpo_fix.TrustRegionSignal`: the gate's ``kappa``, the overshoot fraction, whether the
window measured anything, and whether the signal is finite (one host read of all its fields).

The gate (paper Prop. 3, Eqs. 29-37): ``m <- beta1 * kappa * m + (1 - beta1) * g`` with
``kappa`` the window's unclipped share of the advantage-gradient mass (1 with the gate off).  A
window with tokens but no advantage mass (every advantage 0: a converged batch, constant-reward
groups) gets ``kappa = 0``: its gradient is exactly zero, so a step would be carried momentum
alone.  A window with no tokens (``TrustRegionSignal.zeros()``, nothing measured) keeps 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..signal import TENSOR_FIELDS, TrustRegionSignal

__all__ = ["WindowReading", "read_window"]


@dataclass(frozen=True)
class WindowReading:
    """A window's measurement on the host (meaningful only when ``finite``)."""

    finite: bool
    kappa: float = 1.0
    overshoot_fraction: float = 0.0
    informative: bool = False


def read_window(signal: TrustRegionSignal, *, gate: bool) -> WindowReading:
    """Read ``signal`` (one host transfer).

    Raises ``TypeError`` for a non-signal or a field that is not a one-element tensor, and
    ``ValueError`` for negative masses or counts or ``active_mass > total_mass``
    (:meth:`TrustRegionSignal.validate`); a non-finite signal reads as ``finite=False``."""
    if not isinstance(signal, TrustRegionSignal):
        raise TypeError(f"observe() expects a grpo_fix.TrustRegionSignal, got {type(signal).__name__}")
    for name in TENSOR_FIELDS:
        value = getattr(signal, name)
        if not torch.is_tensor(value) or value.numel() != 1:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise TypeError(f"observe(): TrustRegionSignal.{name} must be a one-element tensor, got {shape}")
    host = torch.stack([getattr(signal, f).detach().reshape(()).double().cpu() for f in TENSOR_FIELDS]).tolist()
    if not all(math.isfinite(x) for x in host):
        return WindowReading(finite=False)
    signal.validate()  # negative masses or counts, active_mass > total_mass: its ValueError names them
    v = dict(zip(TENSOR_FIELDS, host))
    if not gate:
        kappa = 1.0
    elif v["total_mass"] > 0:
        kappa = min(1.0, v["active_mass"] / v["total_mass"])
    else:
        kappa = 0.0 if v["num_tokens"] > 0 else 1.0
    return WindowReading(
        finite=True,
        kappa=kappa,
        overshoot_fraction=v["num_overshoot"] / max(v["num_eligible"], 1.0),
        informative=v["num_eligible"] > 0,
    )
