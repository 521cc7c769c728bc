"""The per-token arithmetic of the unified surrogate (paper Eq. 1): weights, advantages, terms.

For valid completion tokens (mask = 1) the loss is ``L = -J`` with

    J = sum_{i,t} alpha_{i,t} * [ phi(s_{i,t}, A_{i,t}) - beta * KL_{i,t} ]              (Eq. 1)

    phi = min(min(s, delta) * A, clip(s, 1 - eps_low, 1 + eps_high) * A)   token / sequence ratios
    phi = sg(clip(s, 1 - eps_low, 1 + eps_high)) * A * log pi              CISPO (``sg_logp``)
    phi = A * log pi                                                       GPG (``logp``)

with the ratio, weighting and KL estimator chosen by :class:`~grpo_fix.SurrogateConfig` (table in
:mod:`grpo_fix.loss.config`).  The gradient on the log-prob of token (i, t) is ``-alpha A s``
where unclipped (Eq. 15) and 0 where clipped (Eq. 28).

Everything here is split so that callers that chunk a batch (the logits-free path) can compute
what needs whole groups or the whole window once (:func:`token_advantages`,
:func:`window_alpha`) and run :func:`token_terms` on any split of the rows.

Masks are float (1 valid, 0 masked) and every per-token selection is arithmetic (products with
0/1 masks, steps from ``sign``): on CPU ``torch.where``, comparisons and bool/float mixes cost
5-30x a multiply per element, and under ``torch.compile`` the arithmetic fuses all the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..window import Window
from .config import RATIO_GATED, SurrogateConfig
from .prefix import PrefixClasses

#: |log-ratio| and |ref - logp| are clamped to this before ``exp`` (as verl and OpenRLHF do), so
#: a ratio never overflows to inf; it only matters beyond ratios of e^20 ~ 4.9e8.  For 16-bit
#: log-probs the bound is lowered to log(max of the dtype) - 4 (fp16: ~7.1) so that the gradient,
#: which is returned in the input's dtype and scales with the ratio, cannot overflow either.
LOG_RATIO_CLAMP = 20.0


def ratio_bound(dtype: torch.dtype) -> float:
    """The clamp of ``log s`` for log-probs of ``dtype`` (see :data:`LOG_RATIO_CLAMP`)."""
    return min(LOG_RATIO_CLAMP, math.log(torch.finfo(dtype).max) - 4.0)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in for log-probs of ``dtype``: fp32, or fp64 for fp64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def float_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``valid`` (bool or 0/1) as a ``dtype`` mask (no copy when it already is one)."""
    return valid if valid.dtype == dtype else valid.to(dtype)


def step(x: torch.Tensor) -> torch.Tensor:
    """1 where ``x > 0`` else 0, in ``x``'s float dtype (a comparison without the bool round trip)."""
    return x.sign().clamp_min(0.0)


