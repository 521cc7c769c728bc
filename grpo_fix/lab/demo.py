"""``grpo-fix demo``: TRL's GRPOTrainer on the embedded toy task, TRL's default vs grpo-fix, side by side.

Both runs use TRL 1.16's GRPOTrainer machinery (generation, rewards, buffering, logging) through
:class:`grpo_fix.integration.trl.GRPOFixTrainer`, on the same tiny random Qwen2 policy, prompts,
seed and hyper-parameters, with ``num_iterations=2`` (two optimizer steps per generation batch,
so clipping and momentum overshoot can happen):

- **TRL default**: ``loss_type="dapo"`` (TRL 1.16's default; our dapo preset is tested equal to
  TRL's ``_compute_loss``, value and gradient), no prefix-consistent clipping, torch AdamW;
- **grpo-fix**: ``loss_type="uniform"`` (1/N_window per token, exact), prefix-consistent
  clipping and ClipAwareAdamW (gate + trust-region controller).

The trainer's own instrumentation logs the same diagnostics for both: reward, KL to the initial
policy, clip fraction, overshoot fraction and max |log s| excess, kappa, and |W_agg| on prefixes
shared by whole groups (Prop. 1).  Writes ``demo.json``, ``demo.md`` and ``demo.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

RUNS = {
    "TRL default (dapo + AdamW)": dict(loss_type="dapo", prefix_consistent=False, optimizer="adamw"),
    "grpo-fix (uniform + prefix-consistent + ClipAwareAdamW)": dict(
        loss_type="uniform", prefix_consistent=True, optimizer="clip_aware_adamw"
    ),
}

# (table column, TRL log key, aggregation over logged steps)
COLUMNS = [
    ("reward (last 25%)", "reward", "tail"),
    ("KL", "kl", "mean"),
    ("clip fraction", "clip_ratio/region_mean", "mean"),
    ("overshoot fraction", "grpo_fix/overshoot_fraction", "mean"),
    ("max excess", "grpo_fix/max_excess", "max"),
    ("kappa", "grpo_fix/kappa", "mean"),
    ("|W_agg| shared prefixes", "grpo_fix/w_agg_abs", "mean"),
]


class _Progress:
    """A one-line progress bar with the latest reward, replacing HF's per-step dict printing."""

    def __init__(self, name: str, steps: int):
        from tqdm.auto import tqdm
        from transformers import TrainerCallback

        bar = tqdm(total=steps, desc=name.split(" (")[0], unit="step")

        class Callback(TrainerCallback):  # HF logs a step after its on_step_end: the postfix follows the logs
            def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
                if logs and "reward" in logs:
                    bar.set_postfix(reward=f"{logs['reward']:.3f}")

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                bar.update(1)

            def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                bar.close()

        self.callback = Callback()


