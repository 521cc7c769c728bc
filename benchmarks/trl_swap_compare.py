"""What the one-line TRL swap changes: stock ``trl.GRPOTrainer`` and ``GRPOFixTrainer`` side by side.

For each TRL configuration the same script trains twice from the same seed, once with
``from trl import GRPOConfig, GRPOTrainer`` and once with
``from grpo_fix.integration.trl import GRPOFixConfig as GRPOConfig, GRPOFixTrainer as GRPOTrainer``
and the same arguments, on the toy task of ``grpo_fix.lab.toy`` (CPU, no download), and records
per step the loss, the reward, and the swap's trust-region metrics (kappa, overshoot, the
controller's alpha and the effective learning rate ``lr * alpha``); at the end the distance between
the two runs' parameters relative to how far stock TRL moved them.  Runs are interleaved (stock,
swap, stock, swap, ...) for ``--rounds`` rounds and the wall-time ratio swap / stock is the median
of the per-round ratios (a CPU ratio, not a GPU cost).

    python benchmarks/trl_swap_compare.py                  # all rows, ~3 minutes on 2 cores
    python benchmarks/trl_swap_compare.py --rows default --rounds 1 --steps 3

Writes ``benchmarks/results/trl_swap_cpu.json`` and ``.md``.  vLLM (not installable here) and
DeepSpeed rows are backed by tests instead: ``tests/test_trl_loss_parity.py`` and
``tests/test_integration_trl.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: TRL configurations compared: arguments given to both configs (the one-line swap), and whether
#: a LoRA adapter is trained.
ROWS: dict[str, dict[str, Any]] = {
    "default": {"args": {}},
    "grpo": {"args": {"loss_type": "grpo"}},
    "dr_grpo": {"args": {"loss_type": "dr_grpo"}},
    "num_iterations_2": {"args": {"num_iterations": 2}},
    "spg4_ga2": {"args": {"steps_per_generation": 4, "gradient_accumulation_steps": 2}},
    "lora": {"args": {}, "lora": True},
}

SWAP_METRICS = ("grpo_fix/kappa", "grpo_fix/overshoot_fraction", "clip_aware/alpha", "clip_aware/effective_lr")


def train(kind: str, row: dict[str, Any], steps: int, lr: float) -> dict[str, Any]:
    """One training run: per-step logs, final parameters (flattened), wall time."""
    import torch
    from datasets import Dataset

    from grpo_fix.lab.toy import build_model, build_prompts, build_tokenizer, target_share_reward

    if kind == "stock":
        from trl import GRPOConfig, GRPOTrainer
    else:
        from grpo_fix.integration.trl import GRPOFixConfig as GRPOConfig
        from grpo_fix.integration.trl import GRPOFixTrainer as GRPOTrainer
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=0)
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix=f"trl_swap_{kind}_"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=12,
        max_steps=steps,
        learning_rate=lr,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        **row["args"],
    )
    peft_config = None
    if row.get("lora"):
        import peft

        peft_config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=target_share_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": build_prompts(64)}),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    start = torch.cat([p.detach().reshape(-1).clone() for p in trainer.model.parameters()])
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    params = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    return {
        "seconds": seconds,
        "loss": [h["loss"] for h in logs],
        "reward": [h.get("reward") for h in logs],  # None where the step generated nothing
        # generation batches in which every group's rewards are equal: no advantage, no gradient
        "all_groups_flat": sum(h.get("frac_reward_zero_std", 0.0) == 1.0 for h in logs),
        "learning_rate": [h["learning_rate"] for h in logs],
        "metrics": {k: [h.get(k) for h in logs] for k in SWAP_METRICS if any(k in h for h in logs)},
        "params": params,
        "start": start,
    }


def compare(stock: dict[str, Any], swap: dict[str, Any]) -> dict[str, Any]:
    moved = (stock["params"] - stock["start"]).norm()
    distance = (swap["params"] - stock["params"]).norm()
    return {
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(stock["loss"], swap["loss"])),
        "max_abs_reward_diff": max(
            abs(a - b) for a, b in zip(stock["reward"], swap["reward"]) if a is not None and b is not None
        ),
        "param_distance_rel": float(distance / moved) if float(moved) > 0 else math.nan,
        "reward_stock": stock["reward"],
        "reward_swap": swap["reward"],
        "loss_stock": stock["loss"],
        "loss_swap": swap["loss"],
        "learning_rate": stock["learning_rate"],
        "steps_without_advantage": stock["all_groups_flat"],
        "swap_metrics": swap["metrics"],
    }


def machine() -> str:
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU, {os.cpu_count()} cores ({model}), torch {torch.__version__}, torch threads {torch.get_num_threads()}"


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        f"Stock TRL vs the one-line swap, {meta['machine']}; trl {meta['trl']}; {meta['steps']} steps, lr "
        f"{meta['lr']}, toy task; median of {meta['rounds']} interleaved rounds for the time ratio (a shared "
        f"machine, load average {meta['load_average']:.1f} at the end: CPU time ratios of a tiny model are "
        "noise-level).",
        "",
        "| configuration | max abs loss diff | max abs reward diff | param distance / stock's move | "
        "swap kappa min | swap overshoot max | swap alpha (first, last) | steps without advantage | "
        "time swap / stock |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        m = r["swap_metrics"]
        kappa = min(m["grpo_fix/kappa"]) if "grpo_fix/kappa" in m else math.nan
        over = max(m["grpo_fix/overshoot_fraction"]) if "grpo_fix/overshoot_fraction" in m else math.nan
        alpha = m.get("clip_aware/alpha", [math.nan])
        lines.append(
            f"| {name} | {r['max_abs_loss_diff']:.3g} | {r['max_abs_reward_diff']:.3g} | "
            f"{r['param_distance_rel']:.3g} | {kappa:.3f} | {over:.3f} | ({alpha[0]:.3g}, {alpha[-1]:.3g}) | "
            f"{r['steps_without_advantage']} | {r['time_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "trl_swap_cpu"))
    a = ap.parse_args(argv)

    import torch
    import trl

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    results: dict[str, Any] = {}
    for name in a.rows:
        ratios, runs = [], {}
        for _ in range(a.rounds):
            runs = {kind: train(kind, ROWS[name], a.steps, a.lr) for kind in ("stock", "swap")}
            ratios.append(runs["swap"]["seconds"] / runs["stock"]["seconds"])
        results[name] = {
            "args": ROWS[name],
            **compare(runs["stock"], runs["swap"]),
            "time_ratio": statistics.median(ratios),
        }
        print(
            f"{name}: loss diff {results[name]['max_abs_loss_diff']:.3g}, time ratio {results[name]['time_ratio']:.2f}"
        )
    meta = {
        "machine": machine(),
        "load_average": os.getloadavg()[0],
        "trl": trl.__version__,
        "steps": a.steps,
        "lr": a.lr,
        "rounds": a.rounds,
    }
    table = markdown(results, meta)
    print(table)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    out.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
