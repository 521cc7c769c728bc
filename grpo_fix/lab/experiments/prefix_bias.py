"""Experiment 1 (paper Prop. 1): the net gradient on a prefix shared by the whole group, per preset.

Synthetic groups with controlled lengths and rewards.  Each group has G completions that share
their first K tokens (same ids, same log-probs), rewards drawn at random (groups with zero
variance redrawn), and lengths tied to the reward: "short correct" (positives 9-24 tokens,
negatives 40-64) or "long correct" (swapped).  For every preset we report the normalised prefix
aggregate

    bias = W_agg / sum_{i, t<=K} |d loss / d logp_{i,t}| with every A_i replaced by -|A_i|    (in [-1, 1])

averaged over draws, on-policy (s = 1) and with the shared prefix pushed past the clip range
(log s = +0.3 on the prefix, the other tokens jittered).  ``W_agg`` is read from the loss's
metrics (``out.metrics["w_agg"]``, given ``completion_ids`` and ``group_size``) and checked
against autograd: the summed gradient on the prefix log-probs equals -W_agg (Prop. 1).  The
denominator is what the prefix would receive if nothing cancelled (every member pushing the same
way, from autograd; the prefix ratio is >= 1, so a negative advantage is never clipped there).

Theory: exactly 0 for every group-constant weighting on-policy (uniform, dapo, dr_grpo, bnpo,
gpg); length dependent with opposite signs in the two scenarios for 1/|o_i| weighting (grpo,
grpo_r1, grpo_v32, gspo, cppo); once the prefix is clipped only prefix-consistent clipping
(uniform) stays exactly 0.  How much advantage mass real rollouts put on whole-group prefixes
is measured by :mod:`.length_bias` on both tasks.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from grpo_fix import PRESETS, GroupSurrogateLoss, group_advantages

from .report import markdown_table, write_results

K = 8


def _synthetic_group(
    gen: torch.Generator, G: int, scenario: str, prefix_log_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One group: ``(ids, logp, old_logp, mask, rewards)`` sharing the first K tokens."""
    while True:
        rewards = torch.randint(0, 2, (G,), generator=gen).double()
        if 0 < rewards.sum() < G:
            break
    short = torch.randint(K + 1, 25, (G,), generator=gen)
    long = torch.randint(40, 65, (G,), generator=gen)
    pos = rewards > 0
    lengths = torch.where(pos == (scenario == "short correct"), short, long)
    T = 64
    ids = torch.randint(10, 1000, (G, T), generator=gen)
    ids[:, :K] = ids[0, :K]
    ids[:, K] = torch.arange(G)
    logp = -torch.rand(G, T, generator=gen, dtype=torch.float64) * 2
    logp[:, :K] = logp[0, :K]
    old = logp.clone()
    if prefix_log_ratio:
        old[:, :K] -= prefix_log_ratio
        old[:, K:] += 0.05 * torch.randn(G, T - K, generator=gen, dtype=torch.float64)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return ids, logp, old, mask, rewards


def synthetic(draws: int = 200, G: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """Mean normalised bias and the worst Prop. 1 identity error per (preset, prefix, scenario)."""
    rows = []
    for preset in PRESETS:
        loss_fn = GroupSurrogateLoss(preset)
        for clipped in (False, True):
            for scenario in ("short correct", "long correct"):
                gen = torch.Generator().manual_seed(seed)
                total, worst_identity = 0.0, 0.0
                for _ in range(draws):
                    ids, logp, old, mask, rewards = _synthetic_group(gen, G, scenario, 0.3 if clipped else 0.0)
                    leaf = logp.requires_grad_()
                    adv = group_advantages(rewards, G)
                    out = loss_fn(leaf, old, adv, mask, group_size=G, completion_ids=ids)
                    (grad,) = torch.autograd.grad(out.loss, leaf)
                    w_agg = float(out.metrics["w_agg"])
                    worst_identity = max(worst_identity, abs(float(grad[:, :K].sum()) + w_agg))
                    total += w_agg / _gross_prefix_mass(loss_fn, leaf.detach(), old, adv, mask)
                rows.append(
                    {
                        "preset": preset,
                        "prefix": "clipped" if clipped else "on-policy",
                        "scenario": scenario,
                        "bias": total / draws,
                        "identity_error": worst_identity,
                    }
                )
    return rows


def _gross_prefix_mass(
    loss_fn: GroupSurrogateLoss, logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor
) -> float:
    """What the prefix would receive if nothing cancelled: the summed magnitude of the autograd
    gradient on the prefix log-probs when every member's advantage is ``-|A_i|`` (one sign, so no
    cancellation; a negative advantage is never clipped on a prefix whose ratio is >= 1)."""
    leaf = logp.detach().clone().requires_grad_()
    out = loss_fn(leaf, old, -adv.abs(), mask, group_size=mask.shape[0])
    (grad,) = torch.autograd.grad(out.loss, leaf)
    return float(grad[:, :K].abs().sum())


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(prog="grpo-fix experiment prefix-bias", description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    synth = synthetic(args.draws, args.group_size)
    table = "## Synthetic groups (normalised W_agg on the shared prefix, mean over draws)\n\n"
    pivot: dict[str, dict[str, Any]] = {}
    for r in synth:
        pivot.setdefault(r["preset"], {"preset": r["preset"]})[f"{r['prefix']}, {r['scenario']}"] = r["bias"]
    cols = ["preset"] + [f"{p}, {s}" for p in ("on-policy", "clipped") for s in ("short correct", "long correct")]
    table += markdown_table(list(pivot.values()), cols, floatfmt="+.3g")
    worst = max(r["identity_error"] for r in synth)
    table += f"\n\nmax |summed prefix gradient + W_agg| over all draws (Prop. 1 identity): {worst:.2e}\n"

    def plot(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        names = list(pivot)
        for j, c in enumerate(cols[1:]):
            ax.bar([i + 0.2 * j for i in range(len(names))], [pivot[n][c] for n in names], width=0.2, label=c)
        ax.set_xticks([i + 0.3 for i in range(len(names))], names, rotation=30)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylabel("normalised W_agg on shared prefix")
        ax.legend(fontsize=8)

    write_results(
        args.out,
        "prefix_bias",
        title="Prefix bias (paper Prop. 1)",
        table=table,
        payload={"args": vars(args), "synthetic": synth},
        plot=plot,
    )
    print(table)
    return synth


if __name__ == "__main__":
    main()
