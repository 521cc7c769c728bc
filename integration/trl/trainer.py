"""TRL 1.16 adapter: the corrected GRPO loss and ClipAwareAdamW in ``GRPOTrainer`` by a one-line swap.

::

    from grpo_fix.integration.trl import GRPOFixConfig, GRPOFixTrainer   # was: from trl import ...

    args = GRPOFixConfig(output_dir="out", loss_type="uniform")          # the default
    trainer = GRPOFixTrainer(model=..., reward_funcs=..., args=args, train_dataset=...)
    trainer.train()

What changes against ``trl.GRPOTrainer`` (everything else, generation, rewards, logging,
checkpointing, vLLM-free DeepSpeed/DDP, is TRL's own code):

- **Loss** (``_compute_loss``): on CPU (``loss_kernel="torch"``) TRL's fused log-prob path
  (``_get_per_token_logps_and_entropies``, never materialising the logits) followed by
  :class:`grpo_fix.GroupSurrogateLoss`; on CUDA (``loss_kernel="auto"``/``"linear"``) grpo_fix's
  logits-free Triton loss (:func:`grpo_fix.kernels.linear_surrogate_loss`: hidden states +
  ``lm_head.weight`` in, loss out, three GEMMs) run *inside* the model's forward, so DDP and
  ZeRO-3 hooks fire and ``lm_head`` is gathered under ZeRO-3 (no ``entropy`` metric on that path).
  ``loss_type="uniform"`` is the corrected loss; TRL's ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``
  and ``cispo`` map to the presets of the same name with TRL's hyper-parameters (epsilon,
  epsilon_high, delta, beta, use_bias_correction_kl, importance_sampling_level), so with
  ``prefix_consistent=False`` the loss equals TRL's (tested to 1e-6, value and gradients).
- **Exact window normaliser**: a *window* is the ``gradient_accumulation_steps`` consecutive
  micro-batches of one optimizer step.  TRL buffers ``steps_per_generation`` micro-batches per
  generation batch and replays them ``num_iterations`` times; its ``dapo`` normaliser
  ``num_items_in_batch / P * GA / spg`` is the mean window size, exact only when
  ``steps_per_generation == gradient_accumulation_steps``.  Here every buffered micro-batch
  carries the global (all ranks) valid-token count of each window it belongs to (key
  :data:`WINDOW_TOKENS_KEY`, one entry per replay), computed at generation time, so
  ``uniform``/``dapo`` weigh every token of the window by exactly ``1 / N_window``.  The loss is
  returned already scaled for gradient accumulation (TRL's ``loss_is_scaled_for_ga``) and
  multiplied by the number of processes (gradients are averaged over ranks).
- **Prefix-consistent advantages** (``prefix_consistent=True``): computed right after TRL scores
  a generation batch, over whole groups (TRL spreads a group over processes, so the completion
  ids, masks and advantages are gathered, padded to a common length, and this process's rows
  sliced back), stored as per-token ``advantages`` (B, T).
- **Group-preserving shuffle**: when ``per_device_train_batch_size`` is a multiple of
  ``num_generations`` the buffered micro-batches hold whole groups (TRL shuffles rows; we shuffle
  groups), so the loss also measures W_agg, the shared-prefix gradient aggregate of Prop. 1.
- **ClipAwareAdamW** (``optimizer="clip_aware_adamw"``, the default): installed by
  ``create_optimizer`` with HF's decay/no-decay groups, the only route that survives DeepSpeed
  (transformers silently drops ``optimizers=`` there).  Each window's
  :class:`~grpo_fix.TrustRegionSignal` is summed over its micro-batches, all-reduced over ranks
  and handed to the optimizer (``observe``) in the last micro-batch's ``_compute_loss``, i.e.
  *before* the backward that, under DeepSpeed, runs the optimizer step; the first window of every
  generation batch is flagged ``rollout_start``.  With ``clip_aware_backtrack=True`` the trainer
  supplies the no-grad re-measure of the last micro-batch (``set_backtrack_fn``).
- **Metrics** (``self._metrics[mode]``, logged by TRL): ``clip_ratio/low_mean``,
  ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``entropy``, ``kl`` (beta > 0), and per
  window ``grpo_fix/kappa``, ``grpo_fix/overshoot_fraction``, ``grpo_fix/clip_fraction``,
  ``grpo_fix/max_excess``, ``grpo_fix/w_agg``, ``grpo_fix/w_agg_abs`` (whole-group micro-batches
  only) and the optimizer's ``clip_aware/kappa``, ``clip_aware/alpha``,
  ``clip_aware/overshoot_fraction``, ``clip_aware/backtracks``.

Not supported (a clear ``ValueError`` at config time): vLLM importance-sampling correction, the
entropy bonus / entropy mask, and TRL's ``sapo``, ``vespo``, ``luspo`` loss types.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import split_pixel_values_by_grid, split_tensor_dict, unsplit_pixel_values_by_grid

from grpo_fix import PRESETS, GroupSurrogateLoss, SurrogateConfig, TrustRegionSignal, prefix_consistent_advantages
from grpo_fix.loss.config import GROUP_CONSTANT_WEIGHTINGS
from grpo_fix.integration.deepspeed import check_deepspeed_config
from grpo_fix.options import COMPILE_CHOICES

logger = logging.getLogger(__name__)

__all__ = [
    "GRPOFixConfig",
    "GRPOFixTrainer",
    "LOSS_KERNELS",
    "LOSS_TYPES",
    "OPTIMIZERS",
    "WINDOW_TOKENS_KEY",
    "surrogate_config_from_args",
]

#: ``loss_type`` values accepted by :class:`GRPOFixConfig`, mapped to :data:`grpo_fix.PRESETS`.
LOSS_TYPES: dict[str, str] = {
    "uniform": "uniform",
    "dapo": "dapo",
    "grpo": "grpo",
    "bnpo": "bnpo",
    "dr_grpo": "dr_grpo",
    "cispo": "cispo",
}
OPTIMIZERS = ("clip_aware_adamw", "adamw")
LOSS_KERNELS = ("auto", "linear", "torch")
#: ``GRPOFixConfig.loss_compile_math``: the ``compile_math`` of the grpo_fix loss entry points.
LOSS_COMPILE_MATH = COMPILE_CHOICES

#: Key of the per-micro-batch tensor ``(num_iterations,)`` float64 holding, for each replay of the
#: buffered micro-batch, the global valid-token count of the optimizer window it belongs to.
WINDOW_TOKENS_KEY = "grpo_fix_window_tokens"


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
def _load_ds_config(ds: Any) -> dict | None:
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


@dataclass
class GRPOFixConfig(GRPOConfig):
    """``trl.GRPOConfig`` plus the grpo-fix switches.

    Args (beyond ``GRPOConfig``'s):
        loss_type: ``"uniform"`` (default: the corrected loss, 1/N_window per token, token ratios),
            or TRL's ``"dapo"``, ``"grpo"``, ``"bnpo"``, ``"dr_grpo"``, ``"cispo"`` (same math as TRL,
            except that ``dapo`` uses the exact window token count).
        prefix_consistent: prefix-consistent clipping (class-mean advantages over shared prefixes,
            computed at generation time over whole groups).  Only defined for token ratios with a
            group-constant weighting (``uniform``, ``dapo``, ``bnpo``, ``dr_grpo``); for the other
            loss types the default ``True`` is switched off with a warning.
        optimizer: ``"clip_aware_adamw"`` (default) or ``"adamw"`` (TRL's ``args.optim``).
        clip_aware_gate, clip_aware_controller, clip_aware_tau, clip_aware_alpha_init,
            clip_aware_backtrack: the :class:`grpo_fix.ClipAwareAdamW` mechanisms
            (``gate``, ``controller``, ``tau``, ``alpha_init``, ``backtrack``; same defaults, except
            that ``clip_aware_alpha_init=None`` warm-starts at 0.1 when rollouts are replayed).
        loss_kernel: ``"auto"`` (default: grpo_fix's logits-free Triton loss when the model is on
            CUDA, else TRL's fused log-probs + the torch loss), ``"linear"`` or ``"torch"``.
        loss_compile_math: ``"auto"`` (default: the loss's per-token math under ``torch.compile``
            on CUDA), ``"always"`` or ``"never"`` (see :mod:`grpo_fix.loss.compiled`).
    """

    loss_type: str = field(
        default="uniform",
        metadata={"help": f"One of {tuple(LOSS_TYPES)}; 'uniform' is the corrected loss."},
    )
    prefix_consistent: bool = field(
        default=True,
        metadata={"help": "Prefix-consistent clipping (token ratios and uniform/dapo/bnpo/dr_grpo only)."},
    )
    optimizer: str = field(default="clip_aware_adamw", metadata={"help": f"One of {OPTIMIZERS}."})
    clip_aware_gate: bool = field(default=True, metadata={"help": "Scale carried momentum by kappa."})
    clip_aware_controller: bool = field(default=True, metadata={"help": "Trust-region step multiplier alpha."})
    clip_aware_tau: float = field(default=0.05, metadata={"help": "Overshoot-fraction threshold."})
    clip_aware_alpha_init: float | None = field(
        default=None,
        metadata={
            "help": "The controller's alpha before the first window; None: 0.1 (warm start) when rollouts "
            "are replayed (num_iterations > 1 or steps_per_generation > gradient_accumulation_steps), "
            "else 1.0."
        },
    )
    clip_aware_backtrack: bool = field(
        default=False, metadata={"help": "Backtrack steps past the trust region (one extra no-grad forward)."}
    )
    loss_kernel: str = field(
        default="auto",
        metadata={
            "help": f"One of {LOSS_KERNELS}: 'linear' = grpo_fix's logits-free Triton loss (hidden + lm_head "
            "in, loss out), 'torch' = TRL's fused log-probs + the torch loss, 'auto' = linear on CUDA."
        },
    )
    loss_compile_math: str = field(
        default="auto",
        metadata={
            "help": f"One of {tuple(LOSS_COMPILE_MATH)}: the loss's per-token math under torch.compile "
            "('auto' = on CUDA)."
        },
    )

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"unknown loss_type {self.loss_type!r} for GRPOFixConfig; choose one of {tuple(LOSS_TYPES)} "
                "(TRL's sapo/vespo/luspo are not supported by grpo-fix: use trl.GRPOTrainer for them)"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.loss_kernel not in LOSS_KERNELS:
            raise ValueError(f"unknown loss_kernel {self.loss_kernel!r}; choose one of {LOSS_KERNELS}")
        if self.loss_compile_math not in LOSS_COMPILE_MATH:
            raise ValueError(
                f"unknown loss_compile_math {self.loss_compile_math!r}; choose one of {tuple(LOSS_COMPILE_MATH)}"
            )
        if self.loss_type == "uniform" and self.importance_sampling_level != "token":
            raise ValueError(
                f"loss_type='uniform' needs token-level importance ratios, got importance_sampling_level="
                f"{self.importance_sampling_level!r}: a sequence ratio differs across completions that share a "
                "prefix and breaks the cancellation of Prop. 1. Set importance_sampling_level='token', or use "
                "loss_type='grpo' (GSPO) / 'dapo' for sequence-level ratios."
            )
        if self.loss_type == "cispo" and self.importance_sampling_level != "token":
            raise ValueError("loss_type='cispo' with grpo-fix needs importance_sampling_level='token'")
        if self.use_vllm and self.vllm_importance_sampling_correction:
            raise ValueError(
                "GRPOFixTrainer does not apply vLLM's importance-sampling correction; set "
                "vllm_importance_sampling_correction=False or use trl.GRPOTrainer"
            )
        if self.top_entropy_quantile < 1.0 or self.entropy_coef != 0.0 or self.use_adaptive_entropy:
            raise ValueError(
                "GRPOFixTrainer does not support the entropy mask or bonus; set top_entropy_quantile=1.0, "
                "entropy_coef=0.0 and use_adaptive_entropy=False"
            )
        if self.prefix_consistent:
            weighting = PRESETS[LOSS_TYPES[self.loss_type]].weighting
            ratio = PRESETS[LOSS_TYPES[self.loss_type]].ratio
            token_ratios = ratio == "token" and self.importance_sampling_level == "token"
            if weighting not in GROUP_CONSTANT_WEIGHTINGS or not token_ratios:
                logger.warning(
                    "prefix_consistent=True is only defined for token ratios with a group-constant weighting "
                    "(uniform, dapo, bnpo, dr_grpo); switching it off for loss_type=%r",
                    self.loss_type,
                )
                self.prefix_consistent = False
        ds_cfg = _load_ds_config(self.deepspeed)
        if ds_cfg and self.optimizer == "clip_aware_adamw":
            check_deepspeed_config(ds_cfg, completed=True)
        if ds_cfg and self.optimizer == "clip_aware_adamw" and self.clip_aware_backtrack:
            stage = int((ds_cfg.get("zero_optimization") or {}).get("stage", 0) or 0)
            if stage > 0:
                raise ValueError(
                    f"clip_aware_backtrack=True is not supported under DeepSpeed ZeRO stage {stage}: the optimizer "
                    "steps fp32 partitions that reach the model only after step(), so the re-measured ratios "
                    "would not see a pulled-back step. Set clip_aware_backtrack=False (gate + controller) or "
                    "use ZeRO stage 0 in fp32"
                )
        super().__post_init__()
        ga, spg, mu = self.gradient_accumulation_steps, self.steps_per_generation, self.num_iterations
        if (spg * mu) % ga != 0:
            raise ValueError(
                f"steps_per_generation * num_iterations = {spg} * {mu} must be a multiple of "
                f"gradient_accumulation_steps = {ga} for the exact window normaliser (an optimizer window must "
                "not span two generation batches); raise steps_per_generation or num_iterations, or lower "
                "gradient_accumulation_steps"
            )


def surrogate_config_from_args(args: GRPOConfig) -> SurrogateConfig:
    """The :class:`grpo_fix.SurrogateConfig` equivalent to a (GRPOFix)Config's loss settings.

    Prefix-consistent advantages are computed at generation time by the trainer, so the returned
    config has ``prefix_consistent=False`` (the loss sees per-token advantages already).
    """
    preset = PRESETS[LOSS_TYPES[args.loss_type]]
    eps_low = args.epsilon
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    kw: dict[str, Any] = dict(
        beta=args.beta,
        kl_estimator="k3",
        kl_times_ratio=bool(args.use_bias_correction_kl),
        prefix_consistent=False,
        delta=args.delta,
        off_policy_mask_threshold=args.off_policy_mask_threshold,
        max_completion_length=args.max_completion_length,
    )
    if preset.ratio == "sg_logp":  # CISPO: TRL caps the IS weight at the raw epsilon_high, no lower bound
        kw.update(eps_low=1.0, eps_high=eps_high - 1.0, delta=None)
    else:
        kw.update(eps_low=eps_low, eps_high=eps_high)
        if args.importance_sampling_level == "sequence":
            kw["ratio"] = "sequence"
    return preset.replace(**kw)


def _buffer_file(process_index: int) -> str:
    return f"grpo_fix_generation_buffer_rank{process_index}.pt"


# ------------------------------------------------------------------------------------------------
# trainer
# ------------------------------------------------------------------------------------------------
class GRPOFixTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with the grpo-fix loss, exact window normaliser and ClipAwareAdamW.

    Takes the same arguments as ``GRPOTrainer``; ``args`` must be a :class:`GRPOFixConfig` (a plain
    ``GRPOConfig`` raises ``TypeError``; ``None`` builds a default ``GRPOFixConfig`` as TRL does).
    See the module docstring.
    """

    def __init__(self, *args, **kwargs):
        a = args[2] if len(args) > 2 else kwargs.get("args")
        if a is None and len(args) <= 2:
            model = args[0] if args else kwargs.get("model")
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            kwargs["args"] = GRPOFixConfig(output_dir=f"{(name or 'model').split('/')[-1]}-GRPOFix")
        elif not isinstance(a, GRPOFixConfig):
            raise TypeError(
                f"GRPOFixTrainer needs args=GRPOFixConfig(...) (a trl.GRPOConfig subclass), got {type(a).__name__}"
            )
        super().__init__(*args, **kwargs)
        self.surrogate = GroupSurrogateLoss(
            surrogate_config_from_args(self.args), compile_math=self.args.loss_compile_math
        )
        self._gf_linear = self._use_linear_kernel()
        if self._gf_linear:
            _install_linear_loss_forward(self.model)
        self._gf_window_signal: TrustRegionSignal | None = None
        self._gf_window_wagg: torch.Tensor | None = None
        self._gf_whole_groups = False
        self._gf_optimizer = None
        self.add_callback(_ClipAwareStatsCallback(self))

    # -- optimizer -------------------------------------------------------------------------------
    def _clip_aware_kwargs(self) -> dict:
        a = self.args
        return dict(
            lr=a.learning_rate,
            betas=(a.adam_beta1, a.adam_beta2),
            eps=a.adam_epsilon,
            gate=a.clip_aware_gate,
            controller=a.clip_aware_controller,
            tau=a.clip_aware_tau,
            alpha_init=self._clip_aware_alpha_init(),
            backtrack=a.clip_aware_backtrack,
        )

    def _clip_aware_alpha_init(self) -> float:
        """``clip_aware_alpha_init``, or for None: 0.1 when a rollout batch is optimised by more
        than one window (off-policy replays: the warm start removes their first excursion), else 1."""
        a = self.args
        if a.clip_aware_alpha_init is not None:
            return float(a.clip_aware_alpha_init)
        replays = a.num_iterations > 1 or (a.steps_per_generation or 0) > a.gradient_accumulation_steps
        return 0.1 if replays else 1.0

    def create_optimizer(self, model=None):
        """ClipAwareAdamW with HF's decay / no-decay groups (``optimizer="clip_aware_adamw"``).

        transformers' ``deepspeed_init`` calls this too, so it is also the optimizer DeepSpeed
        wraps.  A user-supplied ``optimizers=(opt, ...)`` (no DeepSpeed) is kept as is.
        """
        if self.args.optimizer != "clip_aware_adamw" or self.optimizer is not None:
            return super().create_optimizer(model)
        from grpo_fix import ClipAwareAdamW

        saved = self.optimizer_cls_and_kwargs
        self.optimizer_cls_and_kwargs = (ClipAwareAdamW, self._clip_aware_kwargs())
        try:
            return super().create_optimizer(model)
        finally:
            self.optimizer_cls_and_kwargs = saved

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """HF's scheduler; under DeepSpeed, also attach ClipAwareAdamW to the engine right away.

        The Trainer creates the scheduler after ``accelerator.prepare`` built the engine and
        before it loads a ``resume_from_checkpoint``; attaching here installs
        :func:`grpo_fix.integration.deepspeed.attach_deepspeed`'s repair of DeepSpeed's ZeRO-3
        universal-checkpoint loading before that load (otherwise the first window attaches)."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if getattr(self, "is_deepspeed_enabled", False) and wrapped is not None:
            self.clip_aware_optimizer(engine=wrapped.engine)
        return scheduler

    def clip_aware_optimizer(self, engine=None):
        """The optimizer object that actually steps: ``engine.basic_optimizer`` under DeepSpeed,
        else ``self.optimizer`` unwrapped from accelerate's ``AcceleratedOptimizer``.  Asserts it is
        a ClipAwareAdamW when ``optimizer="clip_aware_adamw"``; returns None for ``"adamw"`` or
        before the optimizer exists.  ``engine``: the DeepSpeed engine (default ``model_wrapped``)."""
        if self._gf_optimizer is not None:
            return self._gf_optimizer
        if self.args.optimizer != "clip_aware_adamw" or self.optimizer is None:
            return None
        from grpo_fix import ClipAwareAdamW

        engine = engine if engine is not None else getattr(self, "model_wrapped", None)
        is_ds = getattr(self, "is_deepspeed_enabled", False) and hasattr(engine, "basic_optimizer")
        if is_ds:
            opt = engine.basic_optimizer
        else:
            opt = self.optimizer
            while not isinstance(opt, ClipAwareAdamW) and hasattr(opt, "optimizer"):
                opt = opt.optimizer
        if not isinstance(opt, ClipAwareAdamW):
            raise RuntimeError(
                f"optimizer='clip_aware_adamw' but the optimizer that steps is {type(opt).__name__}: something "
                "replaced ClipAwareAdamW (a DeepSpeed 'optimizer' block, offload without "
                "'zero_force_ds_cpu_optimizer': false, or optimizers=(...) passed to the trainer). Fix the "
                "DeepSpeed config or pass optimizer='adamw'."
            )
        if is_ds:
            try:
                from grpo_fix.integration.deepspeed import attach_deepspeed
            except ImportError:  # pragma: no cover - the DeepSpeed helper is optional
                attach_deepspeed = None
            if attach_deepspeed is not None and getattr(opt, "_deepspeed", None) is None:
                attach_deepspeed(opt, engine)
        self._gf_optimizer = opt
        return opt

    # -- checkpoints -----------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        """TRL's checkpoint plus this process's generation buffer and micro-step counter.

        TRL 1.16 keeps the buffered completions and ``_step`` only in memory, so a run resumed
        between two generations would regenerate the pending replays with the current policy and
        shift its generation schedule (and our window position and rollout flag, which read
        ``_step``).  Saving both makes ``resume_from_checkpoint`` exact at any optimizer step."""
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        state = {"step": self._step, "whole_groups": self._gf_whole_groups, "buffered_inputs": self._buffered_inputs}
        torch.save(state, os.path.join(folder, _buffer_file(self.accelerator.process_index)))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = None if checkpoint is None else os.path.join(checkpoint, _buffer_file(self.accelerator.process_index))
        if path is None or not os.path.exists(path):
            return
        # load on CPU, then move: under multi-process CPU training accelerate's device is "cpu:<i>",
        # which torch.load's map_location does not accept
        from accelerate.utils import send_to_device

        state = send_to_device(torch.load(path, map_location="cpu", weights_only=False), self.accelerator.device)
        self._step = state["step"]
        self._gf_whole_groups = state["whole_groups"]
        self._buffered_inputs = state["buffered_inputs"]

    # -- generation time -------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.args.prefix_consistent:
            mode = "train" if self.model.training else "eval"
            group = self.num_generations if mode == "train" else self.num_generations_eval
            out["advantages"] = self._prefix_consistent_local(out, group)
        return out

    def _loss_mask(self, batch) -> torch.Tensor:
        mask = batch["completion_mask"]
        if batch.get("tool_mask") is not None:
            mask = mask * batch["tool_mask"]
        return mask

    def _prefix_consistent_local(self, out: dict, group_size: int) -> torch.Tensor:
        """Prefix-consistent per-token advantages of this process's rows, computed over whole groups
        (gathered from all processes, padded to a common completion length)."""
        ids, mask, adv = out["completion_ids"], self._loss_mask(out), out["advantages"]
        B, T = ids.shape
        acc = self.accelerator
        if acc.num_processes > 1:
            # the padding value is irrelevant: padded positions are masked and only follow other ones
            ids_all = acc.gather(acc.pad_across_processes(ids, dim=1, pad_index=0))
            mask_all = acc.gather(acc.pad_across_processes(mask, dim=1, pad_index=0))
            adv_all = acc.gather(adv if adv.dim() == 1 else acc.pad_across_processes(adv, dim=1, pad_index=0))
            start = acc.process_index * B
        else:
            ids_all, mask_all, adv_all, start = ids, mask, adv, 0
        pc = prefix_consistent_advantages(ids_all, adv_all.float(), group_size, mask_all)
        return pc[start : start + B, :T].contiguous()

    def _prepare_inputs(self, generation_batch):
        """TRL 1.16's ``_prepare_inputs`` (train: generate every ``spg * num_iterations`` micro-steps,
        shuffle, split into ``spg`` buffered micro-batches), with a group-preserving shuffle when
        micro-batches can hold whole groups, and the window token counts attached."""
        mode = "train" if self.model.training else "eval"
        if mode != "train":
            return super()._prepare_inputs(generation_batch)
        spg = self.args.steps_per_generation
        generate_every = spg * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            batch = split_pixel_values_by_grid(batch)
            batch = self._shuffle(batch)
            batches = split_tensor_dict(batch, spg)
            self._buffered_inputs = [unsplit_pixel_values_by_grid(b) for b in batches]
            self._attach_window_tokens(self._buffered_inputs)
        return self._buffered_inputs[self._step % spg]

    def _shuffle(self, batch: dict) -> dict:
        from trl.trainer.utils import shuffle_sequence_dict

        G = self.num_generations
        n = len(batch["completion_ids"])
        self._gf_whole_groups = (
            n % G == 0 and self.args.per_device_train_batch_size % G == 0 and "pixel_values" not in batch
        )
        if not self._gf_whole_groups:
            return shuffle_sequence_dict(batch)
        perm = (torch.randperm(n // G)[:, None] * G + torch.arange(G)[None, :]).reshape(-1)

        def permute(v):
            if v is None or (isinstance(v, torch.Tensor) and v.ndim == 0):
                return v
            if isinstance(v, torch.Tensor):
                return v[perm.to(v.device)]
            return [v[i] for i in perm.tolist()]

        return {k: permute(v) for k, v in batch.items()}

    def _attach_window_tokens(self, buffered: list[dict]) -> None:
        """Store in each buffered micro-batch the global token count of its window, per replay."""
        spg, mu, ga = self.args.steps_per_generation, self.num_iterations, self.args.gradient_accumulation_steps
        device = buffered[0]["completion_mask"].device
        local = torch.stack([self._loss_mask(b).sum().to(torch.float64) for b in buffered]).to(device)
        counts = local
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.gather(local[None, :]).reshape(-1, spg).sum(0)
        steps = torch.arange(spg * mu, device=device)
        window_of_step = steps // ga
        per_step = counts[steps % spg]
        window_tokens = torch.zeros(int(window_of_step.max()) + 1, dtype=torch.float64, device=device)
        window_tokens.index_add_(0, window_of_step, per_step)
        for i, b in enumerate(buffered):
            b[WINDOW_TOKENS_KEY] = window_tokens[window_of_step[i::spg]].clone()

    # -- loss ------------------------------------------------------------------------------------
    def _use_linear_kernel(self) -> bool:
        """Whether ``_compute_loss`` runs grpo_fix's logits-free Triton loss inside the model's forward."""
        choice = self.args.loss_kernel
        if choice == "torch":
            return False
        text_config = self.model.config.get_text_config()
        unsupported = [
            name
            for name, bad in (
                ("final_logit_softcapping", getattr(text_config, "final_logit_softcapping", None) is not None),
                (
                    "logit_scale",
                    any(
                        getattr(text_config, a, None) not in (None, 1, 1.0)
                        for a in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
                    ),
                ),
                ("MoE aux loss", self.aux_loss_enabled),
                ("multimodal model", text_config is not self.model.config),
                ("no output embeddings", self.model.get_output_embeddings() is None),
            )
            if bad
        ]
        if choice == "auto":
            on_cuda = next(self.model.parameters()).is_cuda or (torch.cuda.is_available() and not self.args.use_cpu)
            if not on_cuda or unsupported:
                return False
            try:
                import triton  # noqa: F401
            except ImportError:
                return False
            return True
        if unsupported:
            raise ValueError(
                f"loss_kernel='linear' does not support: {', '.join(unsupported)}; use loss_kernel='torch'"
            )
        return True

    def _linear_kernel_loss(self, model, input_ids, attention_mask, completion_ids, old, advantages, mask, loss_kwargs):
        """Forward through the (wrapped) model so DDP / ZeRO-3 hooks fire; the patched forward runs
        the backbone and grpo_fix's logits-free loss and returns the scalar loss."""
        spec = dict(
            cfg=self.surrogate.config,
            logits_to_keep=completion_ids.size(1),
            completion_ids=completion_ids,
            old_logp=old,
            advantages=advantages,
            mask=mask,
            temperature=self.temperature,
            loss_kwargs=loss_kwargs,
        )
        with self.accelerator.autocast():
            loss = model(input_ids=input_ids, attention_mask=attention_mask, grpo_fix_linear=spec)
        return loss, spec["output"]

    def _window_position(self) -> tuple[int, int, bool]:
        """(index of this micro-step in its window, window size, first window of the generation batch)."""
        ga = self.args.gradient_accumulation_steps
        k = self._step % (self.args.steps_per_generation * self.num_iterations)
        return k % ga, ga, k // ga == 0

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = self._loss_mask(inputs)
        mode = "train" if self.model.training else "eval"

        def logps_and_entropies(compute_entropy: bool):
            return self._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                compute_entropy=compute_entropy,
                compute_aux_loss=self.aux_loss_enabled and compute_entropy,
                pixel_values=inputs.get("pixel_values"),
                image_grid_thw=inputs.get("image_grid_thw"),
                num_images=inputs.get("num_images"),
                pixel_attention_mask=inputs.get("pixel_attention_mask"),
                spatial_shapes=inputs.get("spatial_shapes"),
                num_tiles=inputs.get("num_tiles"),
                image_sizes=inputs.get("image_sizes"),
                token_type_ids=inputs.get("token_type_ids"),
                mm_token_type_ids=inputs.get("mm_token_type_ids"),
                image_position_ids=inputs.get("image_position_ids"),
            )

        linear = self._gf_linear and "pixel_values" not in inputs
        if linear:
            per_token_logps, entropies, aux_loss = None, None, None
        else:
            per_token_logps, entropies, aux_loss = logps_and_entropies(True)
        P = self.accelerator.num_processes

        if mode == "train":
            pos, ga, first_window = self._window_position()
            num_micro = getattr(self, "current_gradient_accumulation_steps", None) or ga
            if WINDOW_TOKENS_KEY in inputs:
                spg = self.args.steps_per_generation
                replay = (self._step % (spg * self.num_iterations)) // spg
                n_window = inputs[WINDOW_TOKENS_KEY][replay]
            else:  # inputs not buffered by our _prepare_inputs: TRL's mean-window approximation
                n_window = inputs["num_items_in_batch"].double() / P * num_micro / self.args.steps_per_generation
        else:
            pos, ga, first_window, num_micro = 0, 1, False, 1
            n_window = inputs["num_items_in_batch"].double()

        whole_groups = mode == "train" and self._gf_whole_groups and completion_ids.size(0) % self.num_generations == 0
        loss_kwargs = dict(
            group_size=self.num_generations if whole_groups else None,
            completion_ids=completion_ids if whole_groups else None,
            ref_logp=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            num_window_tokens=n_window,
            num_micro_batches=num_micro,
            dp_size=P,
        )
        old = inputs.get("old_per_token_logps")
        if linear:
            kernel_kwargs = {k: v for k, v in loss_kwargs.items() if k != "completion_ids"}
            kernel_kwargs["compile_math"] = self.surrogate.compile_math
            loss, out = self._linear_kernel_loss(
                model, input_ids, attention_mask, completion_ids, old, inputs["advantages"], mask, kernel_kwargs
            )
        else:
            out = self.surrogate(per_token_logps, old, inputs["advantages"], mask, **loss_kwargs)
            loss = out.loss
        if self.aux_loss_enabled and aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss / (num_micro if mode == "train" else 1.0)

        # -- window signal -> optimizer (before this micro-batch's backward) ----------------------
        metrics = self._metrics[mode]
        if mode == "train":
            sig = out.signal.detach()
            wagg = torch.stack([out.metrics["w_agg"], out.metrics["w_agg_abs"]]).double() if whole_groups else None
            if pos == 0 or self._gf_window_signal is None:
                self._gf_window_signal, self._gf_window_wagg = sig, wagg
            else:
                self._gf_window_signal = self._gf_window_signal + sig
                if wagg is not None and self._gf_window_wagg is not None:
                    self._gf_window_wagg = self._gf_window_wagg + wagg
            if pos == ga - 1:
                window = self._gf_window_signal.all_reduce().with_rollout_start(first_window)
                opt = self.clip_aware_optimizer()
                if opt is not None:
                    opt.observe(window)
                    if opt.backtrack:
                        opt.set_backtrack_fn(
                            self._make_backtrack_fn(logps_and_entropies, old, inputs, mask, loss_kwargs)
                        )
                    stats = opt.last_stats
                    metrics["clip_aware/kappa"].append(float(stats["kappa"]))
                    metrics["clip_aware/alpha"].append(float(stats["alpha"]))
                    metrics["clip_aware/overshoot_fraction"].append(float(stats["overshoot_fraction"]))
                d = window.as_dict()
                metrics["grpo_fix/kappa"].append(d["kappa"])
                metrics["grpo_fix/overshoot_fraction"].append(d["overshoot_fraction"])
                metrics["grpo_fix/clip_fraction"].append(d["clip_fraction"])
                metrics["grpo_fix/max_excess"].append(d["max_excess"])
                if self._gf_window_wagg is not None:
                    wa = self._gf_window_wagg
                    if P > 1:
                        wa = self.accelerator.reduce(wa, reduction="sum")
                    metrics["grpo_fix/w_agg"].append(float(wa[0]))
                    metrics["grpo_fix/w_agg_abs"].append(float(wa[1]))
                self._gf_window_signal, self._gf_window_wagg = None, None

        # -- per-micro-batch metrics (one collective) ------------------------------------------------
        with torch.no_grad():
            m = mask.to(torch.float64)
            n_valid = m.sum()
            parts = [
                n_valid,
                out.metrics["clip_low"].double() * n_valid,
                out.metrics["clip_high"].double() * n_valid,
                out.metrics["clip_region"].double() * n_valid,
                (entropies.double() * m).sum() if entropies is not None else n_valid.new_zeros(()),
                out.metrics["kl"].double() * n_valid if "kl" in out.metrics else n_valid.new_zeros(()),
            ]
            totals = torch.stack(parts)
            if P > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            totals = totals.tolist()
        denom = max(totals[0], 1.0)
        metrics["clip_ratio/low_mean"].append(totals[1] / denom)
        metrics["clip_ratio/high_mean"].append(totals[2] / denom)
        metrics["clip_ratio/region_mean"].append(totals[3] / denom)
        if entropies is not None:
            metrics["entropy"].append(totals[4] / denom)
        if self.beta != 0.0:
            metrics["kl"].append(totals[5] / denom)
        if self.aux_loss_enabled and aux_loss is not None:
            metrics["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        return loss

    def _make_backtrack_fn(self, logps_fn, old, inputs, mask, loss_kwargs):
        """The no-grad re-measure that ClipAwareAdamW's backtrack calls after a step: the last
        micro-batch's loss with the current parameters, signal all-reduced over ranks."""
        advantages = inputs["advantages"]

        def remeasure() -> TrustRegionSignal:
            with torch.no_grad():
                logps, _, _ = logps_fn(False)
                sig = self.surrogate(logps, old, advantages, mask, **loss_kwargs).signal
            return sig.all_reduce()

        return remeasure


def _install_linear_loss_forward(model) -> None:
    """Wrap ``model.forward`` (already TRL's fused-LM-head forward) so that
    ``model(input_ids, attention_mask, grpo_fix_linear=spec)`` runs the backbone and
    :func:`grpo_fix.kernels.linear_surrogate_loss` on the completion positions' hidden states and
    ``lm_head.weight`` (gathered under ZeRO-3), never materialising the logits, and returns the
    loss; ``spec["output"]`` receives the full :class:`grpo_fix.SurrogateOutput`.  Any other call
    goes to the previous forward unchanged (generation, TRL's log-probs)."""
    import types

    from trl.trainer.utils import maybe_gather_lm_head_ctx

    if getattr(model, "_grpo_fix_linear_forward", False):
        return
    previous = model.forward

    def forward(self, *args, grpo_fix_linear=None, **kwargs):
        if grpo_fix_linear is None:
            return previous(*args, **kwargs)
        from grpo_fix.kernels import linear_surrogate_loss

        spec = grpo_fix_linear
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        T = spec["logits_to_keep"]
        hidden = hidden[:, -T - 1 : -1]  # position t predicts completion token t
        lm_head = self.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        with maybe_gather_lm_head_ctx(weight, bias):
            out = linear_surrogate_loss(
                spec["cfg"],
                hidden.to(weight.dtype),
                weight,
                spec["completion_ids"],
                spec["old_logp"],
                spec["advantages"],
                spec["mask"],
                bias=bias,
                temperature=spec["temperature"],
                **spec["loss_kwargs"],
            )
        spec["output"] = out
        return out.loss

    model.forward = types.MethodType(forward, model)
    model._grpo_fix_linear_forward = True


class _ClipAwareStatsCallback(TrainerCallback):
    """Logs the optimizer's post-step stats (backtracks) after each optimizer step (``on_step_end``
    runs after the real step, with or without DeepSpeed, and before TRL logs)."""

    def __init__(self, trainer: GRPOFixTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        opt = self.trainer._gf_optimizer
        if opt is not None and getattr(opt, "backtrack", False):
            self.trainer._metrics["train"]["clip_aware/backtracks"].append(float(opt.last_stats.get("backtracks", 0.0)))
        return control
