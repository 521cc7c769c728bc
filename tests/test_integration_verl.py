"""grpo_fix.integration.verl: the "grpo_fix" policy loss and the verl-side ClipAwareAdamW.

verl itself is not a CI dependency (verl 0.9.1 pins transformers < 5.11 and needs ray): the
parity test against verl's own ``vanilla`` loss runs where verl imports and skips elsewhere; the
other tests check the same semantics against a written-out reference of verl's token-mean
dual-clip PPO loss (``core_algos.compute_policy_loss_vanilla`` + ``agg_loss``).
"""

from __future__ import annotations

import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

from grpo_fix import ClipAwareAdamW as BaseClipAwareAdamW
from grpo_fix import TrustRegionSignal
from grpo_fix.integration import verl as gv


class ActorCfg(types.SimpleNamespace):
    """Stand-in for verl's ActorConfig: attributes plus ``.get``."""

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


def actor_cfg(low: float | None = None, high: float | None = None, c: float = 3.0, **info: Any) -> ActorCfg:
    return ActorCfg(clip_ratio=0.2, clip_ratio_low=low, clip_ratio_high=high, clip_ratio_c=c, global_batch_info=info)


def batch(
    seed: int = 0, B: int = 6, T: int = 9, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    old = lp + 0.5 * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, 1, generator=g, dtype=dtype).expand(B, T).clone()
    mask = torch.rand(B, T, generator=g) > 0.25
    w = torch.rand(B, T, generator=g, dtype=dtype) * 2
    return lp, old, adv, mask, w


def verl_vanilla_token_mean(
    old: torch.Tensor,
    lp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    c: float,
    num_tokens: int | torch.Tensor,
    dp_size: int,
    w: torch.Tensor | None = None,
) -> torch.Tensor:
    """verl 0.9.1's vanilla loss, loss_agg_mode="token-mean", written out."""
    s = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
    l1 = torch.maximum(-adv * s, -adv * torch.clamp(s, 1 - eps_low, 1 + eps_high))
    per_token = torch.where(adv < 0, torch.minimum(-adv * c, l1), l1)
    if w is not None:
        per_token = per_token * w
    return (per_token * mask).sum() / num_tokens * dp_size


@pytest.mark.parametrize("low,high,c", [(None, None, 3.0), (0.2, 0.28, 1.5)])
@pytest.mark.parametrize("distributed", [False, True])
def test_equals_written_out_verl_loss(low: float | None, high: float | None, c: float, distributed: bool) -> None:
    lp0, old, adv, mask, w = batch()
    info = dict(dp_size=2, batch_num_tokens=97, global_batch_size=12, loss_scale_factor=None) if distributed else {}
    weights = w if distributed else None
    lp = lp0.clone().requires_grad_(True)
    loss, metrics = gv.policy_loss(old, lp, adv, mask, "token-mean", actor_cfg(low, high, c, **info), weights)
    loss.backward()
    lr = lp0.clone().requires_grad_(True)
    ref = verl_vanilla_token_mean(
        old,
        lr,
        adv,
        mask,
        low or 0.2,
        high or 0.2,
        c,
        97 if distributed else mask.sum(),
        2 if distributed else 1,
        weights,
    )
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lp.grad, lr.grad, rtol=1e-12, atol=1e-14)
    assert set(metrics) >= {
        "actor/pg_clipfrac",
        "actor/ppo_kl",
        "actor/pg_clipfrac_lower",
        "grpo_fix/kappa",
        "grpo_fix/overshoot_fraction",
        "grpo_fix/max_excess",
    }
    assert all(isinstance(v, float) for v in metrics.values())
    assert 0 < metrics["actor/pg_clipfrac"] < 1 and 0 <= metrics["grpo_fix/kappa"] <= 1
    gv.pending_signal()  # leave no pending signal behind for other tests


