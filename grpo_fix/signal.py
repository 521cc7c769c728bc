"""The trust-region signal: what the loss measured about clipping, handed to the optimizer.

Paper background (arXiv 2601.05002, Prop. 3 / Prop. 7, Eqs. 28-37): once a token's importance
ratio leaves the clip region in its advantage's direction (the clipped region R_clip of Eq. 28)
its advantage gradient is zero, but AdamW's first moment keeps moving the parameters, so ratios
drift further past ``1 +- eps``.  The loss therefore measures, for every call, how much of the
advantage-gradient mass is still unclipped and how far ratios have already overshot; the trainer
sums these over the micro-batches of one optimizer window (and all-reduces over data-parallel
ranks) and hands the result to :class:`grpo_fix.ClipAwareAdamW` before the step.

For a token with weight ``alpha`` (the normaliser of the weighting), advantage ``A`` and
gradient coefficient ``s`` (the importance ratio for PPO-style ratios, the stop-gradient IS
weight for CISPO, 1 for GPG), its advantage-gradient mass is ``|alpha * A * s|``:

- ``active_mass``  = sum over tokens whose gradient is not zeroed by clipping,
- ``total_mass``   = sum over all valid tokens,
- ``kappa``        = active_mass / total_mass (1 when total_mass == 0): the unclipped fraction,
- ``num_overshoot``= tokens already beyond the clip region in their advantage's direction
  (``A > 0 and s > 1 + eps_high`` or ``A < 0 and s < 1 - eps_low``), i.e. tokens in R_clip,
- ``max_excess``   = max over tokens of how far ``log s`` is past the boundary in that
  direction (``log s - log(1 + eps_high)`` or ``log(1 - eps_low) - log s``, floored at 0),
- ``overshoot_fraction`` = num_overshoot / num_eligible, where eligible tokens are valid tokens
  with a non-zero advantage (zero-advantage tokens can never overshoot).

All fields are 0-dim float64 tensors on the loss's device, so accumulating them costs no host
synchronisation; ``rollout_start`` is a plain bool the trainer sets on the first window of a new
rollout batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

_SUM_FIELDS = ("active_mass", "total_mass", "num_tokens", "num_eligible", "num_clipped", "num_overshoot")
_MAX_FIELDS = ("max_excess",)
#: The tensor fields of a signal (everything but ``rollout_start``).
TENSOR_FIELDS = _SUM_FIELDS + _MAX_FIELDS


@dataclass(frozen=True)
class TrustRegionSignal:
    """Clipping statistics of one loss call or one optimizer window (see the module docstring)."""

    active_mass: torch.Tensor
    total_mass: torch.Tensor
    num_tokens: torch.Tensor
    num_eligible: torch.Tensor
    num_clipped: torch.Tensor
    num_overshoot: torch.Tensor
    max_excess: torch.Tensor
    rollout_start: bool = False

    @staticmethod
    def zeros(device: torch.device | str | None = None, *, rollout_start: bool = False) -> TrustRegionSignal:
        """An empty signal (the identity of :meth:`__add__`)."""
        z = torch.zeros((), dtype=torch.float64, device=device)
        kw: dict[str, Any] = {f: z.clone() for f in TENSOR_FIELDS}
        return TrustRegionSignal(**kw, rollout_start=rollout_start)

    # -- accumulation -----------------------------------------------------------------------
    def __add__(self, other: TrustRegionSignal) -> TrustRegionSignal:
        """Merge two signals of the same window: masses and counts add, ``max_excess`` takes the max."""
        if not isinstance(other, TrustRegionSignal):
            return NotImplemented
        kw: dict[str, Any] = {f: getattr(self, f) + getattr(other, f).to(getattr(self, f).device) for f in _SUM_FIELDS}
        kw["max_excess"] = torch.maximum(self.max_excess, other.max_excess.to(self.max_excess.device))
        return TrustRegionSignal(**kw, rollout_start=self.rollout_start or other.rollout_start)

    def with_rollout_start(self, flag: bool = True) -> TrustRegionSignal:
        """A copy with the rollout-boundary flag set (the trainer marks the first window of a batch)."""
        return replace(self, rollout_start=flag)

    def detach(self) -> TrustRegionSignal:
        return self._map(lambda t: t.detach())

    def to(self, device: torch.device | str) -> TrustRegionSignal:
        return self._map(lambda t: t.to(device))

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TrustRegionSignal:
        kw = {f.name: fn(getattr(self, f.name)) for f in fields(self) if f.name != "rollout_start"}
        return TrustRegionSignal(**kw, rollout_start=self.rollout_start)

    # -- distributed ------------------------------------------------------------------------
    def all_reduce(self, group: Any = None) -> TrustRegionSignal:
        """Sum the masses/counts and max the excess over the ranks of ``group`` (two collectives).

        Call it once per optimizer window, outside ``optimizer.step()``.  With NCCL the scalars
        must live on the GPU; the signal is moved to the backend's device and back.  Without an
        initialised process group this is the identity.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return self
        backend = dist.get_backend(group)
        home = self.active_mass.device
        dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        sums = torch.stack([getattr(self, f) for f in _SUM_FIELDS]).to(dev)
        maxes = torch.stack([self.max_excess, torch.tensor(float(self.rollout_start), dtype=torch.float64)]).to(dev)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
        sums, maxes = sums.to(home), maxes.to(home)
        kw = {f: sums[i] for i, f in enumerate(_SUM_FIELDS)}
        return TrustRegionSignal(**kw, max_excess=maxes[0], rollout_start=bool(maxes[1].item() > 0))

    # -- derived quantities -------------------------------------------------------------------
    @property
    def kappa(self) -> torch.Tensor:
        """Unclipped fraction of the advantage-gradient mass, in [0, 1]; 1 when nothing was measured."""
        total = self.total_mass
        return torch.where(total > 0, self.active_mass / total.clamp_min(1e-300), torch.ones_like(total)).clamp(0, 1)

    @property
    def overshoot_fraction(self) -> torch.Tensor:
        """Fraction of eligible (valid, non-zero-advantage) tokens already beyond the clip region."""
        return self.num_overshoot / self.num_eligible.clamp_min(1.0)

    @property
    def clip_fraction(self) -> torch.Tensor:
        """Fraction of valid tokens whose advantage gradient is zeroed by clipping."""
        return self.num_clipped / self.num_tokens.clamp_min(1.0)

    def _host_values(self) -> torch.Tensor:
        return torch.stack([getattr(self, f).double().cpu() for f in TENSOR_FIELDS])

    def is_finite(self) -> bool:
        """Whether every field is finite (one host sync)."""
        return bool(torch.isfinite(self._host_values()).all())

    def validate(self) -> None:
        """Raise ``ValueError`` on non-finite or negative fields (one host sync)."""
        vals = self._host_values()
        if not bool(torch.isfinite(vals).all()):
            raise ValueError(f"TrustRegionSignal has non-finite fields: {self.as_dict()}")
        if bool((vals < 0).any()):
            raise ValueError(f"TrustRegionSignal has negative masses or counts: {self.as_dict()}")
        if float(self.active_mass) > float(self.total_mass) * (1 + 1e-9) + 1e-300:
            raise ValueError(f"TrustRegionSignal has active_mass > total_mass: {self.as_dict()}")

    def as_dict(self) -> dict[str, float | bool]:
        """Host copy of every field plus the derived kappa/fractions (syncs; use for logging)."""
        out: dict[str, float | bool] = {f: float(getattr(self, f)) for f in TENSOR_FIELDS}
        out.update(
            kappa=float(self.kappa),
            overshoot_fraction=float(self.overshoot_fraction),
            clip_fraction=float(self.clip_fraction),
            rollout_start=self.rollout_start,
        )
        return out


