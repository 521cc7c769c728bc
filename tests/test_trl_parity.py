"""TRL 1.16 parity of the presets alone (no trainer): grpo / bnpo / dr_grpo / dapo / cispo reproduce
TRL's `_compute_loss` on float64 log-probs (the trainer-level matrix is ``test_trl_loss_parity.py``).

TRL itself is called: `GRPOTrainer._compute_loss` is run as a plain function on a stand-in
`self` that carries the attributes it reads, with `_get_per_token_logps_and_entropies` returning
our log-prob tensor, so value and gradient are compared on identical inputs.
"""

from __future__ import annotations

import types

import pytest
import torch

from grpo_fix import GroupSurrogateLoss, Window

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")


class _Accel:
    num_processes = 1

    def reduce(self, t, reduction="sum"):
        return t

    def gather(self, t):
        return t

    gather_for_metrics = gather


def _trl_loss(loss_type, logp, inputs, *, eps_low, eps_high, beta, delta, ga, spg, max_len, bias_kl):
    from collections import defaultdict

    fake = types.SimpleNamespace(
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=ga,
        max_completion_length=max_len,
        accelerator=_Accel(),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        args=types.SimpleNamespace(use_bias_correction_kl=bias_kl, delta=delta, steps_per_generation=spg),
    )
    fake._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    loss = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


def _trl_inputs(mask, adv, old, ref=None, num_items=None):
    """The buffered micro-batch dict TRL's _compute_loss reads (prompt/ids are unused: logp is given)."""
    B, T = mask.shape
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum().double() if num_items is None else num_items,
    }
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return inputs


def _inputs(B, T, seed, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp.detach() + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    adv = torch.randn((B, T) if per_token_adv else (B,), generator=g, dtype=torch.float64)
    return logp, old, ref, mask, adv


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize(
    "beta,delta,ga,spg,eps_high,per_token_adv,bias_kl",
    [
        (0.0, None, 1, 1, 0.2, False, True),
        (0.04, None, 2, 4, 0.28, False, True),
        (0.1, 3.0, 4, 2, 0.2, True, False),
    ],
)
def test_presets_match_trl_compute_loss(loss_type, beta, delta, ga, spg, eps_high, per_token_adv, bias_kl):
    B, T, max_len = 6, 9, 12
    logp, old, ref, mask, adv = _inputs(B, T, seed=10 * ga + len(loss_type), per_token_adv=per_token_adv)
    # TRL's dapo normaliser: num_items_in_batch spans the generation batch (spg micro-batches)
    num_items = torch.tensor(float(mask.sum() * spg))
    inputs = _trl_inputs(mask, adv, old, ref, num_items)
    trl_loss, trl_metrics = _trl_loss(
        loss_type,
        logp,
        inputs,
        eps_low=0.2,
        eps_high=eps_high,
        beta=beta,
        delta=delta,
        ga=ga,
        spg=spg,
        max_len=max_len,
        bias_kl=bias_kl,
    )
    (trl_grad,) = torch.autograd.grad(trl_loss, logp)

    loss_fn = GroupSurrogateLoss(
        loss_type,
        eps_low=0.2,
        eps_high=eps_high,
        beta=beta,
        delta=delta,
        kl_times_ratio=bias_kl,
        max_completion_length=max_len,
    )
    out = loss_fn(
        logp,
        old,
        adv,
        mask,
        group_size=None,
        ref_logp=ref if beta else None,
        window=Window(tokens=num_items * ga / spg, micro_batches=ga),  # TRL 1.16's window size
    )
    (grad,) = torch.autograd.grad(out.loss, logp)
    torch.testing.assert_close(out.loss, trl_loss, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-6, atol=1e-9)
    # the clip fractions are TRL's logged clip ratios
    for ours, theirs in (("clip_low", "low_mean"), ("clip_high", "high_mean"), ("clip_region", "region_mean")):
        assert float(out.metrics[ours]) == pytest.approx(trl_metrics[f"clip_ratio/{theirs}"], abs=1e-7)
    assert float(out.metrics["clip_region"]) > 0  # the inputs really clip


def test_cispo_maps_trl_raw_cap():
    """TRL caps CISPO's IS weight at the raw epsilon_high; ours at 1 + eps_high."""
    B, T = 4, 7
    logp, old, _, mask, adv = _inputs(B, T, seed=3)
    inputs = _trl_inputs(mask, adv, old)
    trl_loss, _ = _trl_loss(
        "cispo", logp, inputs, eps_low=0.2, eps_high=1.1, beta=0.0, delta=None, ga=1, spg=1, max_len=T, bias_kl=True
    )
    (trl_grad,) = torch.autograd.grad(trl_loss, logp)
    out = GroupSurrogateLoss("cispo", eps_high=0.1)(logp, old, adv, mask, group_size=None)
    (grad,) = torch.autograd.grad(out.loss, logp)
    torch.testing.assert_close(out.loss, trl_loss, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-6, atol=1e-9)
