"""Worker for tests/test_clip_aware_deepspeed.py: DeepSpeed (CPU, gloo) + ClipAwareAdamW vs a reference.

Run as ``python ds_clip_aware_worker.py OUT.json CONFIGS`` with the torch.distributed env set
(single process) or under ``torchrun --nproc_per_node 2``.  CONFIGS is a comma list of
``stage:dtype[:offload]``, e.g. ``0:fp32,2:bf16,2:fp32:offload``.  For each config it trains a tiny
MLP for 5 steps through ``deepspeed.initialize(optimizer=ClipAwareAdamW(...))`` with a signal
observed every step (each rank has a DIFFERENT local signal and all-reduces it), and computes the
non-distributed reference (ClipAwareAdamW on the full global batch with the summed signal; for
bf16 an emulation of DeepSpeed's fp32 masters).  Rank 0 writes one JSON record per config.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: tiny_trl

STEPS = 5
MB = 4  # micro-batch per rank
CLIP = 1.0  # DeepSpeed's gradient_clipping (global norm, applied before our step)


def skip_shm_build():
    import deepspeed  # noqa: F401
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(5, 7)
        self.l2 = torch.nn.Linear(7, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def param_groups(model):
    return [
        {"params": [model.l1.weight, model.l2.weight], "weight_decay": 0.1},
        {"params": [model.l1.bias, model.l2.bias], "weight_decay": 0.0},
    ]


def local_signal(rank: int, step: int):
    """Rank-dependent statistics: rank 0 heavily clipped/overshooting on odd steps, rank 1 not."""
    from grpo_fix.signal import TrustRegionSignal

    t = lambda x: torch.tensor(float(x), dtype=torch.float64)  # noqa: E731
    if rank == 0:
        active, total, over = 1.0 + step, 10.0, (9.0 if step % 2 == 1 else 0.0)
    else:
        active, total, over = 9.0 - step, 10.0 + step, 0.0
    return TrustRegionSignal(t(active), t(total), t(100), t(100), t(total - active), t(over), t(0.1 * rank),
                             rollout_start=(step == 3))


def batch(step: int, world: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(world * MB, 5, generator=g), torch.randn(world * MB, 3, generator=g)


def reference(init_state, world, dtype, stage, kw):
    """Non-distributed ClipAwareAdamW; for bf16, fp32 masters + bf16 model like DeepSpeed."""
    from grpo_fix import ClipAwareAdamW

    model = Net()
    model.load_state_dict(init_state)
    if dtype == "fp32":
        opt = ClipAwareAdamW(param_groups(model), **kw)
        masters = [p for g in opt.param_groups for p in g["params"]]
        low = None
    else:
        low = copy.deepcopy(model).to(torch.bfloat16)
        with torch.no_grad():  # DeepSpeed builds its fp32 masters from the bf16 model
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        opt = ClipAwareAdamW(param_groups(model), **kw)  # steps the fp32 masters (model's fp32 params)
        masters = [p for g in opt.param_groups for p in g["params"]]
        lows = [p for g in param_groups(low) for p in g["params"]]
        if stage == 0:  # FP16_UnfusedOptimizer's zero-gradient step at initialize
            for m in masters:
                m.grad = torch.zeros_like(m)
            opt.step()
            with torch.no_grad():
                for m, lp in zip(masters, lows):
                    lp.copy_(m.to(torch.bfloat16))
    stats = []
    for step in range(STEPS):
        x, y = batch(step, world)
        sig = local_signal(0, step)
        for r in range(1, world):
            sig = sig + local_signal(r, step)
        if low is None:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
        else:
            # DeepSpeed averages the per-rank gradients of each rank's mean loss
            grads = None
            for r in range(world):
                low.zero_grad()
                xs, ys = x[r * MB:(r + 1) * MB], y[r * MB:(r + 1) * MB]
                torch.nn.functional.mse_loss(low(xs.to(torch.bfloat16)), ys.to(torch.bfloat16)).backward()
                gs = [p.grad.float() for p in lows]
                grads = gs if grads is None else [a + b for a, b in zip(grads, gs)]
            for m, g in zip(masters, grads):
                m.grad = g / world
        torch.nn.utils.clip_grad_norm_(masters, CLIP)  # same rule as DeepSpeed: max_norm / (norm + 1e-6)
        opt.observe(sig)
        opt.step()
        if low is not None:
            with torch.no_grad():
                for m, lp in zip(masters, lows):
                    lp.copy_(m.to(torch.bfloat16))
        stats.append([opt.last_stats["kappa"], opt.last_stats["alpha"]])
    return [m.detach().clone() for m in masters], stats


def run_config(spec: str, rank: int, world: int):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from grpo_fix import ClipAwareAdamW
    from grpo_fix.integration.deepspeed import attach_deepspeed, clip_aware_deepspeed_config

    parts = spec.split(":")
    stage, dtype, offload = int(parts[0]), parts[1], len(parts) > 2 and parts[2] == "offload"
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, tau=0.02, grow=1.25, reset_on_rollout=True, shrink_momentum=True)
    torch.manual_seed(0)
    model = Net()
    init_state = copy.deepcopy(model.state_dict())
    opt = ClipAwareAdamW(param_groups(model), **kw)
    cfg = {
        "train_micro_batch_size_per_gpu": MB,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": dtype == "bf16"},
        "gradient_clipping": CLIP,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    cfg = clip_aware_deepspeed_config(cfg, offload=True if offload else None)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    attach_deepspeed(opt, engine)
    step_calls = [0]
    orig_step = opt.step

    def counting_step(*a, **k):
        step_calls[0] += 1
        return orig_step(*a, **k)

    opt.step = counting_step
    stats = []
    for step in range(STEPS):
        x, y = batch(step, world)
        xs, ys = x[rank * MB:(rank + 1) * MB], y[rank * MB:(rank + 1) * MB]
        if dtype == "bf16":
            xs, ys = xs.to(torch.bfloat16), ys.to(torch.bfloat16)
        loss = torch.nn.functional.mse_loss(engine(xs), ys)
        engine.backward(loss)
        opt.observe(local_signal(rank, step), all_reduce=True)  # all-reduced over the DP group
        engine.step()
        stats.append([opt.last_stats["kappa"], opt.last_stats["alpha"]])

    # final fp32 parameters, in param-group order
    if stage > 0:
        full = [safe_get_full_fp32_param(p).detach().cpu().float() for g in param_groups(model) for p in g["params"]]
    else:
        full = [p.detach().cpu().float().clone() for g in opt.param_groups for p in g["params"]]
    ref, ref_stats = reference(init_state, world, dtype, stage, kw)
    max_diff = max(float((a - b.reshape(a.shape)).abs().max()) for a, b in zip(ref, full))

    calls_per_engine_step = step_calls[0] / STEPS
    # one more step with a NaN gradient (rank 0's loss): ZeRO's overflow check skips it inside the
    # engine, without calling our step(); stage 0 calls our step(), which skips it.  Either way it
    # is counted once in skipped_steps and nothing moves.
    x, y = batch(STEPS, world)
    xs, ys = x[rank * MB:(rank + 1) * MB], y[rank * MB:(rank + 1) * MB]
    if dtype == "bf16":
        xs, ys = xs.to(torch.bfloat16), ys.to(torch.bfloat16)
    loss = torch.nn.functional.mse_loss(engine(xs), ys)
    if rank == 0:
        loss = loss * float("nan")
    engine.backward(loss)
    opt.observe(local_signal(rank, STEPS), all_reduce=True)
    calls_before = step_calls[0]
    engine.step()
    if stage > 0:
        after_nan = [safe_get_full_fp32_param(p).detach().cpu().float()
                     for g in param_groups(model) for p in g["params"]]
    else:
        after_nan = [p.detach().cpu().float().clone() for g in opt.param_groups for p in g["params"]]
    moved_after_nan = max(float((a - b).abs().max()) for a, b in zip(full, after_nan))
    nan_step = {"skipped": opt.skipped_steps, "engine_skipped": int(getattr(engine, "skipped_steps", 0)),
                "our_step_called": step_calls[0] > calls_before, "moved": moved_after_nan}
    all_nan_steps = [None] * world
    torch.distributed.all_gather_object(all_nan_steps, nan_step)
    all_stats = [None] * world
    torch.distributed.all_gather_object(all_stats, stats)
    steps_in_state = sorted({float(st["step"]) for st in opt.state.values()})
    rec = {
        "config": spec,
        "world": world,
        "max_diff": max_diff,
        "stats_per_rank": all_stats,
        "ref_stats": ref_stats,
        "steps_in_state": steps_in_state,
        "step_calls_per_engine_step": calls_per_engine_step,
        "wrapper": type(engine.optimizer).__name__,
        "ds": {k: v for k, v in opt._deepspeed.items() if k not in ("process_group", "engine", "loop")},
        "nan_step_per_rank": all_nan_steps,
    }
    engine.destroy() if hasattr(engine, "destroy") else None
    return rec


def run_all(items, fn, out: str) -> None:
    """Initialise the gloo world, run ``fn(item, rank, world)`` for every item, write the records
    (rank 0) to ``out``.  A failure exits at once: the other ranks would hang in a collective,
    and torchrun then stops them."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    skip_shm_build()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    records = []
    for item in items:
        try:
            records.append(fn(item, rank, world))
        except BaseException:
            import traceback

            traceback.print_exc()
            sys.stderr.write(f"rank {rank}: {item} failed\n")
            sys.stderr.flush()
            os._exit(1)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(records, f, indent=1)
    from tiny_trl import exit_after_barrier

    exit_after_barrier()  # not destroy_process_group + normal exit: gloo threads abort that now and then


def main():
    run_all(sys.argv[2].split(","), run_config, sys.argv[1])


if __name__ == "__main__":
    main()
