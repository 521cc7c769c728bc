"""The unified GRPO surrogate (paper Eq. 1) and the corrected loss, in one torch implementation.

For valid completion tokens (mask = 1) the loss is ``L = -J`` with

    J = sum_{i,t} alpha_{i,t} * [ phi(s_{i,t}, A_{i,t}) - beta * KL_{i,t} ]              (Eq. 1)

    phi = min(min(s, delta) * A, clip(s, 1 - eps_low, 1 + eps_high) * A)   token / sequence ratios
    phi = sg(clip(s, 1 - eps_low, 1 + eps_high)) * A * log pi              CISPO (``sg_logp``)
    phi = A * log pi                                                       GPG (``logp``)

with the ratio, weighting and KL estimator chosen by :class:`grpo_fix.SurrogateConfig` (see
:mod:`grpo_fix.config` for the table).  Its gradient on the log-prob of token (i, t) is
``-alpha A s`` where unclipped (Eq. 15) and 0 where clipped (Eq. 28).

**The corrected loss** (``preset="uniform"``) takes ``alpha = 1 / N_window`` (every valid token of
the optimizer window weighs the same, however the window is split into micro-batches or ranks),
token-level ratios (so omega = alpha * s is identical on a shared prefix) and prefix-consistent
clipping (:mod:`grpo_fix.prefix`).  Then a prefix shared by the whole group gets exactly zero
gradient, clipped or not (Prop. 1, Case 1 made robust to clipping).

**Windows, accumulation and data parallelism.**  One optimizer step sums the gradients of
``num_micro_batches`` calls on each of ``dp_size`` ranks, and DDP/DeepSpeed/FSDP *average* over
ranks.  Pass ``num_window_tokens`` (valid tokens of the whole window, all ranks) and ``dp_size``
and the accumulated, rank-averaged gradient is exactly the gradient of the window objective
(the loss is multiplied by ``dp_size`` to undo the averaging, as verl and OpenRLHF do).  The
returned loss is already scaled for gradient accumulation (TRL's ``loss_is_scaled_for_ga``):
do not divide it again.

**The loss value is not a progress metric** (paper Prop. 4, App. A): with centred advantages it is
dominated by the weighting, the KL term and ratio noise.  Log rewards; the metrics returned here
are diagnostics of the optimisation (clip fractions, KL, the trust-region signal, W_agg).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .compiled_math import check_compile_choice, run_math, use_compiled
from .config import SurrogateConfig, resolve_config
from .prefix import PrefixClasses, prefix_classes, whole_group_prefix_aggregate
from .signal import TrustRegionSignal
from .validation import check_shapes, raise_on_bad_values, value_flags

#: |log-ratio| and |ref - logp| are clamped to this before ``exp`` (as verl and OpenRLHF do), so
#: a ratio never overflows to inf; it only matters beyond ratios of e^20 ~ 4.9e8.  For fp16
#: log-probs the bound is lowered to log(65504) - 4 ~ 7.1 so that the gradient, which is returned
#: in the input's dtype and scales with the ratio, cannot overflow either.
LOG_RATIO_CLAMP = 20.0
BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class SurrogateOutput:
    """``loss`` (scalar, GA-scaled), ``signal`` (:class:`TrustRegionSignal` of this call) and
    ``metrics`` (detached 0-dim tensors: ``clip_low``, ``clip_high``, ``clip_region``, ``kl``
    when a reference is given, ``w_agg`` / ``w_agg_abs`` when ``completion_ids`` and
    ``group_size`` are given).  No host synchronisation happens until you read them."""

    loss: torch.Tensor
    signal: TrustRegionSignal
    metrics: dict[str, torch.Tensor]


class GroupSurrogateLoss(nn.Module):
    """GRPO-family policy loss: one implementation of Eq. 1 configured by (weighting, ratio, regulariser).

    Args:
        preset: a name of :data:`grpo_fix.PRESETS` (default ``"uniform"``, the corrected loss) or
            a :class:`SurrogateConfig`.
        backend: ``"auto"`` (Triton kernels for CUDA tensors in :meth:`forward_logits` /
            :meth:`forward_hidden`, torch otherwise), ``"torch"`` or ``"triton"``.  :meth:`forward`
            takes log-probs and is plain torch.
        compile_math: ``"auto"`` (default: the per-token math under ``torch.compile`` for CUDA
            tensors, eager otherwise), ``True`` or ``False``; every entry point
            (:mod:`grpo_fix.compiled_math` says why and what happens if compiling fails).
        **overrides: fields of :class:`SurrogateConfig` to change (e.g. ``beta=0.04``).

    Call::

        out = loss_fn(logp, old_logp, advantages, mask, *, group_size,
                      completion_ids=None, ref_logp=None, num_window_tokens=None,
                      num_window_seqs=None, num_micro_batches=1, dp_size=1)

    - ``logp`` ``(B, T)``: log-probs of the completion tokens under the current policy (with grad).
    - ``old_logp`` ``(B, T)`` or None: under the sampling policy (None: ``logp.detach()``, ratio 1).
    - ``advantages`` ``(B,)`` or per-token ``(B, T)``; ``mask`` ``(B, T)`` bool or 0/1.
    - ``group_size``: G; groups are consecutive blocks of G rows.  ``None`` when the call holds
      partial or shuffled groups (then precompute prefix-consistent advantages at rollout time).
    - ``completion_ids`` ``(B, T)``: enables inline prefix-consistent advantages (whole groups
      needed) and the W_agg metric.
    - ``ref_logp`` ``(B, T)``: reference-policy log-probs, required when ``beta > 0``.
    - ``num_window_tokens``: valid tokens of the whole optimizer window over all micro-batches
      and ranks (``uniform``/``dapo``); default this call's own count.
    - ``num_window_seqs``: sequences of the window (``seq_mean``); default
      ``B * num_micro_batches * dp_size``.
    - ``num_micro_batches``: gradient-accumulation steps of the window (``bnpo``, ``dr_grpo``, and
      the default of ``num_window_seqs``).
    - ``dp_size``: data-parallel ranks whose gradients are averaged.
    """

    def __init__(self, preset: str | SurrogateConfig | None = "uniform", *, backend: str = "auto",
                 compile_math: bool | str = "auto", **overrides) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_compile_choice(compile_math)
        self.config = resolve_config(preset, **overrides)
        self.backend = backend
        self.compile_math = compile_math

    def extra_repr(self) -> str:
        settings = {**self.config.as_dict(), "backend": self.backend, "compile_math": self.compile_math}
        return ", ".join(f"{k}={v!r}" for k, v in settings.items())

    def forward(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor | None,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        *,
        group_size: int | None,
        **kwargs,
    ) -> SurrogateOutput:
        """Eq. 1 on log-probs; keyword arguments as :func:`surrogate_loss` (see the class docstring)."""
        kwargs.setdefault("compile_math", self.compile_math)
        return surrogate_loss(self.config, logp, old_logp, advantages, mask, group_size=group_size, **kwargs)

    def forward_logits(self, logits: torch.Tensor, completion_ids: torch.Tensor, old_logp, advantages, mask, *,
                       group_size: int | None, temperature: float = 1.0, **window) -> SurrogateOutput:
        """The loss from materialised logits ``(B, T, V)`` or ``(B, T + 1, V)`` (last position unused).

        ``backend="triton"`` (or ``"auto"`` on CUDA) runs :func:`grpo_fix.kernels.logits_surrogate_loss`:
        one pass for the log-probs, the gradient written in place into ``logits`` (do not reuse
        them after backward); ``"torch"`` computes ``log_softmax(logits / T)`` in fp32 (the oracle).
        ``window`` takes the keyword arguments of :meth:`forward` (``ref_logp``, ``num_window_tokens``, ...).
        """
        if self._use_triton(logits):
            from grpo_fix.kernels import logits_surrogate_loss

            window.setdefault("compile_math", self.compile_math)
            return logits_surrogate_loss(self, logits, completion_ids, old_logp, advantages, mask,
                                         group_size=group_size, temperature=temperature, **window)
        logp = _torch_selective_logprob(logits[:, : completion_ids.shape[1]], completion_ids, temperature)
        return self(logp, old_logp, advantages, mask, group_size=group_size,
                    completion_ids=completion_ids if group_size else None, **window)

    def forward_hidden(self, hidden: torch.Tensor, weight: torch.Tensor, completion_ids: torch.Tensor, old_logp,
                       advantages, mask, *, group_size: int | None, bias: torch.Tensor | None = None,
                       temperature: float = 1.0, chunk_tokens: int = 4096, **window) -> SurrogateOutput:
        """The loss from the last hidden states ``(B, T, H)`` and ``lm_head.weight`` ``(V, H)``.

        ``backend="triton"`` (or ``"auto"`` on CUDA) never materialises the ``[tokens, V]`` logits
        (:func:`grpo_fix.kernels.linear_surrogate_loss`: chunked, three GEMMs, fp32 dW); ``"torch"``
        materialises them (the oracle).
        """
        if self._use_triton(hidden):
            from grpo_fix.kernels import linear_surrogate_loss

            window.setdefault("compile_math", self.compile_math)
            return linear_surrogate_loss(self, hidden, weight, completion_ids, old_logp, advantages, mask,
                                         group_size=group_size, bias=bias, temperature=temperature,
                                         chunk_tokens=chunk_tokens, **window)
        logits = torch.nn.functional.linear(hidden, weight, bias)
        logp = _torch_selective_logprob(logits, completion_ids, temperature)
        return self(logp, old_logp, advantages, mask, group_size=group_size,
                    completion_ids=completion_ids if group_size else None, **window)

    def _use_triton(self, t: torch.Tensor) -> bool:
        if self.backend == "torch":
            return False
        from grpo_fix.kernels import is_available

        if self.backend == "triton":
            if not is_available(t.device):
                raise RuntimeError("backend='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
            return True
        return t.is_cuda and is_available(t.device)


def _torch_selective_logprob(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 ``log_softmax(logits / T)`` gathered at ``ids`` (materialises an fp32 copy: the oracle)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)


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
    num_window_tokens: torch.Tensor | int | float | None = None,
    num_window_seqs: torch.Tensor | int | float | None = None,
    num_micro_batches: int = 1,
    dp_size: int = 1,
    classes: PrefixClasses | None = None,
    compile_math: bool | str = "auto",
) -> SurrogateOutput:
    """Functional form of :class:`GroupSurrogateLoss` (same arguments, config first).

    ``classes``: the shared-prefix classes of ``completion_ids`` (:func:`grpo_fix.prefix_classes`
    with this ``group_size`` and mask), when the caller already has them; the kernel entry points
    compute them before launching their kernels, because finding them costs a host sync.

    Host syncs: the value checks are computed on the device first and read once the forward math
    is queued (so on CUDA the sync waits for queued work rather than idling the GPU while the
    small ops are launched); finding prefix classes (``torch.unique``) syncs where it runs.
    """
    check_shapes(logp, old_logp, advantages, mask, group_size, completion_ids, ref_logp)
    if cfg.beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={cfg.beta} needs ref_logp (reference-policy log-probs); pass it or set beta=0")
    if cfg.prefix_consistent and completion_ids is not None and group_size is None:
        raise ValueError("prefix-consistent clipping with completion_ids needs group_size (whole groups)")
    if num_micro_batches < 1 or dp_size < 1:
        raise ValueError(f"num_micro_batches and dp_size must be >= 1, got {num_micro_batches}, {dp_size}")
    if classes is not None and (group_size is None or tuple(classes.index.shape) != tuple(logp.shape)):
        raise ValueError(f"classes must come with group_size and match logp's shape {tuple(logp.shape)}")
    compiled = use_compiled(compile_math, logp)
    flags = value_flags(logp, old_logp, advantages, mask, ref_logp, num_window_tokens)

    valid = mask.to(torch.bool)
    if classes is None and completion_ids is not None and group_size:
        classes = prefix_classes(completion_ids, group_size, valid)
    adv = token_advantages(cfg, advantages, valid, classes)
    alpha = window_alpha(
        cfg,
        valid,
        num_window_tokens=num_window_tokens,
        num_window_seqs=num_window_seqs,
        num_micro_batches=num_micro_batches,
        dp_size=dp_size,
    )
    loss, signal, metrics = run_math(policy_math, cfg, compiled, logp, old_logp, adv, valid, ref_logp, alpha,
                                     classes, group_size)
    raise_on_bad_values(flags)
    return SurrogateOutput(loss=loss, signal=signal, metrics=metrics)


def policy_math(cfg: SurrogateConfig, logp, old_logp, adv, valid, ref_logp, alpha, classes, group_size):
    """The part of Eq. 1 that depends on the current log-probs: ``(loss, signal, metrics)`` from
    token advantages ``adv`` and weights ``alpha`` (what :func:`surrogate_loss` and the kernel
    entry points run, compiled or not; see :mod:`grpo_fix.compiled_math`)."""
    terms = token_terms(cfg, logp, old_logp, adv, valid, ref_logp, alpha)
    with torch.no_grad():
        signal, metrics = _diagnostics(cfg, valid, terms, alpha, classes, group_size)
    return terms.loss, signal, metrics


def token_loss(cfg: SurrogateConfig, logp, old_logp, adv, valid, ref_logp, alpha) -> torch.Tensor:
    """``token_terms(...).loss`` alone (the per-chunk loss of the logits-free kernel path)."""
    return token_terms(cfg, logp, old_logp, adv, valid, ref_logp, alpha).loss


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
    """Advantages as a float ``(B, T)`` tensor; prefix-consistent (class means) when the config asks
    for it and ``classes`` (whole groups) are given.  Needs whole groups, so call it on the full
    batch before any chunking."""
    B, T = valid.shape
    adv = advantages if advantages.dtype.is_floating_point else advantages.float()
    adv = adv.to(torch.promote_types(adv.dtype, torch.float32))
    adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv
    if cfg.prefix_consistent and classes is not None:
        adv = (classes.class_sum(adv, valid) / classes.size.clamp_min(1).double()).to(adv.dtype)
    return adv


def window_alpha(
    cfg: SurrogateConfig,
    valid: torch.Tensor,
    *,
    num_window_tokens=None,
    num_window_seqs=None,
    num_micro_batches: int = 1,
    dp_size: int = 1,
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """The weight alpha of the configured weighting, broadcastable to ``(B, T)`` (module table).

    It depends only on the mask and the window counts, never on log-probs, so callers that chunk
    the batch (the fused kernels) compute it once on the full batch and pass slices to
    :func:`token_terms`.
    """
    B, T = valid.shape
    m = valid.to(torch.float64)
    if cfg.weighting in ("uniform", "dapo"):
        n = m.sum() if num_window_tokens is None else _as_tensor(num_window_tokens, m)
        return dp_size / n.clamp_min(1.0)
    if cfg.weighting == "seq_mean":
        n = _as_tensor(B * num_micro_batches * dp_size if num_window_seqs is None else num_window_seqs, m)
        return dp_size / (n.clamp_min(1.0) * m.sum(-1, keepdim=True).clamp_min(1.0))
    if cfg.weighting == "bnpo":
        return 1.0 / (m.sum().clamp_min(1.0) * num_micro_batches)
    # dr_grpo: constant 1 / (B * L_max)
    l_max = max_completion_length or cfg.max_completion_length or T
    return _as_tensor(1.0 / max(B * l_max * num_micro_batches, 1), m)


def token_terms(
    cfg: SurrogateConfig,
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    valid: torch.Tensor,
    ref_logp: torch.Tensor | None,
    alpha: torch.Tensor,
) -> TokenTerms:
    """Eq. 1 on complete rows with precomputed ``(B, T)`` advantages and weights ``alpha``.

    Everything here is local to a row (the sequence ratios and the OPSM filter reduce over a
    row only), so the loss of a batch is the sum of this function over any split of its rows.
    Masked positions are replaced by 0 before any arithmetic: NaN/inf there never propagates.
    """
    cdt = torch.promote_types(logp.dtype, torch.float32)
    m = valid.to(cdt)
    zero = torch.zeros((), dtype=cdt, device=logp.device)
    lp = torch.where(valid, logp.to(cdt), zero)
    old = lp.detach() if old_logp is None else torch.where(valid, old_logp.to(cdt), zero)
    lengths = m.sum(-1, keepdim=True)
    adv = adv.to(cdt)

    # advantage filters: CPPO (|A| <= gamma dropped), DeepSeek-V3.2 off-policy sequence mask
    if cfg.adv_threshold is not None:
        adv = torch.where(adv.abs() > cfg.adv_threshold, adv, zero)
    if cfg.off_policy_mask_threshold is not None:
        seq_kl = ((old - lp.detach()) * m).sum(-1, keepdim=True) / lengths.clamp_min(1)
        adv = torch.where((adv >= 0) | (seq_kl <= cfg.off_policy_mask_threshold), adv, zero)

    # importance ratio s (Eq. 3 and Table 1's sequence-level variants)
    log_ratio_tok = lp - old
    if cfg.ratio == "sequence":
        log_s = (log_ratio_tok * m).sum(-1, keepdim=True) / lengths.clamp_min(1)
    elif cfg.ratio == "sequence_unnormalized":
        log_s = (log_ratio_tok * m).sum(-1, keepdim=True)
    else:
        log_s = log_ratio_tok
    bound = min(LOG_RATIO_CLAMP, math.log(torch.finfo(logp.dtype).max) - 4.0)
    s = _exp(log_s, bound)
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high

    # policy term phi; "zeroed" marks tokens in the clipped region of Eq. 28
    if cfg.clips:
        s_unclipped = s if cfg.delta is None else torch.clamp(s, max=cfg.delta)
        phi = torch.min(s_unclipped * adv, torch.clamp(s, lo, hi) * adv)
        zeroed = ((adv > 0) & (s > hi)) | ((adv < 0) & (s < lo))
        if cfg.delta is not None:
            zeroed = zeroed | ((adv < 0) & (s > cfg.delta))
        grad_scale = s.detach()
    elif cfg.ratio == "sg_logp":
        grad_scale = torch.clamp(s, lo, hi).detach()
        phi = grad_scale * adv * lp
        zeroed = torch.zeros_like(valid)
    else:  # "logp"
        phi = adv * lp
        zeroed = torch.zeros_like(valid)
        grad_scale = torch.ones((), dtype=cdt, device=logp.device)

    per_token_loss = -phi
    kl = None
    if ref_logp is not None:
        d = torch.where(valid, ref_logp.to(cdt), zero) - lp  # log(ref / pi)
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


def _exp(x: torch.Tensor, bound: float) -> torch.Tensor:
    return torch.exp(x.clamp(-bound, bound))


def _as_tensor(x, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


def _diagnostics(cfg, valid, terms: TokenTerms, alpha, classes, group_size):
    """Trust-region signal and metrics of one call (no grad, no host sync)."""
    f64 = torch.float64
    m = valid.to(terms.per_token_loss.dtype)
    adv, s, log_s, zeroed, kl = terms.adv, terms.ratio, terms.log_ratio, terms.zeroed, terms.kl
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    s_b = s.expand_as(m)
    pos, neg = (adv > 0) & valid, (adv < 0) & valid
    coeff = alpha * adv * terms.grad_scale  # signed advantage-gradient coefficient omega * A, unclipped
    mass = (coeff.abs() * m).to(f64)
    zeroed = zeroed.expand_as(m) & valid
    over_high, over_low = pos & (s_b > hi), neg & (s_b < lo)
    log_hi = math.log(hi)
    log_lo = math.log(lo) if lo > 0 else -math.inf
    log_s_b = log_s.expand_as(m)
    excess = torch.where(pos, log_s_b - log_hi, torch.where(neg, log_lo - log_s_b, torch.zeros_like(log_s_b)))
    excess = torch.where(valid, excess.clamp_min(0.0), torch.zeros_like(excess))
    signal = TrustRegionSignal(
        active_mass=(mass * (~zeroed)).sum(),
        total_mass=mass.sum(),
        num_tokens=m.to(f64).sum(),
        num_eligible=(pos | neg).to(f64).sum(),
        num_clipped=zeroed.to(f64).sum(),
        num_overshoot=(over_high | over_low).to(f64).sum(),
        max_excess=excess.amax().to(f64) if excess.numel() else torch.zeros((), dtype=f64, device=m.device),
    )
    n_valid = m.sum().clamp_min(1.0)
    metrics = {
        "clip_low": (over_low.to(m.dtype).sum() / n_valid),
        "clip_high": (over_high.to(m.dtype).sum() / n_valid),
        "clip_region": ((over_low | over_high).to(m.dtype).sum() / n_valid),
    }
    if kl is not None:
        metrics["kl"] = (kl * m).sum() / n_valid
    if classes is not None:
        coefficient = logp_gradient_coefficient(cfg, coeff, zeroed, m, terms.lengths)
        metrics["w_agg"], metrics["w_agg_abs"] = whole_group_prefix_aggregate(classes, coefficient, valid, group_size)
    return signal, metrics


def logp_gradient_coefficient(cfg, coeff, zeroed, m, lengths):
    """``-dL_adv/dlogp_{i,t}``: the signed gradient coefficient of each token's log-prob.

    Token-level and IS-weighted ratios: ``alpha A s`` where not clipped.  Sequence ratios spread
    the row's summed weight over its tokens: ``(sum_t alpha) A s / |o|`` (``sequence``) or
    ``(sum_t alpha) A s`` (``sequence_unnormalized``).
    """
    coeff = torch.where(zeroed, torch.zeros_like(coeff.expand_as(m)), coeff.expand_as(m)) * m
    if cfg.ratio in ("sequence", "sequence_unnormalized"):
        row_weight = coeff.sum(-1, keepdim=True)
        if cfg.ratio == "sequence":
            row_weight = row_weight / lengths.clamp_min(1.0)
        coeff = row_weight * m
    return coeff
