"""Packed (padding-free) inputs: the padded ``(B, T_max)`` view of a batch given by ``cu_seqlens``.

Sequence b of a packed batch is rows ``cu_seqlens[b]:cu_seqlens[b+1]``; the loss of a packed batch
is that of the padded batch, so the vocabulary paths compute log-probs on the packed rows and the
loss math runs on the padded view.  Position ids are not accepted: for completion-only packing
they continue the prompt's positions and do not mark where sequences start.
"""

from __future__ import annotations

from typing import Any, overload

import torch


class PackedLayout:
    """Padded ``(B, T_max)`` view of a packed (padding-free) batch described by ``cu_seqlens``.

    ``index[b, t]`` is the packed row of position (b, t) (0 for padding) and ``valid[b, t]`` says
    whether the position exists (``t < len_b``).  Building it needs one host sync (``T_max``).
    """

    def __init__(self, cu_seqlens: torch.Tensor, total: int) -> None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D tensor [0, len_0, len_0 + len_1, ...] of B + 1 offsets")
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
            raise ValueError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
        cu = cu_seqlens.to(torch.int64)
        lengths = cu[1:] - cu[:-1]
        first, last = int(cu[0]), int(cu[-1])
        if first != 0 or last != total or bool((lengths < 0).any()):
            raise ValueError(
                f"cu_seqlens must start at 0, be non-decreasing and end at the packed length {total}; "
                f"got start {first}, end {last}"
            )
        self.B = lengths.numel()
        self.T = max(int(lengths.max()), 1)
        t = torch.arange(self.T, device=cu.device)
        self.valid = t[None, :] < lengths[:, None]
        self.index = torch.where(
            self.valid, cu[:-1, None] + t[None, :], torch.zeros((), dtype=torch.int64, device=cu.device)
        )

    @overload
    def pad(self, x: torch.Tensor, name: str, fill: float | bool = 0) -> torch.Tensor: ...
    @overload
    def pad(self, x: None, name: str, fill: float | bool = 0) -> None: ...
    def pad(self, x: torch.Tensor | None, name: str, fill: float | bool = 0) -> torch.Tensor | None:
        """A packed ``(N,)`` tensor as ``(B, T_max)`` (differentiable gather; ``fill`` at padding)."""
        if x is None:
            return None
        if x.dim() != 1:
            raise ValueError(f"with cu_seqlens, {name} must be packed (N,), got {tuple(x.shape)}")
        out = x[self.index]
        return torch.where(self.valid, out, torch.full((), fill, dtype=x.dtype, device=x.device))

    def pad_token_weights(self, x: torch.Tensor | None, name: str) -> torch.Tensor | None:
        """Per-token packed ``(N,)`` weights padded to ``(B, T_max)``; per-sequence ``(B,)`` ones as they are."""
        if x is None or x.dim() != 1 or x.shape[0] == self.B:
            return x
        return self.pad(x, name)

    @classmethod
    def for_inputs(
        cls,
        cu_seqlens: torch.Tensor,
        rows: Any,
        name: str,
        mask: torch.Tensor | None,
        advantages: torch.Tensor,
        **packed: torch.Tensor | None,
    ) -> tuple[PackedLayout, torch.Tensor, torch.Tensor]:
        """Validate packed inputs and build the layout: ``rows`` is the packed ``(N, ·)`` tensor
        the tokens read (the logits or the hidden states, called ``name`` in errors), ``packed``
        the ``(N,)`` ones.  Returns ``(layout, mask, advantages)`` with a default all-true mask
        and per-token packed advantages padded to ``(B, T_max)``."""
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
            raise ValueError(f"with cu_seqlens, {name} must be packed (N, ·), got {getattr(rows, 'shape', type(rows))}")
        total, device = rows.shape[0], rows.device
        if mask is None:
            mask = torch.ones(total, dtype=torch.bool, device=device)
        _check_packed_len(total, mask=mask, **packed)
        lay = cls(cu_seqlens.to(device), total)
        if advantages.dim() == 1 and advantages.shape[0] == total and total != lay.B:
            advantages = lay.pad(advantages, "advantages")
        return lay, mask, advantages


def _check_packed_len(layout_total: int, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and (t.dim() != 1 or t.shape[0] != layout_total):
            raise ValueError(f"with cu_seqlens, {name} must be packed ({layout_total},), got {tuple(t.shape)}")
