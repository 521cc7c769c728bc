"""Which tensors hold a NaN or an infinity: checked per element, never through a norm that can
overflow (an fp16 gradient whose L2 norm exceeds 65,504, or fp32 elements near 1e19, are finite).

Shared by :class:`grpo_fix.ClipAwareAdamW` (skip a step whose gradients are not finite) and
:class:`grpo_fix.health.HealthMonitor` (name the first non-finite quantity):

- :func:`nonfinite_flags`: one flag per tensor, computed on the tensors' device without reading
  anything on the host (the monitor reads its flags late, in one batch);
- :func:`all_finite`: the host answer for a list of tensors.  A fast sum of squares per tensor
  (one read-only pass over the data) settles the common case: a finite sum proves every element
  finite.  Only the tensors whose sum is not finite (a NaN, an infinity, or an overflow of the
  sum) are looked at per element.

Complex tensors are checked through their real view, sparse ones through their stored values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["all_finite", "nonfinite_flags", "raise_if_sparse"]


def _values(t: torch.Tensor) -> torch.Tensor:
    """The stored values of ``t`` as a real tensor."""
    if t.is_sparse:
        t = t._values()
    elif t.layout != torch.strided:
        t = t.values()
    return torch.view_as_real(t) if t.is_complex() else t


def _by_device(tensors: Sequence[torch.Tensor]) -> dict[torch.device, list[int]]:
    out: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault(t.device, []).append(i)
    return out


def _full(x: torch.Tensor) -> torch.Tensor:
    """A DTensor result made whole on every rank (a collective, so every rank agrees); others as is."""
    full = getattr(x, "full_tensor", None)
    return full() if callable(full) else x


def _exact_nonfinite(vals: list[torch.Tensor]) -> torch.Tensor:
    """One flag per (non-empty, real, dense) tensor: does it hold a NaN or an infinity?

    Plain CPU tensors: ``aminmax`` (the largest magnitude is finite exactly when every element
    is).  CUDA or sharded (DTensor) tensors: an L2 norm accumulated in float64, one multi-tensor
    pass on CUDA, which cannot overflow for fp32/bf16/fp16 values and, being a sum, carries a NaN
    through the reduction over shards (a max need not); float64 tensors count their non-finite
    elements instead."""
    sharded = any(hasattr(v, "full_tensor") for v in vals)
    if vals[0].device.type == "cpu" and not sharded:
        peaks = torch.stack([torch.stack(torch.aminmax(v.reshape(-1))).abs().amax() for v in vals])
        return ~torch.isfinite(peaks)
    flags = [torch.zeros((), dtype=torch.bool, device=vals[0].device)] * len(vals)
    wide = [k for k, v in enumerate(vals) if v.dtype != torch.float64]
    if wide:
        norms = torch._foreach_norm([vals[k] for k in wide], 2, dtype=torch.float64)
        for k, n in zip(wide, norms):
            flags[k] = ~torch.isfinite(_full(n))
    for k, v in enumerate(vals):
        if v.dtype == torch.float64:
            flags[k] = _full((~torch.isfinite(v)).sum()) > 0
    return torch.stack(flags)


def nonfinite_flags(tensors: Sequence[torch.Tensor]) -> dict[torch.device, tuple[list[int], torch.Tensor]]:
    """Per device: the indices of ``tensors`` on it and a bool tensor (on that device) that is
    True where the tensor holds a NaN or an infinity.

    Exact per element, without a host sync (:func:`_exact_nonfinite`); for sharded tensors
    (FSDP2's DTensors) the flags cover the whole tensor and agree on every rank.  Empty tensors
    are finite."""
    out: dict[torch.device, tuple[list[int], torch.Tensor]] = {}
    for dev, idx in _by_device(tensors).items():
        vals = [_values(tensors[i]).detach() for i in idx]
        flags = torch.zeros(len(idx), dtype=torch.bool, device=dev)
        live = [k for k, v in enumerate(vals) if v.numel() > 0]
        if live:
            flags[live] = _exact_nonfinite([vals[k] for k in live])
        out[dev] = (idx, flags)
    return out


def _sums_of_squares(vals: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Per tensor, a sum of squares (finite only if every element is): BLAS ``dot`` for dense
    fp32/fp64 CPU tensors (the fastest read-only pass there), else a multi-tensor L2 norm
    accumulated in at least fp32 (an fp16 norm never overflows; a sharded one reduces over shards)."""
    plain = all(v.device.type == "cpu" and v.is_contiguous() and not hasattr(v, "full_tensor") for v in vals)
    if plain and dtype in (torch.float32, torch.float64):
        return torch.stack([torch.dot(v.view(-1), v.view(-1)) for v in vals])
    return torch.stack(torch._foreach_norm(vals, 2, dtype=torch.promote_types(dtype, torch.float32)))


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite (one host read per device and dtype on
    the common path; the per-element check only for tensors whose L2 norm is not finite)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        v = _values(t).detach()
        if v.numel():
            groups.setdefault((v.device, v.dtype), []).append(v)
    for (_, dtype), vals in groups.items():
        finite = _full(torch.isfinite(_sums_of_squares(vals, dtype)))
        if bool(finite.all()):
            continue
        suspects = [v for v, ok in zip(vals, finite.tolist()) if not ok]
        if any(bool(flags.any()) for _, flags in nonfinite_flags(suspects).values()):
            return False
    return True


def raise_if_sparse(params: Sequence[torch.Tensor], group_index: int) -> None:
    """``TypeError`` naming the first parameter of ``param_groups[group_index]`` whose gradient is
    sparse (AdamW's moments are dense)."""
    for j, p in enumerate(params):
        if p.grad is not None and p.grad.layout != torch.strided:
            raise TypeError(
                f"ClipAwareAdamW does not support sparse gradients: param_groups[{group_index}]['params'][{j}] "
                f"(shape {tuple(p.shape)}) has a {p.grad.layout} gradient; make it dense (e.g. "
                "nn.Embedding(..., sparse=False)) or give it a sparse optimizer"
            )
