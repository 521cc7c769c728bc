"""Input checks of the loss entry points: clear errors naming the argument, never a silent NaN.

Two kinds:

- **static** (:func:`check_inputs`): types, shapes, dtypes and the group layout, from metadata
  only; a non-tensor (a list, a numpy array) raises ``TypeError`` naming the argument.
- **values** (:func:`value_checks`): non-finite log-probs or advantages at valid positions, a mask
  that is not 0/1, advantages large enough to overflow the loss or its gradient, a window smaller
  than the call, plus any checks a caller adds (the vocabulary paths add out-of-range token ids).
  They are computed on the device as one bool vector with no host sync; :class:`ValueChecks`
  reads it once (the one sync) and raises a ``ValueError`` naming every failed check.  The loss
  entry points read it after queueing the forward math (``checks="eager"``), or hand it to the
  caller to read at its own next sync (``checks="deferred"``).

Non-finite values at *masked* positions are allowed: they are replaced before any arithmetic, so
they cannot leak into the loss or gradient.  The checks are skipped while ``torch.compile``
traces, so a compiled caller has no graph break.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..kernels.checks import check_tensor
from ..window import Window
from .math import compute_dtype, ratio_bound

Checks = Literal["eager", "deferred"]
CHECKS = ("eager", "deferred")

#: Headroom against overflow in the sum of Eq. 1 (the window may be split across ranks).
_OVERFLOW_MARGIN = 2.0**20


def check_inputs(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    group_size: int | None,
    completion_ids: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
) -> None:
    """Static checks (types, shapes, dtypes, group layout); ``ValueError``/``TypeError`` name the argument."""
    check_tensor("logp", logp)
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("completion_ids", completion_ids)):
        check_tensor(name, t, optional=True)
    check_tensor("advantages", advantages)
    check_tensor("mask", mask)
    if logp.dim() != 2:
        raise ValueError(f"logp must be a (B, T) tensor, got shape {tuple(logp.shape)}")
    if not logp.dtype.is_floating_point:
        raise ValueError(f"logp must be a floating tensor, got {logp.dtype}")
    shape = tuple(logp.shape)
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != logp shape {shape}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != logp shape {shape}")
    if mask.dtype.is_complex:
        raise ValueError(f"mask must be bool or 0/1 numeric, got {mask.dtype}")
    if not (advantages.dim() == 1 and advantages.shape[0] == shape[0]) and tuple(advantages.shape) != shape:
        raise ValueError(f"advantages must be (B,) = ({shape[0]},) or (B, T) = {shape}, got {tuple(advantages.shape)}")
    if not advantages.dtype.is_floating_point:
        raise ValueError(f"advantages must be a floating tensor, got {advantages.dtype}")
    if completion_ids is not None:
        if tuple(completion_ids.shape) != shape:
            raise ValueError(f"completion_ids shape {tuple(completion_ids.shape)} != logp shape {shape}")
        if (
            completion_ids.dtype.is_floating_point
            or completion_ids.dtype.is_complex
            or completion_ids.dtype == torch.bool
        ):
            raise ValueError(f"completion_ids must be an integer tensor, got {completion_ids.dtype}")
    for name, t in (
        ("old_logp", old_logp),
        ("advantages", advantages),
        ("mask", mask),
        ("ref_logp", ref_logp),
        ("completion_ids", completion_ids),
    ):
        if t is not None and t.device != logp.device:
            raise ValueError(f"{name} is on {t.device} but logp is on {logp.device}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
        if shape[0] % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide the batch of {shape[0]} rows; groups are consecutive "
                "blocks of group_size rows. If this micro-batch holds partial groups, precompute per-token "
                "advantages with prefix_consistent_advantages() over whole groups and pass group_size=None."
            )


@dataclass
class ValueChecks:
    """The value checks of one call as a device bool vector and what each entry means.

    :meth:`raise_if_bad` reads the flags (one host sync) and raises ``ValueError`` naming every
    failed check; ``flags`` is ``None`` when nothing was checked (empty batch, compile trace).
    """

    flags: torch.Tensor | None = None
    messages: tuple[str, ...] = ()
    _read: bool = field(default=False, repr=False)

    def raise_if_bad(self) -> None:
        """Read the flags (the one sync, at most once) and raise ``ValueError`` if any is set."""
        if self.flags is None or self._read:
            return
        self._read = True
        if not self.flags.any().item():  # the one host sync
            return
        raise ValueError("; ".join(m for m, bad in zip(self.messages, self.flags.tolist()) if bad))

    def extend(self, flags: Sequence[torch.Tensor], messages: Sequence[str]) -> ValueChecks:
        """These checks plus ``flags`` (0-dim bool tensors) with their ``messages``."""
        if not flags:
            return self
        new = torch.stack([f.reshape(()).to(torch.bool) for f in flags])
        if self.flags is not None:
            new = torch.cat([self.flags, new.to(self.flags.device)])
        return ValueChecks(new, self.messages + tuple(messages))


#: Bound on |log-probs| at valid positions: it keeps every ratio and KL term of Eq. 1 finite (a huge
#: finite value would overflow them); real log-probs are far inside it.
LOGP_BOUND = 1e6


def _outside_logprob_range(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Some valid entry is NaN, inf or beyond :data:`LOGP_BOUND` (NaN fails the comparison too)."""
    return (~(t.abs() <= LOGP_BOUND) & valid).any()


