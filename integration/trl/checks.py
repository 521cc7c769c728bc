"""Construction-time refusals of :class:`GRPOFixConfig` and ``GRPOFixTrainer``.

Each function raises ``ValueError`` (``TypeError`` for a wrong type) whose message says what the
combination would do and names the setting that fixes it; nothing is switched off silently.  The
config-level ones run in ``GRPOFixConfig.__post_init__``; :func:`check_user_optimizer` needs the
trainer's ``optimizers=`` / ``optimizer_cls_and_kwargs`` and runs in ``GRPOFixTrainer.__init__``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from grpo_fix.integration.deepspeed import check_deepspeed_config

#: TRL's vLLM importance-sampling modes whose weight is one number per sequence.
SEQUENCE_IS_MODES = ("sequence_truncate", "sequence_mask")
#: ``TrainingArguments.optim`` values ClipAwareAdamW replaces (AdamW; it chooses its own kernel).
ADAMW_OPTIMS = ("adamw_torch", "adamw_torch_fused")


def uses_entropy(args: Any) -> bool:
    """Whether the loss needs per-token entropies (TRL's entropy mask or entropy bonus)."""
    return args.top_entropy_quantile < 1.0 or args.entropy_coef != 0.0 or bool(args.use_adaptive_entropy)


def check_loss_options(args: Any) -> None:
    """Loss type x importance-sampling level x vLLM correction x loss backend."""
    level = args.importance_sampling_level
    if args.loss_type == "uniform" and level != "token":
        raise ValueError(
            f"loss_type='uniform' needs token-level importance ratios, got importance_sampling_level={level!r}: a "
            "sequence ratio differs across completions that share a prefix and breaks the cancellation of Prop. 1. "
            "Set importance_sampling_level='token', or use loss_type='grpo' (GSPO) / 'dapo' for sequence ratios."
        )
    if args.loss_type == "cispo" and level != "token":
        raise ValueError(
            "loss_type='cispo' with importance_sampling_level='sequence' (a sequence IS weight times token "
            "log-probs) is not a configuration of the grpo-fix surrogate; set importance_sampling_level='token' "
            "or use trl.GRPOTrainer"
        )
    vllm_is = args.use_vllm and args.vllm_importance_sampling_correction
    if vllm_is and args.loss_type == "uniform" and args.vllm_importance_sampling_mode in SEQUENCE_IS_MODES:
        raise ValueError(
            f"loss_type='uniform' with vllm_importance_sampling_mode={args.vllm_importance_sampling_mode!r} (TRL's "
            "default): a per-sequence vLLM importance weight differs across completions that share a prefix and "
            "breaks the cancellation of Prop. 1, like a sequence ratio. Set vllm_importance_sampling_mode="
            "'token_truncate' or 'token_mask' (per-token weights, made consistent on shared prefixes), or use "
            "loss_type='dapo'."
        )
    if args.loss_backend == "triton":
        needs_torch = []
        if uses_entropy(args):
            needs_torch.append(
                "the entropy mask / entropy bonus (top_entropy_quantile < 1, entropy_coef, "
                "use_adaptive_entropy) need per-token entropies"
            )
        if vllm_is and args.off_policy_mask_threshold is not None:
            needs_torch.append("off_policy_mask_threshold with vLLM measures against the sampler's log-probs")
        if args.cast_lm_head_to_fp32:
            needs_torch.append("cast_lm_head_to_fp32 is not implemented on the logits-free path")
        if needs_torch:
            raise ValueError(
                "loss_backend='triton' (the logits-free loss returns no per-token log-probs or entropies) cannot "
                f"run this configuration: {'; '.join(needs_torch)}. Set loss_backend='torch' (or 'auto')."
            )


def check_optimizer_options(args: Any) -> None:
    """``optim`` and the ClipAwareAdamW knobs, validated by ClipAwareAdamW itself."""
    if args.optimizer != "clip_aware_adamw":
        return
    optim = getattr(args.optim, "value", args.optim)
    if optim not in ADAMW_OPTIMS:
        raise ValueError(
            f"optim={optim!r} with optimizer='clip_aware_adamw': GRPOFixTrainer would replace it with "
            f"ClipAwareAdamW (an AdamW). Set optimizer='adamw' to train with optim={optim!r} (TRL's optimizer, "
            f"without the momentum gate and step controller), or set optim to one of {ADAMW_OPTIMS}."
        )
    import torch

    from grpo_fix import ClipAwareAdamW

    from .optimizer import clip_aware_kwargs

    probe = torch.nn.Parameter(torch.zeros(1))
    try:
        ClipAwareAdamW([probe], weight_decay=args.weight_decay, **clip_aware_kwargs(args))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"GRPOFixConfig: the ClipAwareAdamW settings (learning_rate, adam_beta1/2, adam_epsilon, weight_decay, "
            f"clip_aware_tau, clip_aware_alpha_init) are invalid: {err}"
        ) from err


def check_schedule(args: Any) -> None:
    """Counts TRL accepts but that make the generation schedule meaningless."""
    if isinstance(args.num_iterations, bool) or not isinstance(args.num_iterations, int) or args.num_iterations < 1:
        raise ValueError(
            f"num_iterations must be an int >= 1 (each generation batch is optimised num_iterations times), got "
            f"{args.num_iterations!r}; with 0 no step would ever run"
        )


