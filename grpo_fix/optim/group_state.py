"""The per-group state of :class:`grpo_fix.ClipAwareAdamW`, kept in its param groups (hence in
the state dict, beside torch's hyperparameters).

- ``ca_alpha``: the controller's step multiplier, in ``[alpha_min, 1]``; ``ca_started``: whether a
  window has been observed (before it, the controller starts from ``alpha_init``);
  ``ca_stuck``: consecutive windows that overshot with alpha already at its floor;
- ``ca_kappa``, ``ca_f``, ``ca_invalid``: the latched window (gate, overshoot fraction, whether
  its signal was non-finite);
- ``ca_skipped``: the steps this group skipped for a non-finite gradient or signal.

A group added later (:meth:`ClipAwareAdamW.add_param_group`, e.g. progressive unfreezing) joins
the optimizer where it stands: the current alpha, start flag, stuck count and latched window,
and no skipped steps of its own.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

__all__ = ["GROUP_DEFAULTS", "PendingSkips", "check_loaded_group", "count_skip", "fill_group"]

#: Each per-group key and its value for a group that has seen nothing.
GROUP_DEFAULTS: dict[str, Any] = {
    "ca_alpha": 1.0,
    "ca_kappa": 1.0,
    "ca_f": 0.0,
    "ca_invalid": False,
    "ca_skipped": 0,
    "ca_started": False,
    "ca_stuck": 0,
}
#: What a group added later copies from the first group.
_INHERITED = ("ca_alpha", "ca_kappa", "ca_f", "ca_invalid", "ca_started", "ca_stuck")


def fill_group(group: dict[str, Any], *, like: dict[str, Any] | None = None) -> None:
    """Add the missing per-group keys to ``group`` in place, from the group ``like`` (the
    optimizer's first group, for a group added later) or the defaults."""
    for k, v in GROUP_DEFAULTS.items():
        group.setdefault(k, like[k] if like is not None and k in _INHERITED else v)


def check_loaded_group(group: dict[str, Any], index: int, alpha_min: float) -> None:
    """Complete and validate a group restored from a checkpoint, in place.

    A checkpoint of an earlier ClipAwareAdamW (``ca_alpha`` but no ``ca_started``) has started; a
    plain AdamW one has none of the keys and starts like a new optimizer.  A corrupt value (a
    non-finite, negative or > 1 ``ca_alpha``, a non-finite ``ca_kappa``) raises ``ValueError``;
    an alpha below this optimizer's floor (saved by a release without one) is raised to the
    floor with a ``RuntimeWarning``."""
    group.setdefault("ca_started", "ca_alpha" in group)
    fill_group(group)
    where = f"param_groups[{index}]"
    for key, lo in (("ca_alpha", 0.0), ("ca_kappa", 0.0), ("ca_f", 0.0)):
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= 1.0:
            raise ValueError(f"the loaded state dict has {where}['{key}'] = {value!r}; it must be a number in [0, 1]")
    if group["ca_alpha"] < alpha_min:
        warnings.warn(
            f"ClipAwareAdamW: the loaded {where}['ca_alpha'] = {group['ca_alpha']:.3g} is below the floor "
            f"alpha_min = {alpha_min}; continuing from the floor",
            RuntimeWarning,
            stacklevel=4,
        )
        group["ca_alpha"] = alpha_min
    for key in ("ca_skipped", "ca_stuck"):
        if isinstance(group[key], bool) or not isinstance(group[key], int) or group[key] < 0:
            raise ValueError(f"the loaded state dict has {where}['{key}'] = {group[key]!r}; it must be an int >= 0")


def count_skip(groups: list[dict[str, Any]]) -> None:
    """One skipped ``step()`` of ``groups``."""
    for g in groups:
        g["ca_skipped"] = int(g.get("ca_skipped", 0)) + 1


class PendingSkips:
    """Skips decided on the device (the Triton path's ``ok`` flag, never read during a step),
    added to the groups' ``ca_skipped`` when :meth:`fold` reads them (one host read per device)."""

    def __init__(self) -> None:
        # id(group) -> [group, step() calls, device count of the calls that stepped]
        self._pending: dict[int, list[Any]] = {}

    def record(self, groups: list[dict[str, Any]], ok: torch.Tensor) -> None:
        """One ``step()`` call of ``groups`` that stepped where ``ok`` is 1 (no host read)."""
        applied = []
        for g in groups:
            entry = self._pending.setdefault(id(g), [g, 0, torch.zeros((), dtype=torch.float32, device=ok.device)])
            entry[1] += 1
            applied.append(entry[2])
        torch._foreach_add_(applied, [ok] * len(applied))  # a tensor scalar would be read on the host

    def fold(self) -> None:
        """Add the pending skips to ``ca_skipped`` (reads the device counts)."""
        for g, calls, applied in self._pending.values():
            g["ca_skipped"] = int(g.get("ca_skipped", 0)) + calls - round(float(applied))
        self._pending.clear()
