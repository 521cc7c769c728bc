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
from .math import compute_dtype, masked, ratio_bound

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
    """The value checks of one call: device bool vectors and what each entry means.

    :meth:`raise_if_bad` reads them (one host sync) and raises ``ValueError`` naming every failed
    check; nothing is read when nothing was checked (an empty batch, a compile trace).
    """

    parts: tuple[torch.Tensor, ...] = ()
    messages: tuple[str, ...] = ()
    _read: bool = field(default=False, repr=False)

    @property
    def flags(self) -> torch.Tensor | None:
        """All flags as one bool vector (None when nothing was checked)."""
        if not self.parts:
            return None
        return self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)

    def raise_if_bad(self) -> None:
        """Read the flags (the one sync, at most once) and raise ``ValueError`` if any is set."""
        flags = self.flags
        if flags is None or self._read or torch.compiler.is_compiling():
            return
        self._read = True
        if not flags.any().item():  # the one host sync
            return
        raise ValueError("; ".join(m for m, bad in zip(self.messages, flags.tolist()) if bad))

    def extend(self, flags: torch.Tensor | Sequence[torch.Tensor], messages: Sequence[str]) -> ValueChecks:
        """These checks plus ``flags`` (a bool vector, or 0-dim bool tensors) with their ``messages``."""
        if not isinstance(flags, torch.Tensor):
            if not flags:
                return self
            flags = torch.stack([f.reshape(()) for f in flags])
        return ValueChecks(self.parts + (flags,), self.messages + tuple(messages))

    def __add__(self, other: ValueChecks) -> ValueChecks:
        return ValueChecks(self.parts + other.parts, self.messages + other.messages)


#: Bound on |log-probs| at valid positions: it keeps every ratio and KL term of Eq. 1 finite (a huge
#: finite value would overflow them); real log-probs are far inside it.
LOGP_BOUND = 1e6


def _beyond(t: torch.Tensor, bound: float) -> torch.Tensor:
    """0-dim flag: some entry of ``t`` (0 where masked) is NaN, inf or beyond ``bound`` in magnitude
    (one reduction; NaN fails the comparison)."""
    if not t.numel():
        return torch.zeros((), dtype=torch.bool, device=t.device)
    low, high = torch.aminmax(t)
    return ~((high <= bound) & (low >= -bound))


def math_value_flags(
    lp: torch.Tensor,
    old: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    alpha: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    weights: Sequence[torch.Tensor | None] = (),
    entropy: torch.Tensor | None = None,
    loss: torch.Tensor | None = None,
) -> torch.Tensor:
    """The value checks that read the log-probs, as one bool vector (order of :func:`math_value_messages`).

    Computed inside the loss's math (so ``torch.compile`` fuses them with it) from the tensors the
    math already sanitised (0 where masked, +-dtype max where a valid entry was NaN/inf): ``lp``,
    ``old`` and ``adv``; ``mask`` is the 0/1 float mask.  ``alpha`` with the ratio clamp bounds the
    per-token gradient ``alpha |A| s`` and the loss: advantages large enough to overflow either (in
    the log-probs' dtype / the compute dtype) are flagged with NaN/inf ones instead of turning into
    inf or NaN.
    """
    growth = math.exp(ratio_bound(lp.dtype))
    # largest |dL/dlogp| the clamp allows must fit the gradient's dtype, and n of them the loss's
    limit = min(torch.finfo(lp.dtype).max, torch.finfo(compute_dtype(lp.dtype)).max / (mask.numel() * _OVERFLOW_MARGIN))
    weight = alpha if alpha.dim() == 0 else alpha.amax()
    flags = [
        _beyond(lp, LOGP_BOUND),
        *([_beyond(old, LOGP_BOUND)] if old is not None else []),
        *([_beyond(masked(ref_logp, mask), LOGP_BOUND)] if ref_logp is not None else []),
        _beyond(adv * weight.to(adv.dtype), limit / growth),
    ]
    for w in weights:
        if w is not None:
            wv = masked(w, mask)
            flags.append(
                ~(wv.amin() >= 0) | _beyond(wv, torch.finfo(wv.dtype).max / 2)
                if wv.numel()
                else torch.zeros((), dtype=torch.bool, device=mask.device)
            )
    if entropy is not None:
        flags.append(_beyond(masked(entropy.detach(), mask), torch.finfo(mask.dtype).max / 2))
    if loss is not None:
        flags.append(~(loss.detach().abs() <= math.inf))
    return torch.stack(flags)


def math_value_messages(
    lp_dtype: torch.dtype,
    has_old: bool,
    has_ref: bool,
    weight_names: Sequence[str],
    has_entropy: bool,
    has_loss: bool = True,
) -> tuple[str, ...]:
    """What each entry of :func:`math_value_flags` reports."""

    def logprobs(name: str) -> str:
        return f"{name} has NaN/inf at valid (mask=1) positions, or |values| > {LOGP_BOUND:g} (not log-probabilities)"

    return (
        logprobs("logp"),
        *([logprobs("old_logp")] if has_old else []),
        *([logprobs("ref_logp")] if has_ref else []),
        f"advantages contain NaN/inf at valid (mask=1) positions, or are too large: alpha * |A| * ratio could "
        f"overflow {lp_dtype} (the gradient) or the loss; normalise the rewards "
        "(group_advantages(..., scale='group')) or compute log-probs in float32",
        *(f"{name} has NaN/inf or negative values at valid (mask=1) positions" for name in weight_names),
        *(["entropy has NaN/inf at valid (mask=1) positions"] if has_entropy else []),
        *(["the loss is not finite (an input outside the checked ranges overflowed the math)"] if has_loss else []),
    )


def outer_value_checks(mask: torch.Tensor, window: Window, num_tokens: torch.Tensor, rows: int) -> ValueChecks:
    """The value checks that do not read the log-probs: a mask of 0/1 (non-bool masks only) and a
    window at least as large as the call (``num_tokens``: the call's valid tokens)."""
    if torch.compiler.is_compiling() or mask.numel() == 0:
        return ValueChecks()
    flags, messages = [], []
    if mask.dtype != torch.bool:
        flags.append(((mask != 0) & (mask != 1)).any())
        messages.append("mask must contain only 0 and 1")
    if window.tokens is not None:
        tokens = torch.as_tensor(window.tokens, dtype=torch.float64, device=num_tokens.device)
        flags.append(~torch.isfinite(tokens) | (num_tokens > tokens))
        messages.append(
            "Window.tokens / num_window_tokens is smaller than the valid tokens of this call (or not "
            "finite); it must count the whole optimizer window (all micro-batches, all ranks)"
        )
    if window.seqs is not None:
        seqs = torch.as_tensor(window.seqs, dtype=torch.float64, device=num_tokens.device)
        flags.append(~torch.isfinite(seqs) | (seqs < rows))
        messages.append(
            f"Window.seqs / num_window_seqs is smaller than the {rows} sequences of this call (or not "
            "finite); it must count the sequences of the whole optimizer window"
        )
    return ValueChecks().extend(flags, messages)
