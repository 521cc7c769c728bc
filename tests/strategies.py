"""Hypothesis strategies shared by the hostile-input tests of every public entry point.

One vocabulary of "what a hostile caller passes": tensors with NaN / +-inf / huge / tiny values at
chosen positions, odd dtypes, shapes that almost match, masks that are not 0/1, non-tensors.  A new
entry point gets covered by adding one case that draws from these.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

#: Values a hostile caller puts into a float tensor.
SPECIAL_FLOATS = (math.nan, math.inf, -math.inf, 3.0e38, -3.0e38, 1e-45, -1e-45, 0.0, -0.0, 1e30, -1e30)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@st.composite
def poisoned(
    draw: st.DrawFn,
    base: torch.Tensor,
    *,
    at: torch.Tensor | None = None,
    values: tuple[float, ...] = SPECIAL_FLOATS,
    max_count: int = 3,
) -> torch.Tensor:
    """A copy of ``base`` with up to ``max_count`` entries replaced by hostile values, at positions
    where ``at`` is True (anywhere when ``at`` is None)."""
    out = base.clone()
    flat = out.view(-1)
    allowed = torch.arange(flat.numel()) if at is None else at.reshape(-1).nonzero().squeeze(1)
    if allowed.numel() == 0:
        return out
    for _ in range(draw(st.integers(1, max_count))):
        i = int(allowed[draw(st.integers(0, allowed.numel() - 1))])
        flat[i] = draw(st.sampled_from(values))
    return out


@st.composite
def batch_shapes(draw: st.DrawFn, max_b: int = 6, max_t: int = 7, group_sizes: tuple[int, ...] = (1, 2, 3)) -> tuple:
    """``(B, T, G)`` with ``G`` dividing ``B`` (B may be 0 only when ``allow_empty``)."""
    g = draw(st.sampled_from(group_sizes))
    b = g * draw(st.integers(1, max(1, max_b // g)))
    return b, draw(st.integers(1, max_t)), g


@st.composite
def masks(draw: st.DrawFn, shape: tuple[int, int], *, allow_empty_rows: bool = True) -> torch.Tensor:
    """A bool mask of ``shape``, with whole rows masked out sometimes."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) < draw(st.floats(0.3, 1.0))
    if allow_empty_rows and shape[0] and draw(st.booleans()):
        m[draw(st.integers(0, shape[0] - 1))] = False
    return m


def not_tensors(shape: tuple[int, ...]) -> st.SearchStrategy[Any]:
    """What users pass instead of a tensor: lists, numpy arrays, numbers, None-like strings."""
    arr = np.zeros(shape, dtype=np.float32)
    return st.sampled_from([arr, arr.tolist(), 1.0, "logp"])


def tensor_seed() -> st.SearchStrategy[int]:
    return st.integers(0, 2**31 - 1)
