"""Prop. 1 (paper Sec. 4, App. B.2): the shared-prefix gradient is scaled by W_agg = sum_i omega_i A_i.

G = 4 completions share their first k tokens, rewards (1, 1, 0, 0).  With 1/|o_i| weighting the
summed gradient on the shared prefix is -W_agg and its sign flips with the lengths; with uniform
or dapo weighting it is exactly 0; with the shared prefix pushed outside the clip range, only
prefix-consistent clipping (uniform) keeps it exactly 0.
"""

from __future__ import annotations

import pytest
import torch

from grpo_fix import GroupSurrogateLoss, group_advantages, prefix_consistent_advantages

K = 5  # shared prefix length


def _group(lengths, *, prefix_log_ratio=0.0, suffix_noise=0.0, seed=0):
    """Completions sharing K tokens (same ids, same log-probs there), diverging at position K."""
    G, T = len(lengths), max(lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 50, (G, T), generator=g)
    ids[:, :K] = ids[0, :K]
    ids[:, K] = torch.arange(G)  # guarantee divergence right after the prefix
    logp = -torch.rand(G, T, generator=g, dtype=torch.float64) * 2
    logp[:, :K] = logp[0, :K]
    old = logp.clone()
    old[:, K:] += suffix_noise * torch.randn(G, T - K, generator=g, dtype=torch.float64)
    old[:, :K] -= prefix_log_ratio  # s = exp(prefix_log_ratio) on the shared prefix
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return ids, logp.requires_grad_(), old, mask


def _prefix_gradient(preset, lengths, prefix_log_ratio=0.0, suffix_noise=0.0):
    ids, logp, old, mask = _group(lengths, prefix_log_ratio=prefix_log_ratio, suffix_noise=suffix_noise)
    adv = group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64), 4)
    out = GroupSurrogateLoss(preset)(logp, old, adv, mask, group_size=4, completion_ids=ids)
    (grad,) = torch.autograd.grad(out.loss, logp)
    return grad[:, :K].sum(), out


@pytest.mark.parametrize("preset", ["grpo", "grpo_r1", "grpo_v32", "gspo", "cppo"])
def test_length_normalised_weighting_biases_the_prefix(preset):
    g_short_pos, out1 = _prefix_gradient(preset, (10, 100, 20, 200))
    g_long_pos, out2 = _prefix_gradient(preset, (100, 200, 10, 20))
    # the summed prefix gradient is -W_agg (Prop. 1) ...
    torch.testing.assert_close(g_short_pos, -out1.metrics["w_agg"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_long_pos, -out2.metrics["w_agg"], rtol=1e-9, atol=1e-12)
    # ... and its sign depends only on which completions are short: short positives reinforce the prefix
    assert g_short_pos < 0 < g_long_pos
    assert float(out1.metrics["w_agg_abs"]) > 0


@pytest.mark.parametrize("preset", ["grpo", "gspo", "gcpo", "cispo", "dapo", "uniform"])
@pytest.mark.parametrize("prefix_log_ratio", [0.0, 0.4])
def test_prefix_gradient_equals_minus_w_agg_off_policy(preset, prefix_log_ratio):
    """The identity of Prop. 1 holds for every ratio kind, with ratios away from 1 and clipping active."""
    grad, out = _prefix_gradient(preset, (30, 12, 25, 40), prefix_log_ratio, suffix_noise=0.2)
    torch.testing.assert_close(grad, -out.metrics["w_agg"], rtol=1e-9, atol=1e-12)


def test_sequence_ratio_breaks_uniformity_off_policy():
    """GCPO's weight is constant per sequence (on-policy: exact cancellation), but its unnormalised
    sequence ratio differs across completions once theta != theta_old (paper note 3.1, item 2)."""
    grad_on, _ = _prefix_gradient("gcpo", (10, 100, 20, 200))
    grad_off, out = _prefix_gradient("gcpo", (10, 100, 20, 200), suffix_noise=0.01)
    assert float(grad_on) == 0.0
    assert abs(float(grad_off)) > 1e-6 and float(out.metrics["w_agg_abs"]) > 0


def test_seq_mean_matches_the_worked_example():
    """On-policy (s = 1), W_agg = sum_i A_i / (G |o_i|) per prefix token (paper note 3.1, item 5)."""
    _, out = _prefix_gradient("grpo", (10, 100, 20, 200))
    a = group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64), 4)
    expected = K * sum(float(a[i]) / (4 * n) for i, n in enumerate((10, 100, 20, 200)))
    assert float(out.metrics["w_agg"]) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("preset", ["uniform", "dapo", "dr_grpo", "bnpo", "gpg"])
