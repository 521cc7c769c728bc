"""Plain DeepSpeed GRPO loop with the corrected loss and ClipAwareAdamW (no TRL).

Runs on CPU (gloo) or GPU (NCCL), ZeRO stage 0-3 chosen on the command line::

    # one process (CPU or one GPU); several stages in a row
    python integration/examples/deepspeed_loop.py --stage 0 1 2 3
    # two ranks
    torchrun --nproc_per_node 2 integration/examples/deepspeed_loop.py --stage 2
    deepspeed --num_gpus 2 integration/examples/deepspeed_loop.py --stage 3

On CPU (gloo) a rank occasionally aborts at interpreter exit, after the results are printed
("terminate called without an active exception": a DeepSpeed/gloo thread still joinable at
shutdown); the training itself is unaffected.

The policy is a tiny random Qwen2 (built in code, no download) and the "rollouts" are synthetic:
random completions with group-centred advantages.  What matters is the wiring every real loop
needs:

1. ``ClipAwareAdamW`` passed to ``deepspeed.initialize`` with a config completed by
   ``clip_aware_deepspeed_config`` (no ``"optimizer"`` block, ``zero_allow_untested_optimizer``,
   ``zero_force_ds_cpu_optimizer: false`` under offload), then ``attach_deepspeed`` (asserts the
   engine steps *our* optimizer);
2. prefix-consistent advantages computed once per rollout batch over whole groups;
3. per optimizer window (``gradient_accumulation_steps`` micro-batches): a ``grpo_fix.Window`` with
   the exact global token count and ``dp_size`` passed to the loss, the loss's signals summed over
   the micro-batches by a ``SignalAccumulator``, all-reduced, and ``observe``-d before
   ``engine.step()``, with
   ``rollout_start`` on the first window of each rollout batch.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def _single_process_env() -> None:
    """Without a launcher, DeepSpeed still wants the torch.distributed variables."""
    if "RANK" not in os.environ:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", "29533"),
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
        )


def tiny_policy(vocab: int = 64, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(cfg)


def completion_logps(engine, prompt, completion, mask):
    ids = torch.cat([prompt, completion], 1)
    am = torch.cat([torch.ones_like(prompt), mask], 1)
    logits = engine(input_ids=ids, attention_mask=am).logits[:, prompt.size(1) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, completion[..., None]).squeeze(-1)


def run(stage: int, args) -> dict:
    import deepspeed
    import torch.distributed as dist

    from grpo_fix import (
        ClipAwareAdamW,
        GroupSurrogateLoss,
        SignalAccumulator,
        Window,
        prefix_consistent_advantages,
    )
    from grpo_fix.integration.deepspeed import attach_deepspeed, clip_aware_deepspeed_config

    model = tiny_policy()
    device = torch.device(deepspeed.get_accelerator().device_name())
    opt = ClipAwareAdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    ds_config = clip_aware_deepspeed_config(
        {
            "train_micro_batch_size_per_gpu": args.micro_batch,
            "gradient_accumulation_steps": args.ga,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": stage},
            "bf16": {"enabled": args.bf16},
        }
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    attach_deepspeed(opt, engine)  # raises if anything replaced our optimizer
    rank, world = dist.get_rank(), dist.get_world_size()
    loss_fn = GroupSurrogateLoss("uniform")  # corrected loss; prefix-consistent advantages precomputed below

    G, T, P = args.group_size, 8, 4
    rows_per_rank = args.micro_batch * args.ga
    g = torch.Generator().manual_seed(1234)  # the same global rollout batch on every rank
    kappas = []
    for rollout in range(args.rollouts):
        # --- a synthetic rollout batch (global, then this rank's slice) --------------------------
        n = rows_per_rank * world
        prompt = torch.randint(1, 64, (n, P), generator=g)
        completion = torch.randint(1, 64, (n, T), generator=g)
        completion.view(-1, G, T)[:, :, :2] = completion.view(-1, G, T)[:, :1, :2]  # shared group prefix
        lengths = torch.randint(2, T + 1, (n,), generator=g)
        mask = (torch.arange(T)[None] < lengths[:, None]).float()
        rewards = torch.randn(n, generator=g).view(-1, G)
        adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).reshape(-1)
        adv_tok = prefix_consistent_advantages(completion, adv, G, mask)  # over whole groups
        sl = slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)
        prompt, completion, mask, adv_tok = (x[sl].to(device) for x in (prompt, completion, mask, adv_tok))
        with torch.no_grad():
            old = completion_logps(engine, prompt, completion, mask)
        # each window = the whole local batch here (ga micro-batches); exact global token count
        n_window = mask.sum().double()
        if world > 1:
            dist.all_reduce(n_window)

        window = Window(tokens=n_window, dp_size=world)  # micro_batches=1: engine.backward does not rescale
        signals = SignalAccumulator()
        for it in range(args.inner_steps):
            for j in range(args.ga):
                mb = slice(j * args.micro_batch, (j + 1) * args.micro_batch)
                logp = completion_logps(engine, prompt[mb], completion[mb], mask[mb])
                out = loss_fn(logp, old[mb], adv_tok[mb], mask[mb], group_size=None, window=window)
                signals.add(out.signal)
                if j == args.ga - 1:  # observe before the backward/step of the window's last micro-batch
                    opt.observe(signals.take(all_reduce=True, rollout_start=it == 0))
                engine.backward(out.loss, scale_wrt_gas=False)  # the loss is already window-normalised
                engine.step()  # DeepSpeed steps the optimizer at the window boundary only
            kappas.append(opt.last_stats["kappa"])
            if rank == 0 and args.verbose:
                s = opt.last_stats
                print(
                    f"stage {stage} rollout {rollout} inner {it}: kappa={s['kappa']:.3f} alpha={s['alpha']:.3f} "
                    f"overshoot={s['overshoot_fraction']:.3f}"
                )
    assert engine.basic_optimizer is opt and isinstance(opt, ClipAwareAdamW)
    return {"stage": stage, "kappas": kappas, "alpha": opt.alpha}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, nargs="+", default=[2], choices=[0, 1, 2, 3])
    p.add_argument("--rollouts", type=int, default=2)
    p.add_argument("--inner-steps", type=int, default=3)
    p.add_argument("--ga", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--quiet", dest="verbose", action="store_false")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args(argv)
    if (args.micro_batch * args.ga) % args.group_size:
        p.error("micro_batch * ga must hold whole groups")
    _single_process_env()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not torch.cuda.is_available():
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a ~90 s CPU op build
    results = [run(stage, args) for stage in args.stage]
    if int(os.environ.get("RANK", 0)) == 0:
        for r in results:
            print(
                f"OK stage {r['stage']}: kappas {[round(k, 4) for k in r['kappas']]} alpha {r['alpha']:.3f}", flush=True
            )
    import torch.distributed as dist

    if dist.is_initialized():  # tear gloo/NCCL down before interpreter exit
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
