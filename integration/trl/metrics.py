"""What ``GRPOFixTrainer`` logs into TRL's ``self._metrics[mode]`` (TRL averages each list over the
logging interval).

Per micro-batch, TRL's own names and meanings (one reduce and, for the row extremes, one gather
over processes):

- ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``: share of valid
  tokens whose ratio is past ``1 - epsilon`` with ``A < 0`` / past ``1 + epsilon_high`` with
  ``A > 0`` / either (loss types with PPO's clip: ``uniform``, ``grpo``, ``bnpo``, ``dr_grpo``,
  ``dapo``, ``luspo``); ``clip_ratio/low_min`` / ``clip_ratio/high_max``: the smallest / largest
  per-completion share; ``cispo_clip_ratio`` (``cispo``: IS weight capped); ``vespo/phi_seq_mean``
  (``vespo``: mean Gamma weight); ``entropy``; ``kl`` (``beta > 0``); ``aux_loss``.
  On the logits-free path no per-token log-probs exist: the shares come from the loss's own
  metrics (tokens with a zero vLLM weight not counted), and the row extremes, ``entropy`` and
  ``vespo/phi_seq_mean`` are not logged.

Per optimizer window (its last micro-batch), grpo-fix's:

- ``grpo_fix/kappa`` (unclipped share of the advantage-gradient mass; 1: nothing clipped, the
  momentum gate does nothing), ``grpo_fix/overshoot_fraction`` (tokens already past the clip
  region in their advantage's direction), ``grpo_fix/max_excess`` (largest ``|log s|`` past it),
  from the window's :class:`grpo_fix.TrustRegionSignal`;
- ``grpo_fix/w_agg``, ``grpo_fix/w_agg_abs``: the shared-prefix gradient aggregate of Prop. 1
  (0 for the corrected loss), when micro-batches hold whole groups;
- ``clip_aware/alpha`` (the controller's step multiplier) and ``clip_aware/effective_lr``
  (``learning_rate * alpha``: the step size the parameters see), with ClipAwareAdamW; its counters
  ``clip_aware/skipped_steps`` (steps skipped for a non-finite gradient or signal) and
  ``clip_aware/stuck_windows`` (overshooting windows with alpha at its floor) once they are not 0.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Any

import torch

from grpo_fix import SignalAccumulator, SurrogateConfig, SurrogateOutput, TrustRegionSignal, Window
from grpo_fix.loss.math import vespo_weight
from grpo_fix.loss.surrogate import entropy_scale

#: Loss types for which TRL logs the ``clip_ratio/*`` metrics.
CLIP_RATIO_TYPES = ("uniform", "grpo", "bnpo", "dr_grpo", "dapo", "luspo")

Metrics = MutableMapping[str, list[float]]


class WindowAccumulator:
    """The signal and W_agg sums of the current optimizer window's micro-batches (no host sync)."""

    def __init__(self) -> None:
        self.signals = SignalAccumulator()
        self._w_agg: torch.Tensor | None = None

    def add(self, out: SurrogateOutput) -> None:
        self.signals.add(out.signal)
        if "w_agg" in out.metrics:
            w = torch.stack([out.metrics["w_agg"], out.metrics["w_agg_abs"]]).double()
            self._w_agg = w if self._w_agg is None else self._w_agg + w

    def take_w_agg(self) -> torch.Tensor | None:
        w, self._w_agg = self._w_agg, None
        return w


def log_window(
    metrics: Metrics,
    signal: TrustRegionSignal,
    w_agg: torch.Tensor | None,
    optimizer_stats: dict[str, float] | None,
    lr: float,
) -> None:
    """The window metrics (module docstring); ``w_agg`` already summed over processes;
    ``optimizer_stats``: ClipAwareAdamW's ``last_stats`` after it observed the window."""
    d = signal.as_dict()
    metrics["grpo_fix/kappa"].append(float(d["kappa"]))
    metrics["grpo_fix/overshoot_fraction"].append(float(d["overshoot_fraction"]))
    metrics["grpo_fix/max_excess"].append(float(d["max_excess"]))
    if w_agg is not None:
        metrics["grpo_fix/w_agg"].append(float(w_agg[0]))
        metrics["grpo_fix/w_agg_abs"].append(float(w_agg[1]))
    if optimizer_stats is not None:
        alpha = float(optimizer_stats["alpha"])
        metrics["clip_aware/alpha"].append(alpha)
        metrics["clip_aware/effective_lr"].append(lr * alpha)
        for name in ("skipped_steps", "stuck_windows"):  # counters: logged once they are not 0
            if optimizer_stats.get(name, 0.0) > 0:
                metrics[f"clip_aware/{name}"].append(float(optimizer_stats[name]))


