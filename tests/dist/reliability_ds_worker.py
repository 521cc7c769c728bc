"""Worker for tests/test_reliability.py: DeepSpeed save_checkpoint / load_checkpoint round trip with ClipAwareAdamW.

Run as ``python reliability_ds_worker.py OUT.json CKPT_DIR STAGES`` with the torch.distributed env
set (single process) or under ``torchrun``.  For each ZeRO stage (fp32, gradient clipping, the
controller shrinking alpha on overshooting windows) it trains the tiny MLP of
ds_clip_aware_worker.py for K + 3 steps, saving at step K (run A), then builds a FRESH engine
(different initial weights), ``load_checkpoint``s step K and trains the last 3 steps (run B).
Rank 0 writes one JSON record per stage: max |A - B| over the full fp32 parameters and Adam
moments, both runs' ca_alpha / ca_kappa per group, and how far B's initial weights were from A's.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ds_clip_aware_worker import (
    MB,
    Net,
    batch,
    local_signal,
    param_groups,
    skip_shm_build,
)

K = 2
STEPS = K + 3
KW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, tau=0.02)


def make_engine(stage: int, seed: int):
    import deepspeed
    from grpo_fix.integration.deepspeed import (
        attach_deepspeed,
        clip_aware_deepspeed_config,
    )

    from grpo_fix.clip_aware_adamw import ClipAwareAdamW

    torch.manual_seed(seed)
    model = Net()
    opt = ClipAwareAdamW(param_groups(model), **KW)
    cfg = clip_aware_deepspeed_config({
        "train_micro_batch_size_per_gpu": MB,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": False},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    })
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    attach_deepspeed(opt, engine)
    return engine, model, opt


def train(engine, opt, steps, rank, world):
    for step in steps:
        x, y = batch(step, world)
        xs, ys = x[rank * MB:(rank + 1) * MB], y[rank * MB:(rank + 1) * MB]
        loss = torch.nn.functional.mse_loss(engine(xs), ys)
        engine.backward(loss)
        opt.observe(local_signal(rank, step), all_reduce=True)
        engine.step()


def full_params(model, stage):
    from deepspeed.utils import safe_get_full_fp32_param

    ps = [p for g in param_groups(model) for p in g["params"]]
    if stage > 0:
        return [safe_get_full_fp32_param(p).detach().float().clone() for p in ps]
    return [p.detach().float().clone() for p in ps]


def snapshot(engine, model, opt, stage):
    """Full fp32 parameters (param-group order), the Adam moments and steps of every tensor the
    optimizer steps (the model's params at stage 0, DeepSpeed's flat fp32 partitions under ZeRO:
    read from ``opt.state`` directly, because DeepSpeed links its per-parameter optimizer-state
    views after the FIRST group's step, before later groups' lazy state exists), and the
    controller's per-group scalars."""
    params = full_params(model, stage)
    if stage == 3:  # ZeRO-3 steps its flat fp32 sub-group partitions, swapped into the groups per step
        stepped = list(engine.optimizer.fp32_partitioned_groups_flat)
    else:
        stepped = [p for g in opt.param_groups for p in g["params"]]
    m = [opt.state[p]["exp_avg"].detach().clone() for p in stepped]
    v = [opt.state[p]["exp_avg_sq"].detach().clone() for p in stepped]
    steps = [float(opt.state[p]["step"]) for p in stepped]
    groups = [[float(g["ca_alpha"]), float(g["ca_kappa"])] for g in opt.param_groups]
    return params, m, v, groups, steps


def maxdiff(xs, ys):
    return max(float((a - b.reshape(a.shape)).abs().max()) for a, b in zip(xs, ys))


def run_stage(stage: int, ckpt: str, rank: int, world: int):
    eng_a, model_a, opt_a = make_engine(stage, seed=0)
    train(eng_a, opt_a, range(K), rank, world)
    alpha_at_k = [float(g["ca_alpha"]) for g in opt_a.param_groups]
    eng_a.save_checkpoint(ckpt, tag=f"z{stage}_step{K}", client_state={"k": K})
    train(eng_a, opt_a, range(K, STEPS), rank, world)
    pa, ma, va, ga, sa = snapshot(eng_a, model_a, opt_a, stage)

    eng_b, model_b, opt_b = make_engine(stage, seed=1)  # different weights: the load must overwrite them
    p0 = full_params(model_b, stage)
    path, client = eng_b.load_checkpoint(ckpt, tag=f"z{stage}_step{K}")
    assert path is not None and client.get("k") == K, (path, client)
    alpha_loaded = [float(g["ca_alpha"]) for g in opt_b.param_groups]
    train(eng_b, opt_b, range(K, STEPS), rank, world)
    pb, mb, vb, gb, sb = snapshot(eng_b, model_b, opt_b, stage)
    # every rank compares its own partition of the moments; the record holds the max over ranks
    diffs = torch.tensor([maxdiff(pa, pb), maxdiff(ma, mb), maxdiff(va, vb)], dtype=torch.float64)
    torch.distributed.all_reduce(diffs, op=torch.distributed.ReduceOp.MAX)
    rec = {
        "stage": stage,
        "world": world,
        "param_diff": float(diffs[0]),
        "exp_avg_diff": float(diffs[1]),
        "exp_avg_sq_diff": float(diffs[2]),
        "groups_a": ga,
        "groups_b": gb,
        "alpha_at_k": alpha_at_k,
        "alpha_loaded": alpha_loaded,
        "steps_a": sa,
        "steps_b": sb,
        "init_gap": maxdiff(pa, p0),
        "wrapper": type(eng_b.optimizer).__name__,
    }
    for e in (eng_a, eng_b):
        e.destroy() if hasattr(e, "destroy") else None
    return rec


def main():
    out, ckpt, stages = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    skip_shm_build()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    records = []
    for stage in stages:
        try:
            records.append(run_stage(stage, ckpt, rank, world))
        except BaseException:
            import traceback

            traceback.print_exc()
            sys.stderr.write(f"rank {rank}: stage {stage} failed\n")
            sys.stderr.flush()
            os._exit(1)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(records, f, indent=1)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