class SignalAccumulator:
    """Sums the signals of one optimizer window's loss calls until the optimizer takes them.

    The one accumulator the adapters (TRL, verl), the examples and the README use::

        acc = SignalAccumulator()
        for mb in window:
            out = loss_fn(...); out.loss.backward(); acc.add(out.signal)
        opt.observe(acc.take(all_reduce=True, rollout_start=first_window_of_batch))

    :meth:`add` detaches (no autograd graph is kept) and costs no host sync.
    """

    def __init__(self) -> None:
        self._sum: TrustRegionSignal | None = None

    def add(self, signal: TrustRegionSignal) -> None:
        """Add one loss call's signal (``TypeError`` for anything else)."""
        if not isinstance(signal, TrustRegionSignal):
            raise TypeError(f"SignalAccumulator.add expects a TrustRegionSignal, got {type(signal).__name__}")
        signal = signal.detach()
        self._sum = signal if self._sum is None else self._sum + signal

    def __bool__(self) -> bool:
        return self._sum is not None

    def peek(self) -> TrustRegionSignal | None:
        """The sum so far, without clearing it (None when nothing was added)."""
        return self._sum

    def take(
        self, *, all_reduce: bool = False, group: Any = None, rollout_start: bool = False
    ) -> TrustRegionSignal | None:
        """The window's signal (None when nothing was added), and clear.

        ``all_reduce=True`` sums it over the ranks of ``group`` (:meth:`TrustRegionSignal.all_reduce`;
        every rank must call it; a rank that added nothing contributes zeros, so the collectives
        still match); ``rollout_start`` flags the first window of a rollout batch.
        """
        out, self._sum = self._sum, None
        if out is None:
            if not all_reduce:
                return None
            out = TrustRegionSignal.zeros()
        if all_reduce:
            out = out.all_reduce(group)
        return out.with_rollout_start(rollout_start) if rollout_start else out
