"""GRPO with TRL 1.16 and grpo-fix: the corrected loss + ClipAwareAdamW by a one-line swap.

The only change against a plain TRL script is the import (and the config class)::

    -from trl import GRPOConfig, GRPOTrainer
    +from grpo_fix.integration.trl import GRPOFixConfig as GRPOConfig, GRPOFixTrainer as GRPOTrainer

Runs on CPU in well under a minute with the embedded toy task of ``grpo_fix.lab.toy`` (a tiny random
Qwen2, a character-level tokenizer built in code, reward = share of the letter ``a``; no download)::

    python integration/examples/trl_uniform.py                     # uniform loss + ClipAwareAdamW
    python integration/examples/trl_uniform.py --loss-type dapo --optimizer adamw   # TRL-like baseline

With a real model (GPU), and with DeepSpeed ZeRO-2/3 (configs next to this file: they have no
"optimizer" block, which would replace ClipAwareAdamW; to offload the optimizer add
``"offload_optimizer": {"device": "cpu"}`` under ``zero_optimization`` *and*
``"zero_force_ds_cpu_optimizer": false`` at the top level, else GRPOFixConfig refuses it)::

    python integration/examples/trl_uniform.py --model Qwen/Qwen2.5-0.5B-Instruct --max-completion-length 256
    accelerate launch --num_processes 2 integration/examples/trl_uniform.py --model ... \\
        --deepspeed integration/examples/trl_deepspeed_zero2.json
    torchrun --nproc_per_node 2 integration/examples/trl_uniform.py --model ... \\
        --deepspeed integration/examples/trl_deepspeed_zero3.json

(accelerate 1.15 cannot run multi-process DeepSpeed on a host without CUDA; a single process
works anywhere.)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path or hub id (default: tiny random Qwen2 built in code)")
    p.add_argument("--loss-type", default="uniform")
    p.add_argument("--no-prefix-consistent", dest="prefix_consistent", action="store_false", default=None)
    p.add_argument("--optimizer", default="clip_aware_adamw", choices=["clip_aware_adamw", "adamw"])
    p.add_argument("--backtrack", action="store_true")
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--num-iterations", type=int, default=2)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--steps-per-generation", type=int, default=None)
    p.add_argument("--per-device-batch", type=int, default=8)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (see the trl_deepspeed_zero*.json)")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    import torch
    from datasets import Dataset

    from grpo_fix.integration.trl import GRPOFixConfig, GRPOFixTrainer
    from grpo_fix.lab.toy import build_model, build_prompts, build_tokenizer, target_share_reward

    if a.model is None:  # the embedded toy policy (grpo_fix.lab.toy): random Qwen2, char-level tokenizer
        tokenizer = build_tokenizer()
        model = build_model(tokenizer)
        if a.beta > 0:  # TRL loads the reference model from a path
            path = tempfile.mkdtemp(prefix="grpo_fix_tiny_")
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            model = path
    else:
        model, tokenizer = a.model, None
    cpu = not torch.cuda.is_available() and a.deepspeed is None
    if a.deepspeed is not None and not torch.cuda.is_available():
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a ~90 s CPU op build
    args = GRPOFixConfig(
        output_dir=a.output_dir or tempfile.mkdtemp(prefix="grpo_fix_trl_"),
        loss_type=a.loss_type,
        prefix_consistent=a.prefix_consistent,
        optimizer=a.optimizer,
        clip_aware_backtrack=a.backtrack,
        beta=a.beta,
        use_cpu=cpu,
        bf16=torch.cuda.is_available(),
        gradient_checkpointing=False,
        per_device_train_batch_size=a.per_device_batch,
        num_generations=a.num_generations,
        max_completion_length=a.max_completion_length,
        max_steps=a.max_steps,
        num_iterations=a.num_iterations,
        gradient_accumulation_steps=a.gradient_accumulation_steps,
        steps_per_generation=a.steps_per_generation,
        learning_rate=a.lr,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        deepspeed=a.deepspeed,
    )
    trainer = GRPOFixTrainer(
        model=model,
        reward_funcs=target_share_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": build_prompts(64)}),
        processing_class=tokenizer,
    )
    trainer.train()
    if trainer.accelerator.is_main_process:
        keys = (
            "loss",
            "reward",
            "clip_ratio/region_mean",
            "grpo_fix/kappa",
            "grpo_fix/w_agg_abs",
            "clip_aware/effective_lr",
        )
        for h in trainer.state.log_history:
            if "loss" in h:
                print("step", h["step"], " ".join(f"{k}={h[k]:.4g}" for k in keys if k in h))
        opt = trainer.clip_aware_optimizer()
        print("optimizer:", type(opt if opt is not None else trainer.optimizer.optimizer).__name__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
