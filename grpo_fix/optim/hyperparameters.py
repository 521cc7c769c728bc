"""The settings of :class:`grpo_fix.ClipAwareAdamW`: the clip-aware ones with their defaults, and
the validation of every setting, AdamW's included (each error names the argument and its range).

The clip-aware settings are optimizer attributes (pickled with the optimizer, not part of the
state dict); the per-group controller state lives in :mod:`grpo_fix.optim.group_state`.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from ..options import check_backend

__all__ = ["DEFAULTS", "check_adamw_settings", "check_fused_group", "check_lr", "check_settings", "defaults"]

#: Every clip-aware setting and its default (the constructor's keyword arguments).
DEFAULTS: dict[str, Any] = {
    "gate": True,
    "controller": True,
    "tau": 0.05,
    "alpha_init": 1.0,
    "alpha_min": 1e-3,
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


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Validate the clip-aware settings and return them normalised (bools, floats, ints)."""
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown ClipAwareAdamW settings: {sorted(unknown)}")
    s = {**defaults(), **settings}
    if s["nonfinite"] not in ("skip", "raise"):
        raise ValueError(f"nonfinite must be 'skip' or 'raise', got {s['nonfinite']!r}")
    check_backend(s["backend"])
    for k in ("tau", "alpha_init", "alpha_min", "shrink", "grow"):
        s[k] = _number(k, s[k])
    if not 0.0 <= s["tau"] <= 1.0:
        raise ValueError(f"tau (an overshoot fraction) must be in [0, 1], got {s['tau']}")
    if not 0.0 < s["alpha_min"] <= 1.0:
        raise ValueError(f"alpha_min (the floor of the step multiplier) must be in (0, 1], got {s['alpha_min']}")
    if not s["alpha_min"] <= s["alpha_init"] <= 1.0:
        raise ValueError(f"alpha_init must be in [alpha_min, 1] = [{s['alpha_min']}, 1], got {s['alpha_init']}")
    if not 0.0 < s["shrink"] < 1.0:
        raise ValueError(f"shrink must be in (0, 1), got {s['shrink']}")
    if not s["grow"] >= 1.0:
        raise ValueError(f"grow must be >= 1, got {s['grow']}")
    if isinstance(s["max_backtracks"], bool) or not isinstance(s["max_backtracks"], int) or s["max_backtracks"] < 0:
        raise ValueError(f"max_backtracks must be an integer >= 0, got {s['max_backtracks']!r}")
    for k in ("gate", "controller", "backtrack", "reset_on_rollout", "shrink_momentum"):
        s[k] = bool(s[k])
    return s


def check_lr(lr: Any, weight_decay: float = 0.0, where: str = "lr") -> None:
    """``ValueError`` unless ``lr`` is a finite number >= 0 with ``lr * weight_decay < 1`` (the
    decoupled decay multiplies the parameters by ``1 - lr * weight_decay``; a tensor ``lr`` is
    read once)."""
    value = float(lr) if torch.is_tensor(lr) and lr.numel() == 1 else lr
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where} must be a finite number >= 0, got {lr!r}")
    if value * weight_decay >= 1.0:
        raise ValueError(
            f"{where} * weight_decay = {value * weight_decay:g} must be < 1: the decoupled weight decay multiplies "
            "the parameters by 1 - lr * weight_decay every step"
        )


def check_adamw_settings(
    lr: Any,
    betas: Any,
    eps: Any,
    weight_decay: Any,
    *,
    capturable: bool,
    differentiable: bool,
    fused: Any,
    backend: Any,
) -> None:
    """Validate AdamW's own settings (torch accepts an infinite lr, eps or weight decay) and
    refuse the options ClipAwareAdamW cannot honour."""
    if capturable:
        raise ValueError(
            "ClipAwareAdamW does not support capturable=True (CUDA graphs): the controller branches on host "
            "scalars at observe(); pass capturable=False"
        )
    if differentiable:
        raise ValueError("ClipAwareAdamW does not support differentiable=True; pass differentiable=False")
    if fused and backend == "triton":
        raise ValueError("fused=True asks for torch's fused kernel and backend='triton' for ours: pass one of them")
    if torch.is_tensor(lr) and not fused:
        raise ValueError("a tensor lr needs fused=True (as in torch's AdamW); pass a float lr or fused=True")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        b = float(b) if torch.is_tensor(b) and b.numel() == 1 else b
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] (beta{i + 1}) must be in [0, 1), got {betas[i]!r}")
    if not 0.0 <= _number("eps", eps):
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not 0.0 <= _number("weight_decay", weight_decay):
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    check_lr(lr, float(weight_decay))


def check_fused_group(group: dict[str, Any], index: int) -> None:
    """``fused=True`` needs real floating-point parameters: refused when the group is added (torch
    would refuse at the first step), naming the parameter."""
    if group.get("fused"):
        for j, p in enumerate(group["params"]):
            if not torch.is_floating_point(p):
                raise ValueError(
                    f"fused=True needs real floating-point parameters, but param_groups[{index}]['params'][{j}] is "
                    f"{p.dtype}; pass fused=False (foreach or single-tensor updates support it)"
                )
