"""The unified GRPO surrogate (paper Eq. 1) on log-probs: :func:`surrogate_loss`, the single
source of truth that every backend and adapter runs.

**The corrected loss** (``preset="uniform"``) takes ``alpha = 1 / N_window`` (every valid token of
the optimizer window weighs the same, however the window is split into micro-batches or ranks),
token-level ratios (so omega = alpha * s is identical on a shared prefix) and prefix-consistent
clipping (:mod:`grpo_fix.loss.prefix`).  Then a prefix shared by the whole group gets exactly zero
gradient, clipped or not (Prop. 1, Case 1 made robust to clipping).

**Windows.**  Pass the :class:`grpo_fix.Window` of the call (tokens and sequences of the whole
optimizer window, micro-batches, data-parallel ranks) and the accumulated, rank-averaged gradient
is exactly the gradient of the window objective.  The returned loss is already scaled for
gradient accumulation (TRL's ``loss_is_scaled_for_ga``): do not divide it again.

**The loss value is not a progress metric** (paper Prop. 4, App. A): with centred advantages it is
dominated by the weighting, the KL term and ratio noise.  Log rewards; the metrics returned here
are diagnostics of the optimisation (clip fractions, KL, the trust-region signal, W_agg).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..kernels.checks import check_tensor
from ..options import CompileMath, check_compile_math
from ..signal import TrustRegionSignal
from ..window import Window
from .compiled import run_math, use_compiled
from .config import SurrogateConfig
from .diagnostics import trust_region_diagnostics
from .math import masked, spans_calls, token_advantages, token_terms, window_alpha
from .prefix import PrefixClasses, prefix_classes
from .validation import (
    CHECKS,
    Checks,
    ValueChecks,
    check_inputs,
    math_value_flags,
    math_value_messages,
    outer_value_checks,
)

#: Attribute set on every loss tensor this module returns: whether it is normalised over an
#: optimizer window of several calls (:func:`~grpo_fix.loss.math.spans_calls`), i.e. already
#: scaled for gradient accumulation.  Read by the DeepSpeed adapter's loop checks.
WINDOW_NORMALISED = "grpo_fix_window_normalised"


@dataclass(frozen=True)
class SurrogateOutput:
    """``loss`` (scalar, GA-scaled), ``signal`` (:class:`TrustRegionSignal` of this call) and
    ``metrics`` (detached 0-dim tensors: ``clip_low``, ``clip_high``, ``clip_region``, ``kl``
    when a reference is given, ``w_agg`` / ``w_agg_abs`` when ``completion_ids`` and
    ``group_size`` are given).  No host synchronisation happens until you read them.

    ``checks``: the value checks of the call; with ``checks="deferred"`` call
    :meth:`raise_on_bad_input` at your next sync (before the optimizer step), otherwise they
    were already read.
    """

    loss: torch.Tensor
    signal: TrustRegionSignal
    metrics: dict[str, torch.Tensor]
    checks: ValueChecks = field(default_factory=ValueChecks, repr=False)

    def raise_on_bad_input(self) -> None:
        """Read the value checks (one host sync, at most once) and raise ``ValueError`` naming
        every failed one."""
        self.checks.raise_if_bad()


def check_call(
    cfg: SurrogateConfig,
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    group_size: int | None,
    completion_ids: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    checks: str,
) -> None:
    """The static checks every entry point runs before any work."""
    check_inputs(logp, old_logp, advantages, mask, group_size, completion_ids, ref_logp)
    if cfg.beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={cfg.beta} needs ref_logp (reference-policy log-probs); pass it or set beta=0")
    if cfg.prefix_consistent and completion_ids is not None and group_size is None:
        raise ValueError("prefix-consistent clipping with completion_ids needs group_size (whole groups)")
    if checks not in CHECKS:
        raise ValueError(f"checks must be one of {CHECKS}, got {checks!r}")


def surrogate_loss(
    cfg: SurrogateConfig,
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    group_size: int | None,
    completion_ids: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    window: Window | None = None,
    is_ratio: torch.Tensor | None = None,
    policy_mask: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    classes: PrefixClasses | None = None,
    compile_math: CompileMath = "auto",
    checks: Checks = "eager",
    extra_checks: ValueChecks | None = None,
    **legacy_window: Any,
) -> SurrogateOutput:
    """Eq. 1 on ``(B, T)`` log-probs (the functional form of :class:`~grpo_fix.GroupSurrogateLoss`).

    Args:
        cfg: the configuration (a :data:`~grpo_fix.PRESETS` entry or any :class:`SurrogateConfig`).
        logp: log-probs of the completion tokens under the current policy (with grad).
        old_logp: under the sampling policy; None means on-policy (``logp.detach()``, ratio 1).
        advantages: ``(B,)`` or per-token ``(B, T)``.
        mask: ``(B, T)`` bool or 0/1; masked positions may hold anything.
        group_size: G, groups are consecutive blocks of G rows; None when the call holds partial
            or shuffled groups (precompute prefix-consistent advantages at rollout time).
        completion_ids: ``(B, T)`` token ids: inline prefix-consistent advantages (whole groups)
            and the W_agg metric.
        ref_logp: reference-policy log-probs, required when ``beta > 0``.
        window: the optimizer window (:class:`grpo_fix.Window`); default: this call alone.
        is_ratio: ``(B, T)``, ``(B, 1)`` or ``(B,)`` importance ratio of the sampler (TRL's vLLM
            correction ``pi_old / pi_sampler``, already truncated or masked), >= 0; it multiplies
            the policy term (VESPO: enters the sequence weight).
        policy_mask: ``(B, T)`` (or broadcastable) weights >= 0 on the policy term, e.g. TRL's
            high-entropy token mask; the entropy bonus acts on the same tokens.
        entropy: ``(B, T)`` per-token entropies with grad (from the logits), for the entropy
            bonus ``- entropy_coef * mean H`` (averaged as ``cfg.entropy_weighting`` says).
        entropy_coef: the bonus coefficient (a call argument: TRL adapts it every step).
        classes: the prefix classes of ``completion_ids`` when the caller already has them
            (:func:`grpo_fix.prefix_classes` at rollout time saves the host sync of
            ``torch.unique`` here).
        compile_math: ``"auto"``, ``"always"`` or ``"never"`` (:mod:`grpo_fix.loss.compiled`).
        checks: ``"eager"`` reads the value checks once the forward math is queued (one host
            sync); ``"deferred"`` returns them unread in ``out.checks``: no host sync at all, and
            the caller must call ``out.raise_on_bad_input()`` before stepping the optimizer.
        extra_checks: device-side checks of the caller (the vocabulary paths' token-id range),
            read together with these.
        **legacy_window: ``num_window_tokens``, ``num_window_seqs``, ``num_micro_batches``,
            ``dp_size`` of earlier releases (deprecated; use ``window``).
    """
    win = Window.resolve(window, legacy_window)
    check_call(cfg, logp, old_logp, advantages, mask, group_size, completion_ids, ref_logp, checks)
    is_ratio = as_token_weights("is_ratio", is_ratio, logp)
    policy_mask = as_token_weights("policy_mask", policy_mask, logp)
    check_entropy(entropy, entropy_coef, logp)
    if classes is not None and (group_size is None or tuple(classes.index.shape) != tuple(logp.shape)):
        raise ValueError(f"classes must come with group_size and match logp's shape {tuple(logp.shape)}")
    compiled = use_compiled(check_compile_math(compile_math), logp)

    valid = mask.to(torch.bool)
    if classes is None and completion_ids is not None and group_size:
        classes = prefix_classes(completion_ids, group_size, valid)
    adv = token_advantages(cfg, advantages, valid, classes)
    alpha = window_alpha(cfg, valid, win)
    bonus = entropy_scale(cfg, entropy_coef, valid, policy_mask, win) if entropy is not None and entropy_coef else None
    # an outer torch.compile trace of the caller gets no checks (reading them would break its graph);
    # our own compiled math computes them inside its graph
    check = not torch.compiler.is_compiling()
    loss, signal, metrics, flags = run_math(
        policy_math,
        cfg,
        compiled,
        logp,
        old_logp,
        adv,
        valid,
        ref_logp,
        alpha,
        classes,
        group_size,
        is_ratio,
        policy_mask,
        entropy if bonus is not None else None,
        bonus,
        check,
    )
    found = outer_value_checks(mask, win, signal.num_tokens, logp.shape[0])
    if flags is not None:
        names = [n for n, w in (("is_ratio", is_ratio), ("policy_mask", policy_mask)) if w is not None]
        found = found.extend(
            flags, math_value_messages(logp.dtype, old_logp is not None, ref_logp is not None, names, bonus is not None)
        )
    if extra_checks is not None:
        found = found + extra_checks
    setattr(loss, WINDOW_NORMALISED, spans_calls(cfg, win))
    out = SurrogateOutput(loss=loss, signal=signal, metrics=metrics, checks=found)
    if checks == "eager":
        out.raise_on_bad_input()
    return out


def policy_math(
    cfg: SurrogateConfig,
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    valid: torch.Tensor,
    ref_logp: torch.Tensor | None,
    alpha: torch.Tensor,
    classes: PrefixClasses | None,
    group_size: int | None,
    is_ratio: torch.Tensor | None = None,
    policy_mask: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    bonus: torch.Tensor | None = None,
    check: bool = True,
) -> tuple[torch.Tensor, TrustRegionSignal, dict[str, torch.Tensor], torch.Tensor | None]:
    """The part of Eq. 1 that depends on the current log-probs: ``(loss, signal, metrics, value
    flags)`` from token advantages ``adv`` and weights ``alpha`` (what :func:`surrogate_loss` runs,
    compiled or not; see :mod:`grpo_fix.loss.compiled`), minus the entropy bonus
    ``bonus * sum_t H m`` when ``entropy`` is given (``bonus`` from :func:`entropy_scale`).  The
    value checks that read the log-probs are computed here, from the tensors the math sanitised,
    so a compiled caller fuses them too (None for an empty batch or ``check=False``)."""
    terms = token_terms(cfg, logp, old_logp, adv, valid, ref_logp, alpha, is_ratio, policy_mask)
    loss = terms.loss
    if entropy is not None and bonus is not None:
        m = terms.mask if policy_mask is None else masked(policy_mask.detach(), terms.mask)
        loss = loss - (masked(entropy, terms.mask) * m).sum() * bonus.to(m.dtype)
    with torch.no_grad():
        signal, metrics = trust_region_diagnostics(cfg, valid, terms, classes, group_size)
        flags = None
        if check and logp.numel():
            flags = math_value_flags(
                terms.logp,
                terms.old_logp if old_logp is not None else None,
                adv,
                terms.mask,
                alpha,
                ref_logp,
                (is_ratio, policy_mask),
                entropy if bonus is not None else None,
                loss,
            )
    return loss, signal, metrics, flags


def entropy_scale(
    cfg: SurrogateConfig, coef: float, valid: torch.Tensor, policy_mask: torch.Tensor | None, window: Window
) -> torch.Tensor:
    """The factor of ``sum_t H m`` in the entropy bonus: ``coef`` over the window's tokens
    (``"window"``: times ``dp_size``, like the policy term) or over this micro-batch's effective
    tokens and the accumulation steps (``"micro_batch"``, TRL 1.16)."""
    m = valid.to(torch.float64)
    if cfg.entropy_weighting == "micro_batch":
        if policy_mask is not None:
            m = m * policy_mask.detach().to(m.dtype)
        return coef / (m.sum().clamp_min(1.0) * window.micro_batches)
    n = m.sum() if window.tokens is None else torch.as_tensor(window.tokens, dtype=m.dtype, device=m.device)
    return coef * window.dp_size / n.clamp_min(1.0)


def as_token_weights(name: str, t: torch.Tensor | None, logp: torch.Tensor) -> torch.Tensor | None:
    """``is_ratio`` / ``policy_mask`` as a float tensor broadcastable to ``(B, T)`` (``(B,)`` becomes
    ``(B, 1)``); ``ValueError`` naming the argument for any other shape."""
    if t is None:
        return None
    check_tensor(name, t)
    B, T = logp.shape
    if t.dim() == 1 and t.shape[0] == B:
        t = t[:, None]
    if t.dim() != 2 or t.shape[0] != B or t.shape[1] not in (1, T):
        raise ValueError(f"{name} must be (B, T) = {(B, T)}, (B, 1) or (B,), got {tuple(t.shape)}")
    if t.device != logp.device:
        raise ValueError(f"{name} is on {t.device} but logp is on {logp.device}")
    return t if t.dtype.is_floating_point else t.float()


def check_entropy(entropy: torch.Tensor | None, coef: float, logp: torch.Tensor) -> None:
    """The entropy bonus's inputs: a floating ``(B, T)`` ``entropy`` and a finite Python coefficient."""
    if isinstance(coef, bool) or not isinstance(coef, (int, float)):
        raise TypeError(f"entropy_coef must be a Python number, got {type(coef).__name__}")
    if not math.isfinite(coef):
        raise ValueError(f"entropy_coef must be finite, got {coef}")
    if entropy is None:
        if coef:
            raise ValueError(f"entropy_coef={coef} needs entropy (per-token entropies with grad)")
        return
    check_tensor("entropy", entropy)
    if tuple(entropy.shape) != tuple(logp.shape) or not entropy.dtype.is_floating_point:
        raise ValueError(
            f"entropy must be a floating (B, T) = {tuple(logp.shape)} tensor, got "
            f"{entropy.dtype} {tuple(entropy.shape)}"
        )