@torch.no_grad()
def _clip_flags(
    cfg: SurrogateConfig, logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ``is_low_clipped`` / ``is_high_clipped``: ``(B, T)``, or ``(B, 1)`` for sequence ratios."""
    log_ratio = logp.detach() - old
    if cfg.ratio == "sequence":
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    ratio = torch.exp(log_ratio)
    eps_high = cfg.eps_high if cfg.eps_high is not None else cfg.eps_low
    return (ratio < 1 - cfg.eps_low) & (adv < 0), (ratio > 1 + eps_high) & (adv > 0)


def _masked_sum(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of TRL's ``global_masked_mean``: over valid tokens, or over rows for ``(B, 1)``."""
    x = x.to(torch.float64)
    if x.shape[1] == 1:
        return x.sum(), torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)
    return (x * mask).sum(), mask.sum()


def _row_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float64)
    return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)


@torch.no_grad()
def log_micro_batch(
    metrics: Metrics,
    accelerator: Any,
    loss_type: str,
    cfg: SurrogateConfig,
    out: SurrogateOutput,
    mask: torch.Tensor,
    *,
    log_probs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    entropies: torch.Tensor | None = None,
    is_ratio: torch.Tensor | None = None,
) -> None:
    """TRL's per-micro-batch metrics (module docstring).  ``log_probs`` (torch path): the current
    and old log-probs and the advantages ``(B, 1)`` or ``(B, T)``, for TRL's exact definitions;
    without them the loss's own shares are used."""
    m = mask.to(torch.float64)
    n_valid = m.sum()
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    extremes: torch.Tensor | None = None
    if log_probs is not None and loss_type in CLIP_RATIO_TYPES + ("cispo",):
        low, high = _clip_flags(cfg, *log_probs, m)
        if loss_type == "cispo":
            sums["cispo_clip_ratio"] = _masked_sum(high, m)
        else:
            sums["clip_ratio/low_mean"] = _masked_sum(low, m)
            sums["clip_ratio/high_mean"] = _masked_sum(high, m)
            sums["clip_ratio/region_mean"] = _masked_sum(low | high, m)
            extremes = torch.stack([_nan_min(_row_mean(low, m)), -_nan_min(-_row_mean(high, m))])
    elif loss_type in CLIP_RATIO_TYPES:
        for name, key in (("low_mean", "clip_low"), ("high_mean", "clip_high"), ("region_mean", "clip_region")):
            sums[f"clip_ratio/{name}"] = (out.metrics[key].double() * n_valid, n_valid)
    elif loss_type == "cispo":
        sums["cispo_clip_ratio"] = (out.metrics["clip_high"].double() * n_valid, n_valid)
    if log_probs is not None and loss_type == "vespo":
        logps, old, advantages = log_probs
        log_ratio = torch.where(mask.bool(), logps.detach() - old, torch.zeros((), dtype=logps.dtype))
        phi = vespo_weight(cfg, log_ratio=log_ratio, adv=advantages, is_ratio=is_ratio, m=m)
        sums["vespo/phi_seq_mean"] = _masked_sum(phi, m)
    if entropies is not None:
        sums["entropy"] = _masked_sum(entropies.detach(), m)
    if "kl" in out.metrics:
        sums["kl"] = (out.metrics["kl"].double() * n_valid, n_valid)
    if sums:
        totals = accelerator.reduce(torch.stack([torch.stack(v) for v in sums.values()]), reduction="sum")
        for name, (total, count) in zip(sums, totals.tolist()):
            metrics[name].append(total / max(count, 1.0))
    if extremes is not None:
        gathered = accelerator.gather(extremes[None]).reshape(-1, 2)
        metrics["clip_ratio/low_min"].append(float(_nan_min(gathered[:, 0])))
        metrics["clip_ratio/high_max"].append(float(-_nan_min(-gathered[:, 1])))


def _nan_min(x: torch.Tensor) -> torch.Tensor:
    """``min`` ignoring NaN (rows without valid tokens); NaN when every entry is NaN (no host sync)."""
    low = torch.where(torch.isnan(x), torch.full_like(x, math.inf), x).amin()
    return torch.where(torch.isinf(low) & (low > 0), torch.full_like(low, math.nan), low)


@torch.no_grad()
def policy_loss(
    cfg: SurrogateConfig,
    out: SurrogateOutput,
    entropies: torch.Tensor,
    mask: torch.Tensor,
    policy_mask: torch.Tensor | None,
    coef: float,
    window: Window,
) -> torch.Tensor:
    """TRL's ``policy_loss`` metric: the micro-batch's loss without the entropy bonus, on TRL's scale
    (its per-micro-batch normalisers log it before dividing by the accumulation steps)."""
    valid = mask.to(torch.bool)
    effective = valid.to(torch.float64) if policy_mask is None else valid * policy_mask.to(torch.float64)
    bonus = entropy_scale(cfg, coef, valid, policy_mask, window) * (entropies.detach().double() * effective).sum()
    scale = 1.0 if cfg.weighting in ("uniform", "dapo") else float(window.micro_batches)
    return (out.loss.detach().double() + bonus) * scale