@pytest.mark.parametrize("lengths", [(10, 100, 20, 200), (100, 200, 10, 20)])
def test_group_constant_weighting_cancels_exactly(preset, lengths):
    grad, out = _prefix_gradient(preset, lengths)
    assert float(grad) == 0.0
    assert float(out.metrics["w_agg"]) == 0.0


@pytest.mark.parametrize("lengths", [(10, 100, 20, 200), (100, 200, 10, 20)])
@pytest.mark.parametrize("log_ratio", [0.5, -0.5])  # above 1 + eps_high, below 1 - eps_low
def test_clipped_prefix_only_prefix_consistent_clipping_cancels(lengths, log_ratio):
    grad_uniform, out_u = _prefix_gradient("uniform", lengths, prefix_log_ratio=log_ratio)
    grad_dapo, out_d = _prefix_gradient("dapo", lengths, prefix_log_ratio=log_ratio)
    assert float(out_d.metrics["clip_region"]) > 0  # the prefix really is clipped
    assert float(grad_uniform) == 0.0 and float(out_u.metrics["w_agg"]) == 0.0
    assert abs(float(grad_dapo)) > 1e-4  # sign-dependent clipping breaks the cancellation
    torch.testing.assert_close(grad_dapo, -out_d.metrics["w_agg"], rtol=1e-9, atol=1e-12)


def test_partial_prefix_keeps_the_legitimate_signal():
    """A prefix shared only by the positive completions is still reinforced under uniform weighting."""
    ids, logp, old, mask = _group((12, 12, 12, 12))
    ids[2:, :K] = ids[2:, :K] + 100  # completions 3 and 4 take another prefix
    adv = group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64), 4)
    pc = prefix_consistent_advantages(ids, adv, 4, mask)
    torch.testing.assert_close(pc[:2, :K], adv[:2, None].expand(2, K))
    out = GroupSurrogateLoss("uniform")(logp, old, adv, mask, group_size=4, completion_ids=ids)
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert float(grad[:2, :K].sum()) < 0  # loss decreases by raising those log-probs


def test_prefix_consistent_advantages_values():
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 6, 7], [1, 8, 9, 9]])
    adv = torch.tensor([3.0, 1.0, -1.0, -3.0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    pc = prefix_consistent_advantages(ids, adv, 4, mask)
    expected = torch.tensor(
        [
            [0.0, 1.0, 2.0, 3.0],  # t=0 whole group; t=1 rows 0-2; t=2 rows 0-1; t=3 own
            [0.0, 1.0, 2.0, 1.0],
            [0.0, 1.0, -1.0, -1.0],  # masked position keeps its own advantage
            [0.0, -3.0, -3.0, -3.0],
        ]
    )
    torch.testing.assert_close(pc, expected)
    # groups are independent and rows may arrive in any order inside a group
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(prefix_consistent_advantages(ids[perm], adv[perm], 4, mask[perm]), expected[perm])
    two = prefix_consistent_advantages(torch.cat([ids, ids]), torch.cat([adv, -adv]), 4, torch.cat([mask, mask]))
    torch.testing.assert_close(two[:4], expected)
    torch.testing.assert_close(two[4:, 1:3], -expected[:, 1:3])
