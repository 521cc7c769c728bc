"""ClipAwareAdamW for ``GRPOFixTrainer``: its settings from the config, and the object that steps.

``create_optimizer`` is the one route that survives DeepSpeed (transformers' ``deepspeed_init``
calls it; an optimizer instance is dropped there), so the trainer builds ClipAwareAdamW there with
HF's decay / no-decay groups.  :func:`stepping_optimizer` finds the instance that actually steps:
``engine.basic_optimizer`` under DeepSpeed, else the trainer's optimizer unwrapped from
accelerate's ``AcceleratedOptimizer``.
"""

from __future__ import annotations

from typing import Any

from grpo_fix import ClipAwareAdamW


def clip_aware_kwargs(args: Any) -> dict[str, Any]:
    """The ClipAwareAdamW constructor arguments of a :class:`GRPOFixConfig` (weight decay comes with
    HF's parameter groups)."""
    return dict(
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        gate=args.clip_aware_gate,
        controller=args.clip_aware_controller,
        tau=args.clip_aware_tau,
        alpha_init=args.clip_aware_alpha_init,
        backtrack=args.clip_aware_backtrack,
    )


def stepping_optimizer(optimizer: Any, engine: Any, deepspeed: bool) -> ClipAwareAdamW:
    """The ClipAwareAdamW that steps (``engine.basic_optimizer`` under DeepSpeed); ``RuntimeError``
    naming the known causes when something replaced it."""
    if deepspeed and hasattr(engine, "basic_optimizer"):
        opt = engine.basic_optimizer
    else:
        opt = optimizer
        while not isinstance(opt, ClipAwareAdamW) and hasattr(opt, "optimizer"):
            opt = opt.optimizer
    if not isinstance(opt, ClipAwareAdamW):
        raise RuntimeError(
            f"optimizer='clip_aware_adamw' but the optimizer that steps is {type(opt).__name__}: something replaced "
            "ClipAwareAdamW (a DeepSpeed 'optimizer' block, or offload without 'zero_force_ds_cpu_optimizer': "
            "false). Fix the DeepSpeed config or pass optimizer='adamw'."
        )
    if deepspeed and getattr(opt, "_deepspeed", None) is None:
        from grpo_fix.integration.deepspeed import attach_deepspeed

        attach_deepspeed(opt, engine)
    return opt
