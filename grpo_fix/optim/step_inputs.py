"""What one ``step()`` of :class:`grpo_fix.ClipAwareAdamW` works on: the param groups that have
gradients (validated: a finite learning rate, dense gradients), whether the step can decide on
the device to skip a non-finite gradient (the Triton path: no host sync), and the step counts
moved to the parameters' device for that path.
"""

from __future__ import annotations

from typing import Any

import torch

from .finite import raise_if_sparse
from .functional import uses_triton
from .hyperparameters import check_lr

__all__ = ["Collected", "all_on_triton", "groups_with_grads", "on_triton", "steps_on_device"]

#: (param group, its parameters that have a gradient), per group with any
Collected = list[tuple[dict[str, Any], list[torch.Tensor]]]


def groups_with_grads(param_groups: list[dict[str, Any]]) -> Collected:
    """Each group with parameters that have a gradient, and those parameters; ``TypeError``
    for a sparse gradient and ``ValueError`` for an invalid lr, naming them."""
    out = []
    for i, group in enumerate(param_groups):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        if not torch.is_tensor(group["lr"]):  # a tensor lr was checked once, at construction
            check_lr(group["lr"], group["weight_decay"], f"param_groups[{i}]['lr']")
        raise_if_sparse(group["params"], i)
        out.append((group, params))
    return out


def on_triton(backend: Any, group: dict[str, Any], params: list[torch.Tensor]) -> bool:
    """Whether ``group``'s update of ``params`` runs the Triton kernel (:func:`uses_triton`)."""
    grads = [p.grad for p in params if p.grad is not None]
    return uses_triton(backend, params, grads, lr=group["lr"], amsgrad=group["amsgrad"], fused=group["fused"])


def all_on_triton(backend: Any, collected: Collected) -> bool:
    """Whether every group's update runs the Triton kernel, all on one device."""
    if len({p.device for _, ps in collected for p in ps}) != 1:
        return False
    return all(on_triton(backend, g, ps) for g, ps in collected)


def steps_on_device(state: dict[Any, dict[str, Any]], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters' step counts, moved once to each parameter's device as fp32 (where the
    Triton kernel reads and advances them)."""
    for p in params:
        st = state[p]
        if st["step"].device != p.device:
            st["step"] = st["step"].to(p.device, torch.float32)
    return [state[p]["step"] for p in params]