def test_parity_with_verl_vanilla() -> None:
    """Against verl's own registry: "grpo_fix" (registered by the verl.plugins entry point) equals
    "vanilla" with token-mean, dual clip, rollout IS weights and global batch info."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    if gv.LOSS_NAME not in core_algos.POLICY_LOSS_REGISTRY:
        assert gv.register()
    lp0, old, adv, mask, w = batch(seed=3)
    for cfg, weights in (
        (actor_cfg(), None),
        (actor_cfg(0.2, 0.28, 1.5, dp_size=2, batch_num_tokens=97, global_batch_size=12, loss_scale_factor=None), w),
    ):
        out = {}
        for name in ("vanilla", gv.LOSS_NAME):
            lp = lp0.clone().requires_grad_(True)
            loss, metrics = core_algos.get_policy_loss_fn(name)(old, lp, adv, mask, "token-mean", cfg, weights)
            loss.backward()
            out[name] = (loss.detach(), lp.grad, metrics)
        (l1, g1, m1), (l2, g2, m2) = out["vanilla"], out[gv.LOSS_NAME]
        torch.testing.assert_close(l2, l1, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g2, g1, rtol=1e-12, atol=1e-14)
        for k, v in m1.items():
            assert m2[k] == pytest.approx(v, abs=1e-7), k
    gv.pending_signal()


def test_micro_batches_and_ranks_sum_to_the_mini_batch() -> None:
    """With verl's global_batch_info the mini-batch loss does not depend on the split: 3
    micro-batches sum to one call, and 2 ranks (gradients averaged, as FSDP does) equal 1."""
    lp0, old, adv, mask, _ = batch(seed=5, B=6)
    n = int(mask.sum())
    full = lp0.clone().requires_grad_(True)
    full_loss = gv.policy_loss(old, full, adv, mask, config=actor_cfg(dp_size=1, batch_num_tokens=n))[0]
    full_loss.backward()
    parts = lp0.clone().requires_grad_(True)
    total = torch.zeros((), dtype=torch.float64)
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
        loss, _ = gv.policy_loss(
            old[rows], parts[rows], adv[rows], mask[rows], config=actor_cfg(dp_size=1, batch_num_tokens=n)
        )
        loss.backward()
        total = total + loss.detach()
    ranks = lp0.clone().requires_grad_(True)
    grads: list[torch.Tensor] = []
    for rows in (slice(0, 3), slice(3, 6)):
        x = ranks.detach()[rows].clone().requires_grad_(True)
        cfg = actor_cfg(dp_size=2, batch_num_tokens=n)
        gv.policy_loss(old[rows], x, adv[rows], mask[rows], config=cfg)[0].backward()
        assert x.grad is not None
        grads.append(x.grad)
    torch.testing.assert_close(total, full_loss.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(parts.grad, full.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(torch.cat(grads) / 2, full.grad, rtol=1e-12, atol=1e-15)
    gv.pending_signal()


def test_no_deprecation_warning_from_the_adapter() -> None:
    """The adapter hands surrogate_loss a grpo_fix.Window, not the deprecated window keywords."""
    lp0, old, adv, mask, w = batch()
    for cfg in (actor_cfg(), actor_cfg(dp_size=2, batch_num_tokens=97)):
        lp = lp0.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            gv.policy_loss(old, lp, adv, mask, config=cfg, rollout_is_weights=w)[0].backward()
    gv.pending_signal()


def test_bad_configuration_messages() -> None:
    lp, old, adv, mask, w = batch()
    with pytest.raises(ValueError, match="token-mean"):
        gv.policy_loss(old, lp, adv, mask, "seq-mean-token-mean", actor_cfg())
    with pytest.raises(ValueError, match="batch_num_tokens"):
        gv.policy_loss(old, lp, adv, mask, config=actor_cfg(dp_size=2))
    with pytest.raises(ValueError, match="clip_ratio_c"):
        gv.policy_loss(old, lp, adv, mask, config=actor_cfg(c=1.0))
    with pytest.raises(ValueError, match="rollout_is_weights shape"):
        gv.policy_loss(old, lp, adv, mask, config=actor_cfg(), rollout_is_weights=w[:, :3])
    with pytest.raises(ValueError, match="reset_on_rollout"):
        gv.ClipAwareAdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, reset_on_rollout=True)


def _policy(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(5, 7, dtype=torch.float64)


def _window(model: torch.nn.Module, seed: int, via_verl: bool) -> TrustRegionSignal | None:
    """Two micro-batches of a toy policy, backward on each.  ``via_verl``: through
    ``gv.policy_loss`` (plus a no-grad call, e.g. validation, that must not count) and return
    None; else through ``surrogate_loss`` directly and return the summed signal."""
    from grpo_fix import Window, surrogate_loss

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 7, (2, 4, 3), generator=g)
    adv = torch.randn(2, 4, 1, generator=g, dtype=torch.float64).expand(2, 4, 3)
    mask = torch.ones(4, 3, dtype=torch.bool)
    cfg = actor_cfg(dp_size=1, batch_num_tokens=2 * int(mask.sum()))
    old, total = None, None
    for i in range(2):
        lp = torch.log_softmax(model(x[i]), -1).gather(-1, ids[i])  # 4 rows x 3 "tokens"
        if old is None:
            old = lp.detach() + 0.6 * torch.randn(4, 3, generator=g, dtype=torch.float64)
        if via_verl:
            gv.policy_loss(old, lp, adv[i], mask, config=cfg)[0].backward()
            with torch.no_grad():
                gv.policy_loss(old, lp.detach(), adv[i].abs(), mask, config=cfg)
        else:
            out = surrogate_loss(
                gv.loss_config(cfg),
                lp,
                old,
                adv[i],
                mask,
                group_size=None,
                window=Window(tokens=cfg.global_batch_info["batch_num_tokens"], dp_size=1),
            )
            out.loss.backward()
            total = out.signal.detach() if total is None else total + out.signal.detach()
    return total


def test_optimizer_observes_the_window_signal_before_stepping() -> None:
    """verl's ClipAwareAdamW.step() == base ClipAwareAdamW.observe(sum of the window's signals)
    + step(); calls without gradients are not part of the window; the pending sum is cleared."""
    gv.pending_signal()
    a, b = _policy(), _policy()
    opt_a = gv.ClipAwareAdamW(a.parameters(), lr=0.05, betas=(0.9, 0.95))
    opt_b = BaseClipAwareAdamW(b.parameters(), lr=0.05, betas=(0.9, 0.95))
    for window in range(3):
        _window(a, window, via_verl=True)
        opt_a.step()
        assert gv.pending_signal() is None
        signal = _window(b, window, via_verl=False)
        assert signal is not None
        opt_b.observe(signal)
        opt_b.step()
        for opt in (opt_a, opt_b):
            opt.zero_grad()
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=0, atol=0)
        assert opt_a.param_groups[0]["ca_kappa"] == opt_b.param_groups[0]["ca_kappa"]
    assert opt_a.param_groups[0]["ca_kappa"] < 1.0  # the gate was active: the test compares something


def test_register_into_verl_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing the module registers the loss when verl is importable (here: a stand-in registry)."""
    registry: dict[str, Callable[..., Any]] = {}
    core: Any = types.ModuleType("verl.trainer.ppo.core_algos")  # a stand-in: attributes set below

    def register_policy_loss(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            registry[name] = fn
            return fn

        return deco

    core.register_policy_loss = register_policy_loss
    for name in ("verl", "verl.trainer", "verl.trainer.ppo"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", core)
    assert gv.register()
    assert registry == {"grpo_fix": gv.policy_loss}
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", None)  # verl not importable
    assert gv.register() is False
