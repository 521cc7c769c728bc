"""verl adapter: the uniform surrogate as a verl policy loss, and ClipAwareAdamW fed by it.

verl (>= 0.9, the engine workers) picks the actor's policy loss by name from
``verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY`` and, on ``import verl``, imports every module
of the ``verl.plugins`` entry-point group, on the driver and on every Ray worker.  grpo-fix
declares this module there, so after ``pip install grpo-fix`` two config lines switch a verl
GRPO run over (no code change)::

    actor_rollout_ref.actor.policy_loss.loss_mode=grpo_fix      # the loss (loss_agg_mode=token-mean)
    actor_rollout_ref.actor.optim.optimizer_impl=grpo_fix.integration.verl
    actor_rollout_ref.actor.optim.optimizer=ClipAwareAdamW      # optional: the clip-aware optimizer

The loss (``loss_mode="grpo_fix"``) is :func:`grpo_fix.surrogate_loss` with the ``uniform``
preset (paper Eq. 1 with uniform per-token weights, Table 1's fix for the prefix bias of
Prop. 1): ``clip_ratio_low`` / ``clip_ratio_high`` are its ``eps_low`` / ``eps_high`` and verl's
dual clip ``clip_ratio_c`` (for A < 0) is its ``delta`` (the same function of the ratio:
``-A min(max(s, clip(s)), c)``).  The normaliser is verl's own ``global_batch_info``
(``batch_num_tokens`` valid tokens of the mini-batch over all data-parallel ranks, ``dp_size``),
so the loss of a mini-batch does not depend on how it is cut into micro-batches or ranks; with
these settings the loss and gradient equal verl's ``vanilla`` loss with ``loss_agg_mode=
"token-mean"`` (tested against verl 0.9.1 itself when it is importable).  What grpo-fix adds on
top is the :class:`~grpo_fix.TrustRegionSignal` of every call: its metrics (``grpo_fix/kappa``,
``grpo_fix/overshoot_fraction``, ``grpo_fix/max_excess``) and, for :class:`ClipAwareAdamW`
below, the window signal.  Rollout importance weights (``rollout_is_weights``, w >= 0) scale
the per-token loss as in ``vanilla``; they are folded into the advantages (the clipped loss is
linear in A for a fixed ratio, so ``w * loss(A) == loss(w * A)``), which also weights the
signal's masses by w.

Not covered: prefix-consistent advantages (verl's policy loss sees no token ids; the uniform
weighting already removes the 1/|o_i| prefix bias, the clipped-prefix part of Prop. 1 remains)
and verl's other ``loss_agg_mode`` values (they are the biased weightings; asking for one raises).
KL and entropy terms stay verl's (it adds them after the policy loss).

The optimizer: verl builds it as ``getattr(import_module(optimizer_impl), optimizer)(params,
lr=..., weight_decay=..., betas=..., **override_optimizer_config)`` and calls ``step()`` once per
mini-batch on every rank after the micro-batches' backward passes.  :class:`ClipAwareAdamW` here
is :class:`grpo_fix.ClipAwareAdamW` whose ``step()`` first takes the signal the loss accumulated
since the last step (only calls with gradients count), all-reduces it over the default process
group (kappa and the overshoot fraction are ratios, so ranks that hold the same tokens, e.g.
Ulysses sequence-parallel peers, do not bias them) and ``observe``-s it.  Rollout boundaries are
not visible to a verl policy loss, so ``reset_on_rollout=True`` is refused.  Optimizer
settings pass through ``actor_rollout_ref.actor.optim.override_optimizer_config``, e.g. the opt-in
warm start ``{alpha_init: 0.1}`` (see :class:`grpo_fix.ClipAwareAdamW` for what it costs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from grpo_fix import PRESETS, SignalAccumulator, SurrogateConfig, TrustRegionSignal, Window, surrogate_loss
from grpo_fix.loss.math import LOG_RATIO_CLAMP
from grpo_fix.optim import ClipAwareAdamW as _ClipAwareAdamW

__all__ = ["LOSS_NAME", "ClipAwareAdamW", "loss_config", "pending_signal", "policy_loss", "register"]

#: ``actor_rollout_ref.actor.policy_loss.loss_mode`` of the grpo-fix loss.
LOSS_NAME = "grpo_fix"


def _get(config: Any, name: str, default: Any = None) -> Any:
    """A field of verl's ActorConfig (a dataclass with ``.get``), a dict or any object."""
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def loss_config(actor_config: Any) -> SurrogateConfig:
    """The ``uniform`` preset with verl's clip settings: ``clip_ratio_low/high`` (falling back to
    ``clip_ratio``, default 0.2) and the dual clip ``clip_ratio_c`` (default 3.0) as ``delta``."""
    eps = _get(actor_config, "clip_ratio", 0.2)
    eps = 0.2 if eps is None else float(eps)
    low, high = _get(actor_config, "clip_ratio_low"), _get(actor_config, "clip_ratio_high")
    c = _get(actor_config, "clip_ratio_c", 3.0)
    c = 3.0 if c is None else float(c)
    if not c > 1.0:
        raise ValueError(f"clip_ratio_c (dual clip) must be > 1, got {c}")
    return PRESETS["uniform"].replace(
        eps_low=eps if low is None else float(low),
        eps_high=eps if high is None else float(high),
        delta=c,
    )


