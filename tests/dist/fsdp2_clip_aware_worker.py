"""Worker: ``torchrun --nproc_per_node 2 fsdp2_clip_aware_worker.py OUT_JSON`` (FSDP2 on CPU, gloo).

ClipAwareAdamW on ``fully_shard`` parameters (DTensor shards, what verl's FSDP2 engine and other
FSDP2 trainers hand the optimizer): (1) 4 steps with a signal that drives the gate and the
controller (warm start on) equal the non-distributed optimizer on the full model, with the same
kappa and alpha on both ranks; (2) a NaN planted in ONE rank's gradient shard makes EVERY rank
skip the step (the finiteness check reduces over the shards), so the shards never diverge; (3) a
huge finite element in one rank's shard (its L2 norm overflows) makes every rank step.
"""

from __future__ import annotations

import copy
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main() -> None:
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from grpo_fix import ClipAwareAdamW, TrustRegionSignal

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    ref = copy.deepcopy(model)
    fully_shard(model, mesh=mesh)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01, alpha_init=0.5)
    opt, ref_opt = ClipAwareAdamW(model.parameters(), **kw), ClipAwareAdamW(ref.parameters(), **kw)

    def t(x):
        return torch.tensor(float(x), dtype=torch.float64)

    stats = []
    for step in range(4):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(100 + step))
        sig = TrustRegionSignal(t(7), t(10), t(100), t(100), t(30), t(5 * step), t(0.1))  # kappa 0.7
        rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
        (model(x[rows]).pow(2).sum() / 8 * world).backward()  # FSDP averages gradients over ranks
        opt.observe(sig)
        opt.step()
        opt.zero_grad()
        ref(x).pow(2).sum().div(8).backward()
        ref_opt.observe(sig)
        ref_opt.step()
        ref_opt.zero_grad()
        stats.append((opt.param_groups[0]["ca_kappa"], opt.alpha))
    full = [p.detach().full_tensor() for p in model.parameters()]
    diff = max(float((a - b.detach()).abs().max()) for a, b in zip(full, ref.parameters()))
    ref_stats = [ref_opt.param_groups[0]["ca_kappa"], ref_opt.alpha]

    model(torch.randn(4, 6)).sum().backward()
    if rank == world - 1:
        next(model.parameters()).grad.to_local().view(-1)[0] = float("nan")
    before = [p.detach().to_local().clone() for p in model.parameters()]
    opt.step()
    moved = any(not torch.equal(b, p.detach().to_local()) for b, p in zip(before, model.parameters()))

    # (3) a huge but finite element in ONE rank's shard (the L2 norm overflows fp32): a finite
    # gradient, so EVERY rank steps (the exact per-element check agrees over the shards)
    opt.zero_grad()
    model(torch.randn(4, 6)).sum().backward()
    if rank == world - 1:
        next(model.parameters()).grad.to_local().view(-1)[0] = 1e19
    before = [p.detach().to_local().clone() for p in model.parameters()]
    opt.step()
    moved_after_huge = all(not torch.equal(b, p.detach().to_local()) for b, p in zip(before, model.parameters()))

    report = dict(rank=rank, world=world, is_dtensor=type(next(model.parameters())).__name__ == "DTensor",
                  max_diff=diff, stats=stats, ref_final=ref_stats, moved_after_nan=moved,
                  skipped=opt.skipped_steps, moved_after_huge=moved_after_huge)
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(reports, f)
    from tiny_trl import exit_after_barrier

    exit_after_barrier()  # not destroy_process_group + normal exit: gloo threads abort that now and then


if __name__ == "__main__":
    main()
