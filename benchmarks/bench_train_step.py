"""One GRPO training step, TRL 1.16's default vs grpo-fix, side by side (generation excluded).

    python benchmarks/bench_train_step.py                 # CUDA: Qwen2-0.5B-sized random model, bf16
    python benchmarks/bench_train_step.py --smoke-cpu     # tiny shapes on CPU: checks the script runs

A step is what the trainer does per optimizer step on a buffered micro-batch: ``compute_loss``
(policy log-probs + surrogate), backward, optimizer step, zero_grad.  The completions are fixed
(random token ids with 20% of the positions masked at the end of rows), as TRL's buffer would hold
them with ``num_iterations > 1`` (old log-probs present, so ratios and clipping are live).

- **TRL default**: ``trl.GRPOTrainer``, ``loss_type="dapo"``, TRL's fused log-prob head, torch AdamW.
- **grpo-fix**: ``GRPOFixTrainer``, ``loss_type="uniform"`` + ClipAwareAdamW, logits-free Triton
  loss inside the model forward on CUDA (``loss_kernel="auto"``).

Reported: median step time and tokens/s over ``--steps`` steps after ``--warmup``, and peak memory
above what is resident after the warm-up (model, gradients, optimizer state).  The model is a
randomly initialised Qwen2 with Qwen2-0.5B's shape (hidden 896, 24 layers, 14/2 heads,
intermediate 4864, vocab 151936).  Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

QWEN2_05B = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
)
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    vocab_size=512,
)


def build_model_dir(shape: dict, directory: str) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grpo_fix.lab.toy import build_tokenizer

    tok = build_tokenizer()
    cfg = Qwen2Config(
        **shape,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)


def make_inputs(B: int, P: int, T: int, V: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    lengths = (T * (0.6 + 0.4 * torch.rand(B, generator=g))).long().clamp(1, T)  # ~20% masked
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    inputs = {
        "prompt_ids": torch.randint(2, V, (B, P), generator=g),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.randint(2, V, (B, T), generator=g),
        "completion_mask": mask,
        "advantages": torch.randn(B, generator=g),
        "old_per_token_logps": -torch.rand(B, T, generator=g) * 12 - 0.1,
        "num_items_in_batch": mask.sum(),
    }
    return {k: v.to(device) for k, v in inputs.items()}


def run_variant(name: str, model_dir: str, args, device) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from grpo_fix.integration.trl import GRPOFixConfig, GRPOFixTrainer
    from grpo_fix.lab.toy import target_share_reward

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(model_dir)
    common = dict(
        output_dir=tempfile.mkdtemp(),
        use_cpu=device.type == "cpu",
        bf16=device.type == "cuda",
        gradient_checkpointing=args.gradient_checkpointing,
        per_device_train_batch_size=args.batch,
        num_generations=args.batch,
        max_completion_length=args.completion_len,
        num_iterations=2,
        learning_rate=1e-6,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        beta=0.0,
    )
    ds = datasets.Dataset.from_dict({"prompt": ["say:ab"] * 8})
    if name == "TRL default (dapo + AdamW)":
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=target_share_reward,
            args=GRPOConfig(loss_type="dapo", **common),
            train_dataset=ds,
            processing_class=tok,
        )
    else:
        trainer = GRPOFixTrainer(
            model=model,
            reward_funcs=target_share_reward,
            args=GRPOFixConfig(loss_type="uniform", **common),
            train_dataset=ds,
            processing_class=tok,
        )
    # what Trainer's training loop (bypassed here) sets up: optimizer, scheduler, accumulation steps
    trainer.create_optimizer_and_scheduler(num_training_steps=args.warmup + args.steps)
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    model.train()
    inputs = make_inputs(args.batch, args.prompt_len, args.completion_len, model.config.vocab_size, model.device)
    tokens = int(inputs["completion_mask"].sum()) + inputs["prompt_ids"].numel()

    def step():
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - resident) / 2**30 if device.type == "cuda" else float("nan")
    med = statistics.median(times)
    trainer = model = None  # free the model before the next variant
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "variant": name,
        "median_ms": 1e3 * med,
        "tokens_per_s": tokens / med,
        "peak_extra_gib": peak,
        "tokens_per_step": tokens,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--smoke-cpu", action="store_true", help="tiny model on CPU (checks the script, no numbers)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.smoke_cpu:
        device, shape = torch.device("cpu"), TINY
        args.batch, args.prompt_len, args.completion_len, args.steps, args.warmup = 4, 4, 16, 2, 1
    elif torch.cuda.is_available():
        device, shape = torch.device("cuda"), QWEN2_05B
    else:
        print(
            "bench_train_step: no CUDA device; the training-step benchmark needs a GPU (use --smoke-cpu to check "
            "the script). Nothing written."
        )
        return 0
    with tempfile.TemporaryDirectory() as model_dir:
        build_model_dir(shape, model_dir)
        rows = [
            run_variant(name, model_dir, args, device)
            for name in ("TRL default (dapo + AdamW)", "grpo-fix (uniform + ClipAwareAdamW + kernels)")
        ]
    base = rows[0]["median_ms"]
    for r in rows:
        r["speedup_vs_trl"] = base / r["median_ms"]
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke test, not a measurement)"
    header = (
        f"GRPO training step, {where}; model {shape}; batch {args.batch} x (prompt {args.prompt_len} + "
        f"completion {args.completion_len}); median of {args.steps} steps after {args.warmup} warm-up"
    )
    lines = [
        header,
        "",
        "| variant | median ms | tokens/s | speed-up vs TRL | peak extra GiB |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['variant']} | {r['median_ms']:.1f} | {r['tokens_per_s']:.0f} | {r['speedup_vs_trl']:.2f} | "
        f"{r['peak_extra_gib']:.2f} |"
        for r in rows
    ]
    table = "\n".join(lines)
    print(table)
    if not args.smoke_cpu:
        out = Path(args.out or f"benchmarks/results/train_step_{where.replace(' ', '_')}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"device": where, "args": vars(args), "rows": rows}, indent=1))
        out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
