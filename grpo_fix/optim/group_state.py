"""The per-group state of :class:`grpo_fix.ClipAwareAdamW`, kept in its param groups (hence in
the state dict, beside torch's hyperparameters).

- ``ca_alpha``: the controller's step multiplier; ``ca_started``: whether a window has been
  observed (before it, the controller starts from ``alpha_init``);
- ``ca_kappa``, ``ca_f``, ``ca_invalid``: the latched window (gate, overshoot fraction, whether
  its signal was non-finite);
- ``ca_skipped``: the steps this group skipped for a non-finite gradient or signal.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GROUP_DEFAULTS", "fill_group"]

#: Each per-group key and its value for a group that has seen nothing.
GROUP_DEFAULTS: dict[str, Any] = {
    "ca_alpha": 1.0,
    "ca_kappa": 1.0,
    "ca_f": 0.0,
    "ca_invalid": False,
    "ca_skipped": 0,
    "ca_started": False,
}


def fill_group(group: dict[str, Any], *, loaded: bool = False) -> None:
    """Add the missing per-group keys to ``group`` in place.

    ``loaded=True`` for a group restored from a checkpoint: a checkpoint of an earlier
    ClipAwareAdamW (``ca_alpha`` but no ``ca_started``) has started; a plain AdamW one has not,
    and warm-starts at its first observed window."""
    if loaded:
        group.setdefault("ca_started", "ca_alpha" in group)
    for k, v in GROUP_DEFAULTS.items():
        group.setdefault(k, v)