#: The signal of this process's loss calls (with gradients) since the last optimizer step.
_PENDING = SignalAccumulator()


def pending_signal() -> TrustRegionSignal | None:
    """Take (and clear) the signal accumulated by :func:`policy_loss` since the last take."""
    return _PENDING.take()


def policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl ``PolicyLossFn`` ``"grpo_fix"``: (loss, metrics) of one micro-batch.

    All tensors ``(bs, response_length)`` (verl's padded layout).  The loss is
    ``dp_size / batch_num_tokens * sum_t loss_t`` over the micro-batch's valid tokens
    (``config.global_batch_info``; without it, a single process normalises by its own tokens).
    """
    if loss_agg_mode != "token-mean":
        raise ValueError(
            f"loss_mode={LOSS_NAME!r} weights every token of the mini-batch uniformly (paper Table 1's fix); "
            f"set actor.loss_agg_mode=token-mean (got {loss_agg_mode!r}, whose 1/|o_i| or per-sequence weights "
            "bring back the prefix bias)"
        )
    info = dict(_get(config, "global_batch_info", None) or {})
    dp_size = int(info.get("dp_size") or 1)
    num_tokens = info.get("batch_num_tokens")
    if num_tokens is None and dp_size > 1:
        raise ValueError("global_batch_info['batch_num_tokens'] is required when dp_size > 1 (verl >= 0.9 sets it)")
    adv = advantages
    if rollout_is_weights is not None:
        if rollout_is_weights.shape != advantages.shape:
            raise ValueError(
                f"rollout_is_weights shape {tuple(rollout_is_weights.shape)} != advantages shape "
                f"{tuple(advantages.shape)}"
            )
        adv = advantages * rollout_is_weights
    cfg = loss_config(config)
    assert cfg.delta is not None  # loss_config sets the dual clip
    out = surrogate_loss(
        cfg,
        log_prob,
        old_log_prob,
        adv,
        response_mask,
        group_size=None,
        window=Window(tokens=num_tokens, dp_size=dp_size),
    )
    if log_prob.requires_grad and torch.is_grad_enabled():
        _PENDING.add(out.signal)
    mask = response_mask.to(torch.bool)
    with torch.no_grad():
        n = mask.sum().clamp_min(1)
        log_ratio = (log_prob.detach() - old_log_prob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        dual = (adv < 0) & (torch.exp(log_ratio) > cfg.delta)
        metrics = {
            # verl's pg_clipfrac: tokens past 1 +- eps in their advantage's direction = our clip_region
            "actor/pg_clipfrac": out.metrics["clip_region"],
            "actor/ppo_kl": (-log_ratio * mask).sum() / n,
            "actor/pg_clipfrac_lower": (dual & mask).sum() / n,
            "grpo_fix/kappa": out.signal.kappa,
            "grpo_fix/overshoot_fraction": out.signal.overshoot_fraction,
            "grpo_fix/max_excess": out.signal.max_excess,
        }
    values = torch.stack([v.to(torch.float64) for v in metrics.values()]).tolist()  # one host sync
    return out.loss, dict(zip(metrics, values))


class ClipAwareAdamW(_ClipAwareAdamW):
    """:class:`grpo_fix.ClipAwareAdamW` for verl: ``step()`` observes the signal that
    :func:`policy_loss` accumulated since the previous step (all-reduced over the default
    process group) before stepping.  A step with no loss call in between keeps the last signal."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], *args: Any, **kwargs: Any) -> None:
        if kwargs.get("reset_on_rollout"):
            raise ValueError("reset_on_rollout=True needs rollout boundaries, which a verl policy loss cannot see")
        super().__init__(params, *args, **kwargs)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        signal = pending_signal()
        if signal is not None:
            self.observe(signal.all_reduce())
        return super().step(closure)


def register() -> bool:
    """Register :func:`policy_loss` as ``loss_mode="grpo_fix"`` in verl's registry (what importing
    this module does); False when verl is not importable."""
    try:
        from verl.trainer.ppo.core_algos import register_policy_loss
    except ImportError:
        return False
    register_policy_loss(LOSS_NAME)(policy_loss)
    return True


register()
