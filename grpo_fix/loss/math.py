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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    return torch.promote_types(dtype, torch.float32)


@dataclass(frozen=True)
class TokenTerms:
    """Row-local pieces of Eq. 1 for one set of complete rows (see :func:`token_terms`)."""

    loss: torch.Tensor  # sum_{i,t} alpha * per_token_loss * m  (scalar, with grad)
    per_token_loss: torch.Tensor  # -phi + beta * KL, (B, T), with grad
    adv: torch.Tensor  # effective advantages after the CPPO / OPSM filters, (B, T)
    ratio: torch.Tensor  # s, detached, (B, T) or (B, 1)
    log_ratio: torch.Tensor  # log s, detached, same shape
    zeroed: torch.Tensor  # bool: advantage gradient zeroed by clipping, broadcastable to (B, T)
    grad_scale: torch.Tensor  # |d phi / d log pi| / |A|: s, the IS weight, or 1 (detached)
    kl: torch.Tensor | None  # per-token KL estimate (None without ref_logp)
    lengths: torch.Tensor  # |o_i|, (B, 1)


def token_advantages(
    cfg: SurrogateConfig,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    classes: PrefixClasses | None = None,
) -> torch.Tensor:
    """Advantages as a float ``(B, T)`` tensor, 0 at masked positions (so garbage there never
    propagates); prefix-consistent (class means) when the config asks for it and ``classes``
    (whole groups) are given.  Needs whole groups: call it on the full batch before any chunking."""
    B, T = valid.shape
    adv = advantages if advantages.dtype.is_floating_point else advantages.float()
    adv = adv.to(compute_dtype(adv.dtype))
    adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv
    adv = torch.where(valid, adv, torch.zeros((), dtype=adv.dtype, device=adv.device))
    if cfg.prefix_consistent and classes is not None:
        adv = (classes.class_sum(adv, valid) / classes.size.clamp_min(1).double()).to(adv.dtype)
    return adv


def window_alpha(cfg: SurrogateConfig, valid: torch.Tensor, window: Window) -> torch.Tensor:
    """The weight alpha of the configured weighting, broadcastable to ``(B, T)`` (table in
    :mod:`grpo_fix.loss.config`; ``window`` is the optimizer window of :class:`grpo_fix.Window`).

    It depends only on the mask and the window, never on log-probs, so callers that chunk the
    batch compute it once on the full batch and pass slices to :func:`token_terms`.
    """
    B, T = valid.shape
    m = valid.to(torch.float64)
    if cfg.weighting in ("uniform", "dapo"):
        n = m.sum() if window.tokens is None else _as_tensor(window.tokens, m)
        return window.dp_size / n.clamp_min(1.0)
    if cfg.weighting in ("seq_mean", "seq_sum"):
        seqs = _as_tensor(B * window.micro_batches * window.dp_size if window.seqs is None else window.seqs, m)
        if cfg.weighting == "seq_sum":  # LUSPO: a sequence's summed tokens, averaged over sequences
            return window.dp_size / seqs.clamp_min(1.0)
        return window.dp_size / (seqs.clamp_min(1.0) * m.sum(-1, keepdim=True).clamp_min(1.0))
    if cfg.weighting == "bnpo":
        return 1.0 / (m.sum().clamp_min(1.0) * window.micro_batches)
    # dr_grpo: constant 1 / (B * L_max)
    l_max = cfg.max_completion_length or T
    return _as_tensor(1.0 / max(B * l_max * window.micro_batches, 1), m)


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
    """Eq. 1 on complete rows with precomputed ``(B, T)`` advantages and weights ``alpha``.

    Everything here is local to a row (the sequence ratios and the OPSM filter reduce over a
    row only), so the loss of a batch is the sum of this function over any split of its rows.
    Masked positions are replaced by 0 before any arithmetic: NaN/inf there never propagates.
    ``old_logp``, ``ref_logp``, ``is_ratio`` and ``policy_mask`` are constants of the objective
    and are detached.  ``is_ratio`` (the sampler's importance ratio, vLLM) and ``policy_mask``
    (e.g. TRL's entropy mask) multiply the policy term, i.e. the effective advantage (the policy
    term is linear in A for a fixed ratio); VESPO takes ``is_ratio`` into its sequence weight.
    """
    cdt = compute_dtype(logp.dtype)
    m = valid.to(cdt)
    zero = torch.zeros((), dtype=cdt, device=logp.device)
    lp = torch.where(valid, logp.to(cdt), zero)
    old = lp.detach() if old_logp is None else torch.where(valid, old_logp.detach().to(cdt), zero)
    lengths = m.sum(-1, keepdim=True)
    adv = adv.to(cdt)

    # advantage filters: CPPO (|A| <= gamma dropped), DeepSeek-V3.2 off-policy sequence mask
    if cfg.adv_threshold is not None:
        adv = torch.where(adv.abs() > cfg.adv_threshold, adv, zero)
    if cfg.off_policy_mask_threshold is not None:
        seq_kl = ((old - lp.detach()) * m).sum(-1, keepdim=True) / lengths.clamp_min(1)
        adv = torch.where((adv >= 0) | (seq_kl <= cfg.off_policy_mask_threshold), adv, zero)
    if policy_mask is not None:
        adv = adv * torch.where(valid, policy_mask.detach().to(cdt), zero)
    if is_ratio is not None and cfg.ratio != "vespo":
        adv = adv * torch.where(valid, is_ratio.detach().to(cdt), zero)

    # importance ratio s (Eq. 3 and Table 1's sequence-level variants)
    log_ratio_tok = lp - old
    if cfg.ratio == "sequence":
        log_s = (log_ratio_tok * m).sum(-1, keepdim=True) / lengths.clamp_min(1)
    elif cfg.ratio == "sequence_unnormalized":
        log_s = (log_ratio_tok * m).sum(-1, keepdim=True)
    else:
        log_s = log_ratio_tok
    bound = ratio_bound(logp.dtype)
    s = _exp(log_s, bound)
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high

    # policy term phi; "zeroed" marks tokens in the clipped region of Eq. 28; grad_scale is
    # |d phi / d log pi| / |A|
    zeroed = torch.zeros_like(valid)
    if cfg.clips:
        s_unclipped = s if cfg.delta is None else torch.clamp(s, max=cfg.delta)
        phi = torch.min(s_unclipped * adv, torch.clamp(s, lo, hi) * adv)
        zeroed = ((adv > 0) & (s > hi)) | ((adv < 0) & (s < lo))
        if cfg.delta is not None:
            zeroed = zeroed | ((adv < 0) & (s > cfg.delta))
        grad_scale = s.detach()
    elif cfg.ratio in RATIO_GATED:  # gate="soft" (SAPO): sigmoid(tau (s - 1)) * 4 / tau * A
        tau = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg).to(cdt)
        gate = torch.sigmoid(tau * (s - 1.0))
        phi = gate * 4.0 / tau * adv
        grad_scale = (4.0 * gate * (1.0 - gate) * s).detach()
    elif cfg.ratio == "sg_logp":
        grad_scale = torch.clamp(s, lo, hi).detach()
        phi = grad_scale * adv * lp
    elif cfg.ratio == "vespo":
        grad_scale = vespo_weight(cfg, log_ratio_tok, adv, m, is_ratio, valid)
        phi = grad_scale * adv * lp
    else:  # "logp"
        phi = adv * lp
        grad_scale = torch.ones((), dtype=cdt, device=logp.device)

    per_token_loss = -phi
    kl = None
    if ref_logp is not None:
        d = torch.where(valid, ref_logp.detach().to(cdt), zero) - lp  # log(ref / pi)
        if cfg.kl_estimator == "k1":
            kl = -d
        elif cfg.kl_estimator == "k2":
            kl = 0.5 * d * d
        else:
            kl = _exp(d, bound) - d - 1.0
        if cfg.kl_times_ratio:
            kl = kl * (s if cfg.clips else _exp(log_ratio_tok, bound))
        if cfg.beta != 0.0:
            per_token_loss = per_token_loss + cfg.beta * kl

    loss = (per_token_loss * m * alpha.to(cdt)).sum()
    return TokenTerms(loss, per_token_loss, adv, s.detach(), log_s.detach(), zeroed, grad_scale, kl, lengths)


