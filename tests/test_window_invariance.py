"""The corrected loss is exact under gradient accumulation and data parallelism.

One optimizer window = several micro-batches on several ranks.  With ``num_window_tokens`` (and
``dp_size`` under gradient averaging) the accumulated gradient is the same however the window is
split; TRL-style per-micro-batch normalisers (bnpo) are not.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from dist_utils import torchrun

from grpo_fix import GroupSurrogateLoss, group_advantages, prefix_consistent_advantages

B, T, G = 8, 16, 4


def make_window(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 3, (B, T), generator=g)  # tiny vocabulary: many shared prefixes
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)  # plenty of clipping
    ref = logp + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.randint(0, 2, (B,), generator=g).double()
    adv = group_advantages(rewards, G)
    return ids, logp, old, ref, mask, adv


def window_gradient(preset, splits, *, beta=0.0, prefix_inline=False, seed=0):
    """Sum of per-micro-batch gradients when the window is cut into `splits` row slices."""
    ids, logp, old, ref, mask, adv = make_window(seed)
    loss_fn = GroupSurrogateLoss(preset, beta=beta)
    if not prefix_inline and loss_fn.config.prefix_consistent:
        adv = prefix_consistent_advantages(ids, adv, G, mask)  # rollout time, whole groups
    n_tokens = int(mask.sum())
    leaf = logp.clone().requires_grad_()
    total = torch.zeros_like(logp)
    rows = torch.arange(B).chunk(splits)
    for r in rows:
        out = loss_fn(
            leaf[r],
            old[r],
            adv[r],
            mask[r],
            group_size=G if prefix_inline else None,
            completion_ids=ids[r] if prefix_inline else None,
            ref_logp=ref[r] if beta else None,
            num_window_tokens=n_tokens,
            num_window_seqs=B,
            num_micro_batches=len(rows),
        )
        (g,) = torch.autograd.grad(out.loss, leaf)
        total += g
    return total


@pytest.mark.parametrize("preset", ["uniform", "dapo", "grpo", "dr_grpo", "cispo", "gspo"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_accumulated_gradient_is_split_invariant(preset, beta):
    ref_grad = window_gradient(preset, 1, beta=beta)
    assert ref_grad.abs().sum() > 0
    for splits in (2, 4):
        torch.testing.assert_close(window_gradient(preset, splits, beta=beta), ref_grad, rtol=1e-6, atol=1e-12)


def test_inline_prefix_consistency_equals_rollout_time_precompute():
    inline = window_gradient("uniform", 1, prefix_inline=True)
    torch.testing.assert_close(window_gradient("uniform", 4, prefix_inline=False), inline, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(window_gradient("uniform", 2, prefix_inline=True), inline, rtol=1e-6, atol=1e-12)


def test_bnpo_depends_on_micro_batching():
    """TRL's bnpo normalises by each micro-batch's own tokens: the window gradient changes with GA."""
    g1, g4 = window_gradient("bnpo", 1), window_gradient("bnpo", 4)
    assert not torch.allclose(g1, g4, rtol=1e-3)


@pytest.mark.distributed
def test_two_gloo_ranks_match_single_process(tmp_path):
    """2 ranks x 2 micro-batches each, gradients averaged as DDP does: equals one big call."""
    script = Path(__file__).parent / "dist" / "window_ranks.py"
    out = tmp_path / "rank_grad.pt"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    proc = subprocess.run(
        torchrun(2) + [str(script), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dist_grad = torch.load(out)
    torch.testing.assert_close(dist_grad, window_gradient("uniform", 1), rtol=1e-6, atol=1e-12)
