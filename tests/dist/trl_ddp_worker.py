"""Worker: ``torchrun --nproc_per_node 2 trl_ddp_worker.py OUT_JSON [LOSS_BACKEND]`` (DDP on CPU, gloo).

One fixed generation batch of 8 completions = ONE group of 8 spread over the 2 ranks (4 rows
each, 2 micro-batches of 2 per rank, one optimizer window).  Each rank runs TRL's buffering and
our ``_compute_loss`` over its window and back-propagates; the gradients are averaged over ranks
as DDP does.  Rank 0 compares with the single-process reference: the corrected loss over all 8
rows in one call with prefix-consistent advantages computed over the whole group.  Exercises the
cross-process gather of the prefix-consistent advantages, the global window token count and the
``dp_size`` scaling.  With ``LOSS_BACKEND=triton`` (the logits-free loss, Triton interpreter)
the model is wrapped in ``DistributedDataParallel`` and the loss runs through its forward, so DDP
averages the gradients itself.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main() -> None:
    out_path = sys.argv[1]
    loss_backend = sys.argv[2] if len(sys.argv) > 2 else "torch"
    import trl
    from tiny_trl import build_dataset, build_model, build_tokenizer, exit_after_barrier, fixed_generation, reward_len

    from grpo_fix import GroupSurrogateLoss, prefix_consistent_advantages
    from grpo_fix.integration.trl import WINDOW_TOKENS_KEY, GRPOFixConfig, GRPOFixTrainer

    tok = build_tokenizer()
    G = 8
    batch = fixed_generation(tok, n_rows=8, group=G, seed=3)
    args = GRPOFixConfig(
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=2,
        num_generations=G,
        gradient_accumulation_steps=2,
        max_completion_length=8,
        max_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        gradient_checkpointing=False,
        num_iterations=2,
        loss_backend=loss_backend,
    )
    trainer = GRPOFixTrainer(
        model=build_model(tok, seed=0),
        reward_funcs=reward_len,
        args=args,
        train_dataset=build_dataset(),
        processing_class=tok,
    )
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    assert world == 2 and dist.get_world_size() == 2

    local_rows = slice(rank * 4, (rank + 1) * 4)

    def fake(self, inputs):  # TRL's generation + scoring: this rank's rows of the fixed batch
        out = {k: (v[local_rows].clone() if v.dim() else v.clone()) for k, v in batch.items()}
        # ragged local widths, as on real ranks: trim rank 1's trailing all-pad columns
        width = int(out["completion_mask"].sum(0).nonzero().max()) + 1
        for k in ("completion_ids", "completion_mask", "old_per_token_logps"):
            out[k] = out[k][:, :width]
        return out

    trl.GRPOTrainer._generate_and_score_completions = fake
    inner = trainer.model
    inner.train()
    ddp = loss_backend == "triton"
    model = torch.nn.parallel.DistributedDataParallel(inner) if ddp else inner
    trainer.current_gradient_accumulation_steps = 2
    local_loss = 0.0
    window_tokens = []
    for k in range(2):
        trainer._step = k
        inputs = trainer._prepare_inputs([{"prompt": "unused"}])
        window_tokens.append(float(inputs[WINDOW_TOKENS_KEY][0]))
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
        local_loss += loss.item()
    names = [n for n, p in inner.named_parameters() if p.grad is not None]
    grads = torch.cat([inner.get_parameter(n).grad.reshape(-1) for n in names])
    if not ddp:  # average as DDP does
        dist.all_reduce(grads)
        grads /= world
    total_loss = torch.tensor(local_loss)
    dist.all_reduce(total_loss)

    report = {}
    if rank == 0:
        model = inner
        model.zero_grad(set_to_none=True)
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        logp, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, am, batch["completion_ids"].size(1))
        adv = prefix_consistent_advantages(batch["completion_ids"], batch["advantages"], G, batch["completion_mask"])
        ref = GroupSurrogateLoss("uniform", prefix_consistent=False)(
            logp, batch["old_per_token_logps"], adv, batch["completion_mask"], group_size=None
        )
        ref.loss.backward()
        ref_grads = torch.cat([model.get_parameter(n).grad.reshape(-1) for n in names])
        report = {
            "window_tokens": window_tokens,
            "global_tokens": float(batch["completion_mask"].sum()),
            "loss": total_loss.item() / world,  # each rank's loss is scaled by dp_size
            "ref_loss": ref.loss.item(),
            "max_grad_diff": float((grads - ref_grads).abs().max()),
            "grad_scale": float(ref_grads.abs().max()),
            "kappa": float(ref.signal.kappa),
            "linear": trainer._gf_path.linear,
        }
        with open(out_path, "w") as f:
            json.dump(report, f)
    exit_after_barrier()


if __name__ == "__main__":
    main()