@torch.no_grad()
def vespo_weight(
    cfg: SurrogateConfig,
    log_ratio: torch.Tensor,
    adv: torch.Tensor,
    m: torch.Tensor,
    is_ratio: torch.Tensor | None,
    valid: torch.Tensor,
) -> torch.Tensor:
    """VESPO's detached Gamma weight ``phi(w) = e^lambda w^k e^(-lambda w)`` (``phi(1) = 1``) of the
    sequence ratio ``w = exp(sum_t log s_t [+ sum_t log is_ratio_t])``, in log space with TRL's
    clamps (log w in [log 1e-8, 20]); ``(k, lambda)`` by the sign of the row's advantage."""
    lower = math.log(1e-8)
    log_w = (log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) * m).sum(-1, keepdim=True)
    if is_ratio is not None:  # per token (B, T): summed over valid tokens; per sequence (B, 1): once
        log_is = torch.log(is_ratio.to(log_ratio.dtype)).clamp(lower, LOG_RATIO_CLAMP)
        if log_is.shape[-1] != 1:
            log_is = torch.where(valid, log_is, torch.zeros((), dtype=log_is.dtype, device=log_is.device))
        log_w = log_w + log_is.sum(-1, keepdim=True)
    log_w = log_w.clamp(lower, LOG_RATIO_CLAMP)
    nonneg = adv >= 0  # per token, as TRL (the same for a row with sequence advantages)
    k = torch.where(nonneg, cfg.vespo_k_pos, cfg.vespo_k_neg).to(log_w.dtype)
    lam = torch.where(nonneg, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg).to(log_w.dtype).clamp_min(1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


def token_loss(
    cfg: SurrogateConfig, logp, old_logp, adv, valid, ref_logp, alpha, is_ratio=None, policy_mask=None
) -> torch.Tensor:
    """``token_terms(...).loss`` alone (the per-chunk loss of the logits-free path)."""
    return token_terms(cfg, logp, old_logp, adv, valid, ref_logp, alpha, is_ratio, policy_mask).loss


def _exp(x: torch.Tensor, bound: float) -> torch.Tensor:
    return torch.exp(x.clamp(-bound, bound))


def _as_tensor(x, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)