class _Masked(torch.autograd.Function):
    """``x`` at valid positions and exactly 0 at masked ones, whatever ``x`` holds there; valid
    NaN/inf become +-(dtype max), which the value checks flag.  Gradient: ``grad * mask``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        big = torch.finfo(x.dtype).max
        ctx.save_for_backward(m)
        return x.nan_to_num(nan=big, posinf=big, neginf=-big).mul_(m)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (m,) = ctx.saved_tensors
        return grad * m, None


def masked(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """:class:`_Masked` for tensors with grad, the same two passes without autograd otherwise."""
    x = x.to(m.dtype)
    if x.requires_grad and torch.is_grad_enabled():
        return _Masked.apply(x, m)
    big = torch.finfo(x.dtype).max
    return x.nan_to_num(nan=big, posinf=big, neginf=-big) * m


@dataclass(frozen=True)
class TokenTerms:
    """Row-local pieces of Eq. 1 for one set of complete rows (see :func:`token_terms`).  The
    masks are computed once here, as 0/1 floats, and shared with the diagnostics (they are exactly
    what the loss used)."""

    loss: torch.Tensor  # sum_{i,t} alpha * (-phi + beta * KL), scalar with grad
    mask: torch.Tensor  # 1 valid, 0 masked (float)
    logp: torch.Tensor  # the log-probs, 0 where masked, detached
    old_logp: torch.Tensor  # the sampler's log-probs, 0 where masked
    adv: torch.Tensor  # effective advantages (filters, policy_mask, is_ratio applied), 0 where masked
    weighted_adv: torch.Tensor  # alpha * adv
    ratio: torch.Tensor  # s, detached, (B, T) or (B, 1)
    log_ratio: torch.Tensor  # log s, detached, same shape
    pos: torch.Tensor  # 1 where adv > 0
    neg: torch.Tensor  # 1 where adv < 0
    over_high: torch.Tensor | None  # pos and s > 1 + eps_high (the clip metrics); None: zeroed * pos
    over_low: torch.Tensor | None  # neg and s < 1 - eps_low; None: zeroed * neg
    overshoot: torch.Tensor  # past the trust region (the clip range widened to contain 1): the signal
    zeroed: torch.Tensor | None  # 1 where clipping zeroes the advantage gradient (Eq. 28); None: never
    grad_scale: torch.Tensor  # |d phi / d log pi| / |A|: s, the IS weight, or 1 (detached)
    kl: torch.Tensor | None  # per-token KL estimate, 0 where masked (None without ref_logp)
    lengths: torch.Tensor | None  # |o_i|, (B, 1), where a sequence ratio or the OPSM filter needs it


def token_advantages(
    cfg: SurrogateConfig,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    classes: PrefixClasses | None = None,
) -> torch.Tensor:
    """Advantages as a float ``(B, T)`` tensor, 0 at masked positions (so garbage there never
    propagates); prefix-consistent (class means) when the config asks for it and ``classes``
    (whole groups) are given.  Needs whole groups: call it on the full batch before any chunking.
    ``valid`` is a bool or 0/1 mask."""
    B, T = valid.shape
    adv = advantages if advantages.dtype.is_floating_point else advantages.float()
    cdt = compute_dtype(adv.dtype)
    adv = adv.to(cdt)
    big = torch.finfo(cdt).max
    adv = adv.nan_to_num(nan=big, posinf=big, neginf=-big)  # (B,) or (B, T); masked garbage: * 0 below
    adv = (adv[:, None] if adv.dim() == 1 else adv) * float_mask(valid, cdt)
    if cfg.prefix_consistent and classes is not None:
        adv = classes.class_mean(adv).to(cdt)
    return adv


def window_alpha(cfg: SurrogateConfig, valid: torch.Tensor, window: Window) -> torch.Tensor:
    """The weight alpha of the configured weighting, broadcastable to ``(B, T)`` (table in
    :mod:`grpo_fix.loss.config`; ``window`` is the optimizer window of :class:`grpo_fix.Window`).

    It depends only on the mask and the window, never on log-probs, so callers that chunk the
    batch compute it once on the full batch and pass slices to :func:`token_terms`.
    """
    B, T = valid.shape
    f64, dev = torch.float64, valid.device
    if cfg.weighting in ("uniform", "dapo"):
        n = valid.sum(dtype=f64) if window.tokens is None else torch.as_tensor(window.tokens, dtype=f64, device=dev)
        return window.dp_size / n.clamp_min(1.0)
    if cfg.weighting in ("seq_mean", "seq_sum"):
        seqs = B * window.micro_batches * window.dp_size if window.seqs is None else window.seqs
        seqs_t = torch.as_tensor(seqs, dtype=f64, device=dev).clamp_min(1.0)
        if cfg.weighting == "seq_sum":  # LUSPO: a sequence's summed tokens, averaged over sequences
            return window.dp_size / seqs_t
        return window.dp_size / (seqs_t * valid.sum(-1, keepdim=True, dtype=f64).clamp_min(1.0))
    if cfg.weighting == "bnpo":
        return 1.0 / (valid.sum(dtype=f64).clamp_min(1.0) * window.micro_batches)
    # dr_grpo: constant 1 / (B * L_max)
    l_max = cfg.max_completion_length or T
    return torch.full((), 1.0 / max(B * l_max * window.micro_batches, 1), dtype=f64, device=dev)


def spans_calls(cfg: SurrogateConfig, window: Window) -> bool:
    """Whether the weighting of ``cfg`` normalises a call's loss over more than the call itself
    (the window's tokens or sequences of several micro-batches or ranks, :func:`window_alpha`).

    Such a loss is already scaled for gradient accumulation: summing the micro-batches' gradients
    gives the window's gradient, and a trainer that divides it by the accumulation steps again
    (DeepSpeed's ``engine.backward`` by default) shrinks it by that factor.
    """
    if cfg.weighting in ("uniform", "dapo"):
        return window.tokens is not None
    if cfg.weighting in ("seq_mean", "seq_sum"):
        return window.seqs is not None or window.micro_batches > 1
    return window.micro_batches > 1


def token_terms(
    cfg: SurrogateConfig,
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    valid: torch.Tensor,
    ref_logp: torch.Tensor | None,
    alpha: torch.Tensor,
    is_ratio: torch.Tensor | None = None,
    policy_mask: torch.Tensor | None = None,
) -> TokenTerms:
    """Eq. 1 on complete rows with precomputed ``(B, T)`` advantages (0 where masked, as
    :func:`token_advantages` returns them) and weights ``alpha``; ``valid`` is a bool or 0/1 mask.

    Everything here is local to a row (the sequence ratios and the OPSM filter reduce over a
    row only), so the loss of a batch is the sum of this function over any split of its rows.
    Masked positions are replaced by 0 before any arithmetic: NaN/inf there never propagates, and
    every term is exactly 0 there.  ``old_logp``, ``ref_logp``, ``is_ratio`` and ``policy_mask`` are
    constants of the objective and are detached.  ``is_ratio`` (the sampler's importance ratio,
    vLLM) and ``policy_mask`` (e.g. TRL's entropy mask) multiply the policy term, i.e. the effective
    advantage (the policy term is linear in A for a fixed ratio); VESPO takes ``is_ratio`` into its
    sequence weight.

    PPO's clip is written ``phi = A * (c + keep * (s - c))`` with ``c = clip(s)`` detached and
    ``keep = 0`` where ``(c - s) A < 0`` (the clipped region of Eq. 28), else 1: the value and the
    gradient of ``min(s A, clip(s) A)`` (``-alpha A s`` where unclipped, Eq. 15; 0 where clipped),
    with the clip mask computed once (one ``lerp``).
    """
    cdt = compute_dtype(logp.dtype)
    m = float_mask(valid, cdt)
    lp = masked(logp, m)
    old = lp.detach() if old_logp is None else masked(old_logp.detach(), m)
    needs_lengths = cfg.ratio == "sequence" or cfg.off_policy_mask_threshold is not None
    lengths = m.sum(-1, keepdim=True) if needs_lengths else None
    adv = adv.to(cdt)

    # advantage filters: CPPO (|A| <= gamma dropped), DeepSeek-V3.2 off-policy sequence mask
    if cfg.adv_threshold is not None:
        adv = adv * step(adv.abs() - cfg.adv_threshold)
    if cfg.off_policy_mask_threshold is not None:
        assert lengths is not None  # needs_lengths
        seq_kl = (old - lp.detach()).sum(-1, keepdim=True) / lengths.clamp_min(1)
        drop = step(-adv) * step(seq_kl - cfg.off_policy_mask_threshold)  # A < 0 and far off-policy
        adv = adv * (1.0 - drop)
    if policy_mask is not None:
        adv = adv * masked(policy_mask.detach(), m)
    if is_ratio is not None and cfg.ratio != "vespo":
        adv = adv * masked(is_ratio.detach(), m)

    # importance ratio s (Eq. 3 and Table 1's sequence-level variants); masked tokens add 0
    log_ratio_tok = lp - old
    if cfg.ratio == "sequence":
        assert lengths is not None  # needs_lengths
        log_s = log_ratio_tok.sum(-1, keepdim=True) / lengths.clamp_min(1)
    elif cfg.ratio == "sequence_unnormalized":
        log_s = log_ratio_tok.sum(-1, keepdim=True)
    else:
        log_s = log_ratio_tok
    bound = ratio_bound(logp.dtype)
    s = _exp(log_s, bound)
    s_d = s.detach()
    lo, hi = cfg.clip_bounds
    sign = adv.sign()
    pos = sign.clamp_min(0.0)
    neg = pos - sign

    # policy term phi = A * value; "zeroed" marks the clipped region of Eq. 28
    zeroed = None
    if cfg.clips:
        c = s_d.clamp(lo, hi)
        zeroed = step((s_d - c) * adv)  # (s - c) A > 0: past the clip range in A's direction
        if cfg.delta is not None:  # A < 0 past delta: the two-sided clip's constant delta
            past = neg * step(s_d - cfg.delta)
            c = c + past * (cfg.delta - c)
            zeroed = zeroed + past * (1.0 - zeroed)
        value = torch.lerp(c, s, 1.0 - zeroed)  # c + keep (s - c): s where kept, the constant clip otherwise
        grad_scale = s_d
    elif cfg.ratio in RATIO_GATED:  # gate="soft" (SAPO): sigmoid(tau (s - 1)) * 4 / tau
        tau = cfg.sapo_temperature_neg + (cfg.sapo_temperature_pos - cfg.sapo_temperature_neg) * pos
        gate = torch.sigmoid(tau * (s - 1.0))
        value = gate * 4.0 / tau
        grad_scale = (4.0 * gate * (1.0 - gate) * s).detach()
    elif cfg.ratio == "sg_logp":
        grad_scale = s_d.clamp(lo, hi)
        value = grad_scale * lp
    elif cfg.ratio == "vespo":
        grad_scale = vespo_weight(cfg, log_ratio_tok, adv, is_ratio, m)
        value = grad_scale * lp
    else:  # "logp"
        value = lp
        grad_scale = torch.ones((), dtype=cdt, device=logp.device)

    # the clip metrics (past the clip range) and the signal's trust region: the clip range widened
    # to contain ratio 1 (a CISPO cap below 1, TRL's cispo default, bounds an IS weight and must not
    # make on-policy tokens count as overshoot).  For the plain clip all of them are the zeroed
    # mask (split by the advantage's sign), left to the diagnostics to count.
    over_high = over_low = None
    if zeroed is not None and cfg.delta is None:
        overshoot = zeroed
    else:
        over_high, over_low = pos * step(s_d - hi), neg * step(lo - s_d)
        if lo <= 1.0 <= hi:
            overshoot = over_high + over_low
        else:
            overshoot = pos * step(s_d - max(hi, 1.0)) + neg * step(min(lo, 1.0) - s_d)

    alpha = alpha.to(cdt)
    weighted_adv = adv * alpha  # alpha A, the token's weight in Eq. 1 (0 where masked)
    if value.shape == weighted_adv.shape:  # one pass: sum_t value * alpha A
        loss = -torch.dot(value.reshape(-1), weighted_adv.reshape(-1))
    else:
        loss = -(value * weighted_adv).sum()
    kl = None
    if ref_logp is not None:
        d = masked(ref_logp.detach(), m) - lp  # log(ref / pi), 0 where masked
        if cfg.kl_estimator == "k1":
            kl = -d
        elif cfg.kl_estimator == "k2":
            kl = 0.5 * d * d
        else:
            kl = _exp(d, bound) - d - 1.0
        if cfg.kl_times_ratio:
            kl = kl * (s if cfg.ratio in RATIO_GATED else _exp(log_ratio_tok, bound))
        if cfg.beta != 0.0:
            loss = loss + cfg.beta * (kl.sum() * alpha if alpha.dim() == 0 else (kl * alpha).sum())
    return TokenTerms(
        loss,
        m,
        lp.detach(),
        old,
        adv,
        weighted_adv,
        s_d,
        log_s.detach(),
        pos,
        neg,
        over_high,
        over_low,
        overshoot,
        zeroed,
        grad_scale,
        kl,
        lengths,
    )


@torch.no_grad()
def vespo_weight(
    cfg: SurrogateConfig,
    log_ratio: torch.Tensor,
    adv: torch.Tensor,
    is_ratio: torch.Tensor | None,
    m: torch.Tensor,
) -> torch.Tensor:
    """VESPO's detached Gamma weight ``phi(w) = e^lambda w^k e^(-lambda w)`` (``phi(1) = 1``) of the
    sequence ratio ``w = exp(sum_t log s_t [+ sum_t log is_ratio_t])``, in log space with TRL's
    clamps (log w in [log 1e-8, 20]); ``(k, lambda)`` by the sign of the advantage (``A >= 0``)."""
    lower = math.log(1e-8)
    log_w = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).sum(-1, keepdim=True)  # 0 where masked
    if is_ratio is not None:  # per token (B, T): summed over valid tokens; per sequence (B, 1): once
        log_is = torch.log(is_ratio.to(log_ratio.dtype)).clamp(lower, LOG_RATIO_CLAMP)
        if log_is.shape[-1] != 1:
            log_is = masked(log_is, m)
        log_w = log_w + log_is.sum(-1, keepdim=True)
    log_w = log_w.clamp(lower, LOG_RATIO_CLAMP)
    negative = step(-adv)  # per token, as TRL (the same for a row with sequence advantages)
    k = cfg.vespo_k_pos + (cfg.vespo_k_neg - cfg.vespo_k_pos) * negative
    lam = (cfg.vespo_lambda_pos + (cfg.vespo_lambda_neg - cfg.vespo_lambda_pos) * negative).clamp_min(1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


def token_loss(
    cfg: SurrogateConfig,
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    valid: torch.Tensor,
    ref_logp: torch.Tensor | None,
    alpha: torch.Tensor,
    is_ratio: torch.Tensor | None = None,
    policy_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``token_terms(...).loss`` alone (the per-chunk loss of the logits-free path)."""
    return token_terms(cfg, logp, old_logp, adv, valid, ref_logp, alpha, is_ratio, policy_mask).loss


def _exp(x: torch.Tensor, bound: float) -> torch.Tensor:
    return torch.exp(x.clamp(-bound, bound))
