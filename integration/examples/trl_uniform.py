"""GRPO with TRL 1.16 and grpo-fix: the corrected loss + ClipAwareAdamW by a one-line swap.

The only change against a plain TRL script is the import (and the config class)::

    -from trl import GRPOConfig, GRPOTrainer
    +from grpo_fix.integration.trl import GRPOFixConfig as GRPOConfig, GRPOFixTrainer as GRPOTrainer

Runs on CPU in well under a minute with a tiny random Qwen2 and a tokenizer trained in code (no
download)::

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

PROMPTS = ["what is 2 + 2 ?", "hello world", "count to five:", "write a short poem"]
CORPUS = PROMPTS + ["the quick brown fox jumps over the lazy dog", "abcdefghijklmnopqrstuvwxyz 0123456789"]


def tiny_model_and_tokenizer(seed: int = 0):
    """A 2-layer random Qwen2 and a byte-level BPE tokenizer trained on a few sentences."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 8, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|pad|>", "<|eos|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>")
    tokenizer.padding_side = "left"
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def reward_o(completions, **kwargs):
    """Toy reward: the share of the letter 'o' in the completion."""
    return [c.count("o") / max(len(c), 1) for c in completions]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path or hub id (default: tiny random Qwen2 built in code)")
    p.add_argument("--loss-type", default="uniform")
    p.add_argument("--no-prefix-consistent", dest="prefix_consistent", action="store_false")
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

    if a.model is None:
        model, tokenizer = tiny_model_and_tokenizer()
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
    trainer = GRPOFixTrainer(model=model, reward_funcs=reward_o, args=args,
                             train_dataset=Dataset.from_dict({"prompt": PROMPTS * 16}), processing_class=tokenizer)
    trainer.train()
    if trainer.accelerator.is_main_process:
        keys = ("loss", "reward", "clip_ratio/region_mean", "grpo_fix/kappa", "grpo_fix/w_agg_abs",
                "clip_aware/alpha")
        for h in trainer.state.log_history:
            if "loss" in h:
                print("step", h["step"], " ".join(f"{k}={h[k]:.4g}" for k in keys if k in h))
        opt = trainer.clip_aware_optimizer()
        print("optimizer:", type(opt if opt is not None else trainer.optimizer.optimizer).__name__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
