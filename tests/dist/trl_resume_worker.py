"""Worker: ``torchrun --nproc_per_node 2 trl_resume_worker.py RUN_DIR OUT_JSON [RESUME_FROM]``.

GRPOFixTrainer (uniform loss, ClipAwareAdamW + controller) with plain DDP on CPU (gloo), real
generation, ``num_iterations=2`` so a checkpoint can fall between two generations.  Without
RESUME_FROM it trains ``K + 3`` steps and saves at step K; with it, it resumes from that
checkpoint.  Each rank writes ``OUT_JSON.rank<r>``: its micro-step counter, its buffered
completion ids (every rank holds its own generation buffer), the optimizer's controller state
and the flattened parameters.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

K = 3  # checkpoint step: 3 optimizer steps = 6 micro-steps, mid generation buffer (spg * num_iterations = 4)


def main() -> None:
    run_dir, out_path = sys.argv[1], sys.argv[2]
    resume = sys.argv[3] if len(sys.argv) > 3 else None
    from tiny_trl import TRAINER_BASE, build_dataset, build_model, build_tokenizer, exit_after_barrier, reward_len

    from grpo_fix.integration.trl import GRPOFixConfig, GRPOFixTrainer

    tok = build_tokenizer()
    args = GRPOFixConfig(
        output_dir=run_dir,
        **{
            **TRAINER_BASE,
            "use_cpu": True,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "num_iterations": 2,
            "max_steps": K + 3,
            "save_strategy": "steps",
            "save_steps": K,
            "logging_steps": 1,
        },
    )
    trainer = GRPOFixTrainer(
        model=build_model(tok, seed=0),
        reward_funcs=reward_len,
        args=args,
        train_dataset=build_dataset(),
        processing_class=tok,
    )
    trainer.train(resume_from_checkpoint=resume)
    rank = trainer.accelerator.process_index
    opt = trainer.clip_aware_optimizer()
    report = {
        "rank": rank,
        "world": trainer.accelerator.num_processes,
        "global_step": trainer.state.global_step,
        "micro_step": trainer._step,
        "buffer_ids": [b["completion_ids"].tolist() for b in trainer._buffered_inputs],
        "ca_alpha": [g["ca_alpha"] for g in opt.param_groups],
        "ca_kappa": [g["ca_kappa"] for g in opt.param_groups],
        "adam_steps": sorted({float(st["step"]) for st in opt.state.values()}),
        "params": torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()]).tolist(),
    }
    with open(f"{out_path}.rank{rank}", "w") as f:
        json.dump(report, f)
    exit_after_barrier()


if __name__ == "__main__":
    main()
