"""The optimizer window a loss call belongs to: one typed value instead of four loose counts.

One optimizer step sums the gradients of ``micro_batches`` loss calls (gradient accumulation) on
each of ``dp_size`` data-parallel ranks, whose gradients DDP / DeepSpeed / FSDP *average*.  The
weightings of Eq. 1 normalise over that whole window, so a call must know its size:

- ``tokens``: valid (mask = 1) completion tokens of the whole window, all micro-batches and all
  ranks (``uniform`` / ``dapo``: ``alpha = 1 / tokens``);
- ``seqs``: sequences of the whole window (``seq_mean``: ``alpha = 1 / (seqs |o_i|)``);
- ``micro_batches``: gradient-accumulation steps per optimizer step (``bnpo``, ``dr_grpo``, and
  the default of ``seqs``);
- ``dp_size``: ranks whose gradients are averaged (the loss is multiplied by it to undo the
  averaging, as verl and OpenRLHF do; pass 1 if you sum gradients yourself).

``None`` for ``tokens`` / ``seqs`` means "this call is the whole window on this rank" (its own
valid tokens; ``B * micro_batches * dp_size`` sequences).  Python numbers are checked here;
0-dim tensors (counts computed on the device, e.g. all-reduced) are checked without a host sync
by the loss's value checks, which also reject a window smaller than the call itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .options import deprecated

Count = int | float | torch.Tensor

#: The keyword arguments of earlier releases, mapped to :class:`Window` fields.
LEGACY_KEYWORDS = {
    "num_window_tokens": "tokens",
    "num_window_seqs": "seqs",
    "num_micro_batches": "micro_batches",
    "dp_size": "dp_size",
}


def _check_count(name: str, value: Count | None) -> None:
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(
                f"Window.{name} must be a real 0-dim tensor or a number, got {value.dtype} "
                f"of shape {tuple(value.shape)}"
            )
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Window.{name} must be a number or a 0-dim tensor, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"Window.{name} must be finite and > 0, got {value!r}")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Window.{name} must be an int >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"Window.{name} must be >= 1, got {value}")


@dataclass(frozen=True)
class Window:
    """Size of the optimizer window of a loss call (module docstring).

    Args:
        tokens: valid tokens of the whole window over all micro-batches and ranks (default: the
            call's own).
        seqs: sequences of the whole window (default ``B * micro_batches * dp_size``).
        micro_batches: gradient-accumulation steps of the window (default 1).
        dp_size: data-parallel ranks whose gradients are averaged (default 1).
    """

    tokens: Count | None = None
    seqs: Count | None = None
    micro_batches: int = 1
    dp_size: int = 1

    def __post_init__(self) -> None:
        _check_count("tokens", self.tokens)
        _check_count("seqs", self.seqs)
        _check_positive_int("micro_batches", self.micro_batches)
        _check_positive_int("dp_size", self.dp_size)

    @classmethod
    def resolve(cls, window: Window | None, legacy: dict[str, Any]) -> Window:
        """``window``, or one built from the keyword arguments of earlier releases
        (``num_window_tokens``, ``num_window_seqs``, ``num_micro_batches``, ``dp_size``; each
        accepted with a ``DeprecationWarning``).  Unknown keywords raise ``TypeError``."""
        unknown = sorted(set(legacy) - set(LEGACY_KEYWORDS))
        if unknown:
            raise TypeError(f"unexpected keyword arguments {unknown}")
        given = {k: v for k, v in legacy.items() if v is not None}
        if not given:
            return cls() if window is None else window
        if window is not None:
            raise TypeError(f"pass window=Window(...) or the deprecated {sorted(given)}, not both")
        deprecated(", ".join(sorted(given)), "window=grpo_fix.Window(tokens=, seqs=, micro_batches=, dp_size=)")
        return cls(**{LEGACY_KEYWORDS[k]: v for k, v in given.items()})
