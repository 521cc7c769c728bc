"""Worker for the TRL + DeepSpeed test: ``torchrun --nproc_per_node 2 trl_ds_worker.py STAGE OUT_JSON [LOSS_BACKEND]``.

Trains GRPOFixTrainer 3 optimizer steps (num_iterations=2, so later windows clip) under DeepSpeed
ZeRO-STAGE on 2 gloo ranks and writes, from rank 0, a JSON report: the optimizer class that
DeepSpeed steps, how many times ClipAwareAdamW.step ran on each rank, each rank's observed kappa /
alpha sequence, and whether parameters changed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/ for tiny_trl

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402


def _patch_accelerate_for_cpu_multiprocess() -> None:
    """TEST-ONLY: accelerate 1.15 gives no backend to multi-process DeepSpeed without CUDA
    (anchors-optim.md section 4); force gloo / MULTI_CPU when LOCAL_RANK is set and CUDA is absent."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    orig = PartialState._prepare_backend

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        if int(os.environ.get("LOCAL_RANK", -1)) != -1 and not torch.cuda.is_available() and not cpu:
            return "gloo", DistributedType.MULTI_CPU
        return orig(self, cpu, sagemaker_dp, backend)

    PartialState._prepare_backend = _prepare_backend


def main() -> None:
    stage = int(sys.argv[1])
    out_path = sys.argv[2]
    loss_backend = sys.argv[3] if len(sys.argv) > 3 else "torch"
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    _patch_accelerate_for_cpu_multiprocess()

    from tiny_trl import TRAINER_BASE, build_dataset, build_model, build_tokenizer, exit_after_barrier, reward_len

    from grpo_fix import ClipAwareAdamW
    from grpo_fix.integration.trl import GRPOFixConfig, GRPOFixTrainer

    calls = {"step": 0}
    orig_step = ClipAwareAdamW.step

    def counting_step(self, *a, **k):
        calls["step"] += 1
        return orig_step(self, *a, **k)

    ClipAwareAdamW.step = counting_step

    observed: list[dict] = []
    orig_observe = ClipAwareAdamW.observe

    def recording_observe(self, signal, **k):
        orig_observe(self, signal, **k)
        observed.append(
            {
                "kappa": float(signal.kappa),
                "rollout_start": bool(signal.rollout_start),
                "alpha": self.alpha,
                "num_tokens": float(signal.num_tokens),
            }
        )

    ClipAwareAdamW.observe = recording_observe

    tok = build_tokenizer()
    model = build_model(tok, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": False},
    }
    args = GRPOFixConfig(
        output_dir=tempfile.mkdtemp(),
        num_iterations=2,
        deepspeed=ds_config,
        loss_backend=loss_backend,
        clip_aware_tau=0.02,
        clip_aware_alpha_init=1.0,
        **TRAINER_BASE,
    )
    trainer = GRPOFixTrainer(
        model=model, reward_funcs=reward_len, args=args, train_dataset=build_dataset(), processing_class=tok
    )
    from transformers import TrainerCallback

    at_train_begin = {}

    class AttachedBeforeTraining(TrainerCallback):  # runs after the Trainer's resume-checkpoint load
        def on_train_begin(self, args, state, control, **kwargs):
            opt = trainer._gf_optimizer
            at_train_begin["attached"] = opt is not None and getattr(opt, "_deepspeed", None) is not None
            zero = trainer.accelerator.deepspeed_engine_wrapped.engine.optimizer
            at_train_begin["load_repaired"] = "load_hp_checkpoint_state_from_checkpoint_dir_stage3" in vars(zero)

    trainer.add_callback(AttachedBeforeTraining())
    trainer.train()

    engine = trainer.model_wrapped
    real = trainer.clip_aware_optimizer()
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(trainer.model.parameters())):
            after = [p.detach().clone() for p in trainer.model.parameters()]
    else:
        after = [p.detach().clone() for p in trainer.model.parameters()]
    changed = any(not torch.equal(a, b) for a, b in zip(after, before))
    report = {
        "rank": rank,
        "linear_kernel": trainer._gf_path.linear,
        "world": world,
        "num_processes": trainer.accelerator.num_processes,
        "deepspeed": bool(trainer.is_deepspeed_enabled),
        "basic_optimizer": type(engine.basic_optimizer).__name__,
        "real_is_basic": real is engine.basic_optimizer,
        "real_is_clip_aware": isinstance(real, ClipAwareAdamW),
        "step_calls": calls["step"],
        "observed": observed,
        "params_changed": changed,
        "attached_at_train_begin": at_train_begin.get("attached"),
        "load_repair_installed": at_train_begin.get("load_repaired"),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "logged_kappa": [h.get("grpo_fix/kappa") for h in trainer.state.log_history if "loss" in h],
    }
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(reports, f)
    exit_after_barrier()


if __name__ == "__main__":
    main()