def _aggregate(history: list[dict], key: str, how: str) -> float:
    vals = [h[key] for h in history if key in h]
    if not vals:
        return float("nan")
    if how == "tail":
        vals = vals[-max(1, len(vals) // 4) :]
    return max(vals) if how == "max" else statistics.fmean(vals)


def run_one(
    name: str,
    overrides: dict,
    *,
    model_dir: str,
    out_dir: Path,
    steps: int,
    device: str,
    seed: int,
    lr: float,
    beta: float,
) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_fix.integration.trl import GRPOFixConfig, GRPOFixTrainer

    from .toy import build_prompts, target_share_reward

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompts = datasets.Dataset.from_dict({"prompt": build_prompts(64, seed=seed)})
    args = GRPOFixConfig(
        output_dir=str(out_dir / "runs" / overrides["loss_type"]),
        use_cpu=device == "cpu",
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=16,
        num_generations=8,
        gradient_accumulation_steps=1,
        num_iterations=2,
        max_completion_length=12,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        beta=beta,
        epsilon=0.2,
        temperature=1.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=seed,
        disable_tqdm=True,
        log_level="warning",
        **overrides,
    )
    trainer = GRPOFixTrainer(
        model=model,
        reward_funcs=target_share_reward,
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        callbacks=[_Progress(name, steps).callback],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our bar replaces the per-step dict printing
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    history = [h for h in trainer.state.log_history if "loss" in h]  # one entry per optimizer step
    tokens = max((h.get("num_tokens", 0.0) for h in history), default=0.0)
    summary = {col: _aggregate(history, key, how) for col, key, how in COLUMNS}
    summary["reward (first step)"] = next((h["reward"] for h in history if "reward" in h), float("nan"))
    summary["tokens/s"] = tokens / seconds if seconds > 0 else float("nan")
    summary["seconds"] = seconds
    return {"name": name, "config": overrides, "summary": summary, "history": history}


def missing_requirements() -> list[str]:
    """The demo's imports that are not installed (``pip install "grpo-fix[trl]"`` provides all of them)."""
    return [m for m in ("trl", "transformers", "datasets", "tqdm") if importlib.util.find_spec(m) is None]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        prog="grpo-fix demo",
        description="TRL's GRPOTrainer on the embedded toy task, TRL's default vs grpo-fix, side by side. "
        "Writes <out>/demo.{json,md} and, with matplotlib installed, demo.png.",
    )
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60; 2 for a smoke run)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default cpu)")
    ap.add_argument("--lr", type=float, default=3e-3, help="learning rate of both runs (default 3e-3)")
    ap.add_argument("--beta", type=float, default=0.01, help="KL coefficient to the initial policy (default 0.01)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model, prompts and sampling (default 0)")
    ap.add_argument("--out", default="grpo_fix_demo_out", help="output folder (default grpo_fix_demo_out)")
    args = ap.parse_args(argv)
    missing = missing_requirements()
    if missing:
        raise SystemExit(f'grpo-fix demo needs {", ".join(missing)}: pip install "grpo-fix[trl]"')
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("grpo-fix demo --device cuda: no CUDA device is visible")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .experiments.report import markdown_table, write_results
    from .toy import build_model, build_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer()
        build_model(tokenizer, seed=args.seed).save_pretrained(tmp)  # TRL loads the reference model by path
        tokenizer.save_pretrained(tmp)
        results = [
            run_one(
                name,
                cfg,
                model_dir=tmp,
                out_dir=out,
                steps=args.steps,
                device=args.device,
                seed=args.seed,
                lr=args.lr,
                beta=args.beta,
            )
            for name, cfg in RUNS.items()
        ]
    cols = ["run", "reward (first step)"] + [c for c, _, _ in COLUMNS] + ["tokens/s"]
    rows = [{"run": r["name"], **r["summary"]} for r in results]
    table = markdown_table(rows, cols, floatfmt=".3g")

    def plot(fig: Any) -> None:
        panels = [
            ("reward", "reward"),
            ("grpo_fix/overshoot_fraction", "overshoot fraction"),
            ("grpo_fix/max_excess", "max |log s| excess"),
        ]
        for j, (key, label) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), j + 1)
            for r in results:
                pts = [(h["step"], h[key]) for h in r["history"] if key in h]
                if pts:
                    ax.plot(*zip(*pts), label=r["name"].split(" (")[0])
            ax.set(xlabel="optimizer step", ylabel=label)
            if j == 0:
                ax.legend(fontsize=8)

    can_plot = importlib.util.find_spec("matplotlib") is not None
    paths = write_results(
        out,
        "demo",
        title="grpo-fix demo: TRL default vs grpo-fix on the toy task",
        table=table,
        payload={"args": vars(args), "runs": results},
        plot=plot if can_plot else None,
        notes="Reward: share of the target character in the completion (random policy ~0.03).",
    )
    print("\n" + table)
    if not can_plot:
        print("\nmatplotlib is not installed: table only, no demo.png (pip install matplotlib to get the plot)")
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "paths": paths}


if __name__ == "__main__":
    main()
