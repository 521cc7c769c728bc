"""The clip-aware settings of :class:`grpo_fix.ClipAwareAdamW`: their defaults and their validation.

The settings are optimizer attributes (pickled with the optimizer, not part of the state dict);
the per-group controller state lives in :mod:`grpo_fix.optim.group_state`.
"""

from __future__ import annotations

import copy
from typing import Any

from ..options import check_backend

__all__ = ["DEFAULTS", "check_settings", "defaults"]

#: Every clip-aware setting and its default (the constructor's keyword arguments).
DEFAULTS: dict[str, Any] = {
    "gate": True,
    "controller": True,
    "tau": 0.05,
    "alpha_init": 1.0,
    "backtrack": False,
    "shrink": 0.5,
    "grow": 1.25,
    "reset_on_rollout": False,
    "shrink_momentum": False,
    "max_backtracks": 5,
    "nonfinite": "skip",
    "backend": "auto",
}


def defaults() -> dict[str, Any]:
    """A fresh copy of :data:`DEFAULTS`."""
    return copy.deepcopy(DEFAULTS)


def check_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Validate the clip-aware settings and return them normalised (bools, floats, ints).

    Raises ``ValueError`` naming the setting and its valid range."""
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown ClipAwareAdamW settings: {sorted(unknown)}")
    s = {**defaults(), **settings}
    if s["nonfinite"] not in ("skip", "raise"):
        raise ValueError(f"nonfinite must be 'skip' or 'raise', got {s['nonfinite']!r}")
    check_backend(s["backend"])
    if not 0.0 < s["shrink"] < 1.0:
        raise ValueError(f"shrink must be in (0, 1), got {s['shrink']}")
    if not s["grow"] >= 1.0:
        raise ValueError(f"grow must be >= 1, got {s['grow']}")
    if not s["tau"] >= 0.0:
        raise ValueError(f"tau must be >= 0, got {s['tau']}")
    if not 0.0 < s["alpha_init"] <= 1.0:
        raise ValueError(f"alpha_init must be in (0, 1], got {s['alpha_init']}")
    if s["max_backtracks"] < 0:
        raise ValueError(f"max_backtracks must be >= 0, got {s['max_backtracks']}")
    for k in ("gate", "controller", "backtrack", "reset_on_rollout", "shrink_momentum"):
        s[k] = bool(s[k])
    for k in ("tau", "alpha_init", "shrink", "grow"):
        s[k] = float(s[k])
    s["max_backtracks"] = int(s["max_backtracks"])
    return s
