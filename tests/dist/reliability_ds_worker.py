"""Worker for tests/test_reliability.py: DeepSpeed save_checkpoint / load_checkpoint round trip with ClipAwareAdamW.

Run as ``python reliability_ds_worker.py OUT.json CKPT_DIR STAGES [SAVED.json | --as-world=W]`` with the torch.distributed env
set (single process) or under ``torchrun``.  For each ZeRO stage (fp32, gradient clipping, the
controller shrinking alpha on overshooting windows) it trains the tiny MLP of
ds_clip_aware_worker.py for K + 3 steps, saving at step K (run A), then builds a FRESH engine
(different initial weights), ``load_checkpoint``s step K and trains the last 3 steps (run B).
Rank 0 writes one JSON record per stage: max |A - B| over the full fp32 parameters and Adam
moments, both runs' ca_alpha / ca_kappa per group, and how far B's initial weights were from A's.

With SAVED.json (the records of a saving run, possibly on another number of ranks) it instead
loads ``z{stage}_step{K}_universal`` (``ds_to_universal`` of that run's checkpoint) with
``checkpoint.load_universal`` and compares the last 3 steps with the saving run's end.  With
``--as-world=W`` (one process) the saving run replays a W-rank run, so its universal checkpoint
can be resumed on W ranks and compared.
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
    run_all,
)

K = 2
STEPS = K + 3
KW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, tau=0.02)


def make_engine(stage: int, seed: int, load_universal: bool = False, mb: int = MB):
    import deepspeed
    from grpo_fix.integration.deepspeed import (
        attach_deepspeed,
        clip_aware_deepspeed_config,
    )

    from grpo_fix import ClipAwareAdamW

    torch.manual_seed(seed)
    model = Net()
    opt = ClipAwareAdamW(param_groups(model), **KW)
    cfg = clip_aware_deepspeed_config({
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": False},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    })
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    if os.environ.get("GRPO_FIX_TEST_NO_UNIVERSAL_REPAIR"):  # the test that shows what the repair fixes
        import grpo_fix.integration.deepspeed as gds

        gds._repair_zero3_universal_loads = lambda engine, optimizer: None
    attach_deepspeed(opt, engine)
    return engine, model, opt


def train(engine, opt, steps, rank, world, as_world=None):
    """Each rank trains on its MB rows of the step's global batch, with its own local signal
    all-reduced.  ``as_world=W`` on ONE rank replays a W-rank run: the whole W * MB batch (its
    mean loss is the mean of the W equal-sized per-rank means) and the sum of the W local signals."""
    for step in steps:
        if as_world is None:
            x, y = batch(step, world)
            xs, ys = x[rank * MB:(rank + 1) * MB], y[rank * MB:(rank + 1) * MB]
            sig = local_signal(rank, step)
        else:
            assert world == 1
            xs, ys = batch(step, as_world)
            sig = local_signal(0, step)
            for r in range(1, as_world):
                sig = sig + local_signal(r, step)
        loss = torch.nn.functional.mse_loss(engine(xs), ys)
        engine.backward(loss)
        opt.observe(sig, all_reduce=True)
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


def run_stage(stage: int, ckpt: str, rank: int, world: int, as_world=None):
    """``as_world=W`` (one process): train as the replay of a W-rank run (see :func:`train`), so a
    universal checkpoint of it can be resumed on W ranks."""
    mb = MB * (as_world or 1)
    eng_a, model_a, opt_a = make_engine(stage, seed=0, mb=mb)
    train(eng_a, opt_a, range(K), rank, world, as_world)
    alpha_at_k = [float(g["ca_alpha"]) for g in opt_a.param_groups]
    eng_a.save_checkpoint(ckpt, tag=f"z{stage}_step{K}", client_state={"k": K})
    train(eng_a, opt_a, range(K, STEPS), rank, world, as_world)
    pa, ma, va, ga, sa = snapshot(eng_a, model_a, opt_a, stage)

    eng_b, model_b, opt_b = make_engine(stage, seed=1, mb=mb)  # different weights: the load must overwrite them
    p0 = full_params(model_b, stage)
    path, client = eng_b.load_checkpoint(ckpt, tag=f"z{stage}_step{K}")
    assert path is not None and client.get("k") == K, (path, client)
    alpha_loaded = [float(g["ca_alpha"]) for g in opt_b.param_groups]
    train(eng_b, opt_b, range(K, STEPS), rank, world, as_world)
    pb, mb, vb, gb, sb = snapshot(eng_b, model_b, opt_b, stage)
    # every rank compares its own partition of the moments; the record holds the max over ranks
    diffs = torch.tensor([maxdiff(pa, pb), maxdiff(ma, mb), maxdiff(va, vb)], dtype=torch.float64)
    torch.distributed.all_reduce(diffs, op=torch.distributed.ReduceOp.MAX)
    rec = {
        "stage": stage,
        "world": world,
        "as_world": as_world,
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
        "final_params": [p.flatten().tolist() for p in pa],
    }
    for e in (eng_a, eng_b):
        e.destroy() if hasattr(e, "destroy") else None
    return rec


def resume_universal(stage: int, ckpt: str, ref: dict, rank: int, world: int):
    """Load ``z{stage}_step{K}_universal`` (ds_to_universal of a checkpoint saved on another number
    of ranks) into a fresh engine, train the last 3 steps, compare with the saving run's end.
    The saving run was W ranks, or one process replaying W ranks (``as_world``); the resume runs on
    W ranks, or on one process replaying them."""
    saved = ref.get("as_world") or ref["world"]
    as_world = saved if world == 1 and saved > 1 else None
    if world not in (1, saved):
        raise ValueError("resume_universal replays the saving run on one rank (or on as many ranks)")
    eng, model, opt = make_engine(stage, seed=1, load_universal=True, mb=MB * (saved if as_world else 1))
    path, client = eng.load_checkpoint(ckpt, tag=f"z{stage}_step{K}_universal")
    assert path is not None, path
    alpha_loaded = [float(g["ca_alpha"]) for g in opt.param_groups]
    wd_loaded = [float(g["weight_decay"]) for g in opt.param_groups]
    # (DeepSpeed 0.19.8's ZeRO-3 universal loader breaks the step counts and per-group
    # hyperparameters; attach_deepspeed repairs both, so nothing is re-applied here)
    train(eng, opt, range(K, STEPS), rank, world, as_world=as_world)
    pb = full_params(model, stage)
    pa = [torch.tensor(x) for x in ref["final_params"]]
    rec = {
        "stage": stage,
        "world": world,
        "saved_world": ref["world"],
        "saved_as_world": ref.get("as_world"),
        "param_diff": maxdiff(pa, pb),
        "alpha_at_k": ref["alpha_at_k"],
        "alpha_loaded": alpha_loaded,
        "weight_decay_loaded": wd_loaded,
        "groups_a": ref["groups_a"],
        "groups_b": [[float(g["ca_alpha"]), float(g["ca_kappa"])] for g in opt.param_groups],
    }
    eng.destroy() if hasattr(eng, "destroy") else None
    return rec


def main():
    out, ckpt, stages = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")]
    refs, as_world = None, None
    if len(sys.argv) > 4 and sys.argv[4].startswith("--as-world="):  # one process replaying W ranks
        as_world = int(sys.argv[4].split("=", 1)[1])
    elif len(sys.argv) > 4:  # resume from universal checkpoints; argv[4] = the saving run's JSON
        with open(sys.argv[4]) as f:
            refs = {r["stage"]: r for r in json.load(f)}
    if refs is None:
        run_all(stages, lambda stage, rank, world: run_stage(stage, ckpt, rank, world, as_world), out)
    else:
        run_all(stages, lambda stage, rank, world: resume_universal(stage, ckpt, refs[stage], rank, world), out)


if __name__ == "__main__":
    main()