def load_deepspeed_config(ds: Any) -> dict | None:
    """A DeepSpeed config given as a dict, a JSON file path, a JSON string or an HfDeepSpeedConfig."""
    if ds is None:
        return None
    if isinstance(ds, dict):
        return ds
    if isinstance(ds, (str, os.PathLike)) and os.path.isfile(ds):
        with open(ds) as f:
            return json.load(f)
    if isinstance(ds, str):
        try:
            return json.loads(ds)
        except ValueError:
            return None
    cfg = getattr(ds, "config", None)  # HfDeepSpeedConfig
    return cfg if isinstance(cfg, dict) else None


def check_distributed_options(args: Any) -> None:
    """The DeepSpeed config, given as ``deepspeed=`` or by an accelerate YAML (``accelerate launch``).

    Runs after ``TrainingArguments.__post_init__``, which builds ``args.deepspeed_plugin`` from
    either source.  An accelerate YAML without ``deepspeed_config_file`` cannot carry
    ``"zero_force_ds_cpu_optimizer": false``, so CPU optimizer offload set there is refused with
    the route that can (a JSON file named by ``deepspeed_config_file``).
    """
    if args.optimizer != "clip_aware_adamw":
        return
    cfg = load_deepspeed_config(args.deepspeed)
    from_yaml = cfg is None and args.deepspeed_plugin is not None
    if from_yaml:
        cfg = args.deepspeed_plugin.deepspeed_config
    if not cfg:
        return
    try:
        check_deepspeed_config(cfg, completed=True)
    except ValueError as err:
        if from_yaml and os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none") == "none":
            raise ValueError(
                f"the DeepSpeed settings of the accelerate config are refused: {err}. An accelerate YAML cannot "
                'carry "zero_force_ds_cpu_optimizer": false; write the DeepSpeed settings to a JSON file with that '
                "key and point the YAML's deepspeed_config.deepspeed_config_file to it (or pass "
                "GRPOFixConfig(deepspeed='ds.json')), or set offload_optimizer_device: none"
            ) from err
        raise
    stage = int((cfg.get("zero_optimization") or {}).get("stage", 0) or 0)
    if args.clip_aware_backtrack and stage > 0:
        raise ValueError(
            f"clip_aware_backtrack=True is not supported under DeepSpeed ZeRO stage {stage}: the optimizer steps fp32 "
            "partitions that reach the model only after step(), so the re-measured ratios would not see a "
            "pulled-back step. Set clip_aware_backtrack=False (gate + controller) or use ZeRO stage 0 in fp32"
        )


def check_user_optimizer(args: Any, optimizer: Any, optimizer_cls_and_kwargs: Any) -> None:
    """``optimizers=(opt, scheduler)`` / ``optimizer_cls_and_kwargs`` given to the trainer.

    With ``optimizer="clip_aware_adamw"`` a :class:`grpo_fix.ClipAwareAdamW` (instance or class) is
    used as given (without DeepSpeed: transformers drops an instance under DeepSpeed); anything
    else is refused, naming ``optimizer="adamw"``.
    """
    from grpo_fix import ClipAwareAdamW

    if args.optimizer != "clip_aware_adamw":
        return
    given = None
    if optimizer is not None and not isinstance(optimizer, ClipAwareAdamW):
        given = type(optimizer).__name__
    if optimizer_cls_and_kwargs is not None:
        cls = optimizer_cls_and_kwargs[0]
        if not (isinstance(cls, type) and issubclass(cls, ClipAwareAdamW)):
            given = getattr(cls, "__name__", repr(cls))
    if given is not None:
        raise ValueError(
            f"the trainer was given optimizer {given} while optimizer='clip_aware_adamw': pass optimizer='adamw' "
            f"in GRPOFixConfig to train with {given} (no momentum gate or step controller), or pass a "
            "grpo_fix.ClipAwareAdamW (or nothing: GRPOFixTrainer builds one)"
        )
    if optimizer is not None and (args.deepspeed or args.deepspeed_plugin is not None):
        raise ValueError(
            "optimizers=(ClipAwareAdamW(...), ...) under DeepSpeed: transformers would drop the instance. Leave "
            "optimizers unset (GRPOFixTrainer builds ClipAwareAdamW from the clip_aware_* settings), or pass "
            "optimizer_cls_and_kwargs=(ClipAwareAdamW, {...})"
        )


#: Micro-batch entries ``_compute_loss`` reads as tensors (the first five are required).
LOSS_INPUT_TENSORS = (
    "prompt_ids",
    "prompt_mask",
    "completion_ids",
    "completion_mask",
    "advantages",
    "old_per_token_logps",
    "ref_per_token_logps",
    "importance_sampling_ratio",
    "sampling_per_token_logps",
    "tool_mask",
)


def check_loss_inputs(inputs: Any) -> None:
    """``TypeError`` naming the entry when a micro-batch is not a dict of tensors (e.g. a list or a
    numpy array from a custom ``_generate_and_score_completions``), ``KeyError`` for a missing one."""
    import torch

    if not isinstance(inputs, dict):
        raise TypeError(f"GRPOFixTrainer._compute_loss expects the micro-batch dict, got {type(inputs).__name__}")
    for i, key in enumerate(LOSS_INPUT_TENSORS):
        value = inputs.get(key)
        if value is None:
            if i < 5:
                raise KeyError(
                    f"the micro-batch has no {key!r} (the inputs TRL's _generate_and_score_completions makes)"
                )
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"inputs[{key!r}] must be a torch.Tensor, got {type(value).__name__}; convert it with "
                "torch.as_tensor(..., device=accelerator.device)"
            )