def value_checks(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None,
    window: Window,
    alpha: torch.Tensor,
    weights: dict[str, torch.Tensor | None] | None = None,
    entropy: torch.Tensor | None = None,
) -> ValueChecks:
    """The value checks of a loss call as device flags (no host sync; module docstring).

    ``alpha`` is the call's weight (:func:`grpo_fix.loss.math.window_alpha`): together with the
    ratio clamp it bounds the per-token gradient ``alpha |A| s`` and the loss, so advantages large
    enough to overflow either (in the log-probs' dtype / the compute dtype) are rejected instead
    of turning into inf or NaN.
    """
    if torch.compiler.is_compiling() or logp.numel() == 0:
        return ValueChecks()
    valid = mask.to(torch.bool)
    B = logp.shape[0]
    adv = advantages[:, None].expand_as(logp) if advantages.dim() == 1 else advantages
    adv_valid = torch.where(valid, adv, torch.zeros((), dtype=adv.dtype, device=adv.device))
    weighted = (alpha * adv_valid.abs().to(torch.float64)).expand_as(logp)
    growth = math.exp(ratio_bound(logp.dtype))
    checks: list[torch.Tensor | None] = [
        ((mask != 0) & (mask != 1)).any() if mask.dtype != torch.bool else None,
        _outside_logprob_range(logp, valid),
        _outside_logprob_range(old_logp, valid) if old_logp is not None else None,
        _outside_logprob_range(ref_logp, valid) if ref_logp is not None else None,
        (~torch.isfinite(adv) & valid).any(),
        (weighted.amax() * growth > torch.finfo(logp.dtype).max)
        | (weighted.sum() * growth * _OVERFLOW_MARGIN > torch.finfo(compute_dtype(logp.dtype)).max),
    ]
    messages = [
        "mask must contain only 0 and 1",
        *(
            f"{name} has NaN/inf at valid (mask=1) positions, or |values| > {LOGP_BOUND:g} (not log-probabilities)"
            for name in ("logp", "old_logp", "ref_logp")
        ),
        "advantages contain NaN/inf at valid (mask=1) positions",
        f"advantages are too large: alpha * |A| * ratio could overflow {logp.dtype} (the gradient) or the "
        "loss; normalise the rewards (group_advantages(..., scale='group')) or compute log-probs in float32",
    ]
    if window.tokens is not None:
        tokens = torch.as_tensor(window.tokens, dtype=torch.float64, device=logp.device)
        checks.append(~torch.isfinite(tokens) | (valid.sum() > tokens))
        messages.append(
            "Window.tokens / num_window_tokens is smaller than the valid tokens of this call (or not "
            "finite); it must count the whole optimizer window (all micro-batches, all ranks)"
        )
    if window.seqs is not None:
        seqs = torch.as_tensor(window.seqs, dtype=torch.float64, device=logp.device)
        checks.append(~torch.isfinite(seqs) | (seqs < B))
        messages.append(
            f"Window.seqs / num_window_seqs is smaller than the {B} sequences of this call (or not "
            "finite); it must count the sequences of the whole optimizer window"
        )
    for name, w in (weights or {}).items():
        if w is not None:
            checks.append(((~torch.isfinite(w) | (w < 0)) & valid).any())
            messages.append(f"{name} has NaN/inf or negative values at valid (mask=1) positions")
    if entropy is not None:
        checks.append((~torch.isfinite(entropy) & valid).any())
        messages.append("entropy has NaN/inf at valid (mask=1) positions")
    kept = [(f, m) for f, m in zip(checks, messages) if f is not None]
    return ValueChecks().extend([f for f, _ in kept], [m for _, m in kept])
