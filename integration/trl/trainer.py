"""``GRPOFixTrainer``: ``trl.GRPOTrainer`` with the grpo-fix loss, exact window normaliser and
ClipAwareAdamW, by a one-line swap.  Only TRL's hooks are overridden here, each short; the work is
in the sibling modules (:mod:`.schedule`, :mod:`.buffer`, :mod:`.generation`,
:mod:`.linear_forward`, :mod:`.entropy`, :mod:`.metrics`, :mod:`.optimizer`, :mod:`.checks`).

Per micro-step of training (TRL calls ``_prepare_inputs`` then ``_compute_loss``):

1. ``get_batch_samples`` records the optimizer window the Trainer is about to run (its micro-steps
   and prefetched batches); at the window's first micro-step ``_prepare_inputs`` generates every
   generation batch the window touches (group-preserving shuffle, prefix-consistent advantages),
   counts the window's valid tokens over all processes and stores the count in its micro-batches.
2. ``_compute_loss`` runs the surrogate of ``loss_type`` with that window
   (``grpo_fix.Window(tokens, micro_batches, dp_size)``), TRL's vLLM importance weights
   (``is_ratio``), entropy mask (``policy_mask``) and entropy bonus, on the logits-free path or
   on TRL's log-probs; the loss is scaled for accumulation and data parallelism.
3. On the window's last micro-step, *before* its backward (under DeepSpeed the step runs inside
   the backward), the window's trust-region signal, summed over micro-batches and processes, goes
   to ClipAwareAdamW (``observe``); metrics are logged under TRL's names plus ``grpo_fix/*`` and
   ``clip_aware/*`` (:mod:`.metrics`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.trainer.utils import split_pixel_values_by_grid, split_tensor_dict, unsplit_pixel_values_by_grid

from grpo_fix import ClipAwareAdamW, GroupSurrogateLoss, SurrogateOutput, TrustRegionSignal, Window
from grpo_fix.options import check_compile_math

from . import checks, entropy, generation, metrics
from .buffer import GenerationBuffer, load_buffer, save_buffer
from .config import GRPOFixConfig, surrogate_config_from_args
from .linear_forward import LinearLossRequest, choose_loss_path, linear_loss
from .optimizer import clip_aware_kwargs, stepping_optimizer
from .schedule import (
    WINDOW_TOKENS_KEY,
    GenerationSchedule,
    WindowPlan,
    group_permutation,
    init_window_tokens,
    permute_rows,
    set_window_tokens,
    window_token_count,
)

logger = logging.getLogger(__name__)

#: The multimodal inputs TRL's log-prob forward takes from a micro-batch.
_MODEL_INPUTS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


class GRPOFixTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with the grpo-fix loss, exact window normaliser and ClipAwareAdamW.

    Takes the same arguments as ``GRPOTrainer``; ``args`` must be a :class:`GRPOFixConfig` (a plain
    ``GRPOConfig`` raises ``TypeError``; ``None`` builds a default ``GRPOFixConfig`` as TRL does).
    ``optimizers=(opt, scheduler)`` must hold a :class:`grpo_fix.ClipAwareAdamW` (or nothing) unless
    ``optimizer="adamw"``.  The loss path (logits-free Triton or TRL's log-probs) is chosen and
    logged here, and refused here when forced where it cannot run.
    """

    args: GRPOFixConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = args[2] if len(args) > 2 else kwargs.get("args")
        if config is None:
            model = args[0] if args else kwargs.get("model")
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            config = kwargs["args"] = GRPOFixConfig(output_dir=f"{(name or 'model').split('/')[-1]}-GRPOFix")
        elif not isinstance(config, GRPOFixConfig):
            raise TypeError(
                f"GRPOFixTrainer needs args=GRPOFixConfig(...) (a trl.GRPOConfig subclass), got {type(config).__name__}"
            )
        optimizers = args[8] if len(args) > 8 else kwargs.get("optimizers", (None, None))
        checks.check_user_optimizer(config, optimizers[0], None)
        super().__init__(*args, **kwargs)
        cfg, compile_math = surrogate_config_from_args(self.args), check_compile_math(self.args.loss_compile_math)
        self.surrogate = GroupSurrogateLoss(cfg, compile_math=compile_math)
        # TRL's off-policy mask against vLLM's log-probs is a policy mask: the loss must not apply its own
        self._gf_sampler_surrogate = GroupSurrogateLoss(
            cfg.replace(off_policy_mask_threshold=None), compile_math=compile_math
        )
        policy: Any = self.model
        self._gf_path = choose_loss_path(policy, self.args, self.aux_loss_enabled, self.is_fsdp_enabled)
        logger.info("GRPOFixTrainer loss path: %s", self._gf_path.describe())
        spg = self.args.steps_per_generation
        assert spg is not None  # GRPOConfig.__post_init__ sets it
        self._gf_schedule = GenerationSchedule(spg, self.num_iterations)
        self._gf_buffer = GenerationBuffer(self._gf_schedule)
        self._gf_plan: WindowPlan | None = None
        self._gf_window = metrics.WindowAccumulator()
        self._gf_whole_groups = False
        self._gf_warned_partial_groups = False
        self._gf_optimizer: ClipAwareAdamW | None = None
        self.add_callback(_ClipAwareStatsCallback(self))

    # -- optimizer -------------------------------------------------------------------------------
    def create_optimizer(self, model: Any = None) -> Any:
        """ClipAwareAdamW with HF's decay / no-decay groups (``optimizer="clip_aware_adamw"``); also
        the optimizer DeepSpeed wraps (transformers' ``deepspeed_init`` calls this).  A ClipAwareAdamW
        given as ``optimizers=`` or ``optimizer_cls_and_kwargs`` is used as given."""
        if self.args.optimizer != "clip_aware_adamw" or self.optimizer is not None:
            return super().create_optimizer(model)
        checks.check_user_optimizer(self.args, None, self.optimizer_cls_and_kwargs)
        if self.optimizer_cls_and_kwargs is not None:
            return super().create_optimizer(model)
        self.optimizer_cls_and_kwargs = (ClipAwareAdamW, clip_aware_kwargs(self.args))
        try:
            return super().create_optimizer(model)
        finally:
            self.optimizer_cls_and_kwargs = None

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """HF's scheduler; under DeepSpeed also attach ClipAwareAdamW to the engine now: the Trainer
        builds the scheduler after the engine and before it loads a ``resume_from_checkpoint``, so
        :func:`grpo_fix.integration.deepspeed.attach_deepspeed`'s repair of ZeRO-3 universal
        loading is in place for that load."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if getattr(self, "is_deepspeed_enabled", False) and wrapped is not None:
            self.clip_aware_optimizer(engine=wrapped.engine)
        return scheduler

    def clip_aware_optimizer(self, engine: Any = None) -> ClipAwareAdamW | None:
        """The ClipAwareAdamW that actually steps (``engine.basic_optimizer`` under DeepSpeed, else
        ``self.optimizer`` unwrapped); None for ``optimizer="adamw"`` or before it exists.
        ``engine``: the DeepSpeed engine (default ``model_wrapped``)."""
        if self._gf_optimizer is None and self.args.optimizer == "clip_aware_adamw" and self.optimizer is not None:
            engine = engine if engine is not None else getattr(self, "model_wrapped", None)
            deepspeed = bool(getattr(self, "is_deepspeed_enabled", False))
            self._gf_optimizer = stepping_optimizer(self.optimizer, engine, deepspeed)
        return self._gf_optimizer

    # -- checkpoints -----------------------------------------------------------------------------
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """TRL's checkpoint plus this process's generation buffer and micro-step counter (:mod:`.buffer`)."""
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        state = self._gf_buffer.state_dict(self._step, self._gf_whole_groups)
        save_buffer(folder, self.accelerator.process_index, state)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        state = load_buffer(checkpoint, self.accelerator.process_index, self.accelerator.device)
        if state is not None:
            self._step, self._gf_whole_groups = self._gf_buffer.load_state_dict(state)

    # -- generation ------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """The Trainer prefetches one optimizer window's batches: record the window (:mod:`.schedule`)."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._gf_plan = WindowPlan(start=self._step, size=len(batches), batches=batches)
        return batches, num_items

    def _calculate_rewards(self, inputs: Any, prompts: Any, completions: Any, completion_ids_list: Any) -> Any:
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        generation.check_rewards(rewards, self.reward_func_names)
        return rewards

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)
        if self.args.prefix_consistent:
            group: Any = self.num_generations if self._training() else self.num_generations_eval
            weights = out.get("importance_sampling_ratio")
            token_is = weights is not None and weights.shape[1] > 1
            generation.prefix_consistent_inputs(self.accelerator, out, self._loss_mask(out), group, token_is)
        return out

    def _prepare_inputs(self, generation_batch: Any) -> dict[str, Any]:
        """Training: the buffered micro-batch of this micro-step; at a window's first micro-step,
        generate what the window needs and count its tokens (:mod:`.schedule`)."""
        if not self._training():
            return super()._prepare_inputs(generation_batch)
        step, schedule = self._step, self._gf_schedule
        plan = self._gf_plan = self._window_plan()
        if step == plan.start or schedule.generation(step) not in self._gf_buffer:
            self._start_window(plan, generation_batch)
        self._buffered_inputs = self._gf_buffer.generations[schedule.generation(step)]  # type: ignore[assignment]
        return self._gf_buffer.micro_batch(step)

    def _window_plan(self) -> WindowPlan:
        """The window of the current micro-step: the one the Trainer prefetched, or (micro-steps driven
        by hand) the aligned window of ``gradient_accumulation_steps``."""
        if self._gf_plan is not None and self._gf_plan.contains(self._step):
            return self._gf_plan
        return WindowPlan.aligned(self._step, self.args.gradient_accumulation_steps)

    def _start_window(self, plan: WindowPlan, default_batch: Any) -> None:
        generations = plan.generations(self._gf_schedule)
        self._gf_buffer.release_before(min(generations))
        for index, first_step in generations.items():
            if index not in self._gf_buffer:
                self._gf_buffer.put(index, self._generate_micro_batches(plan.batch(first_step, default_batch)))
        local = window_token_count(plan, self._gf_buffer.micro_batch, self._loss_mask)
        total = self.accelerator.reduce(local, reduction="sum") if self.accelerator.num_processes > 1 else local
        set_window_tokens(plan, self._gf_schedule, self._gf_buffer.micro_batch, total)

    def _generate_micro_batches(self, raw_batch: Any) -> list[dict[str, Any]]:
        """Generate and score one generation batch, shuffle it (whole groups when micro-batches can
        hold them) and split it into ``steps_per_generation`` micro-batches (TRL's ``_prepare_inputs``)."""
        batch: Any = split_pixel_values_by_grid(self._generate_and_score_completions(raw_batch))
        G: Any = self.num_generations
        n, spg = len(batch["completion_ids"]), self._gf_schedule.steps_per_generation
        self._gf_whole_groups = (
            n % G == 0 and self.args.per_device_train_batch_size % G == 0 and "pixel_values" not in batch
        )
        if not self._gf_whole_groups and not self._gf_warned_partial_groups:
            self._gf_warned_partial_groups = True
            logger.warning(
                "grpo_fix/w_agg is not logged: micro-batches hold partial groups (per_device_train_batch_size=%d "
                "is not a multiple of num_generations=%d, or the batch is multimodal); set it to a multiple of "
                "num_generations to measure Prop. 1's shared-prefix aggregate",
                self.args.per_device_train_batch_size,
                G,
            )
        batch = permute_rows(batch, group_permutation(n, G if self._gf_whole_groups else None))
        split: list[Any] = split_tensor_dict(batch, spg)
        micro_batches = [unsplit_pixel_values_by_grid(b) for b in split]
        for b in micro_batches:
            init_window_tokens(b, self._gf_schedule, b["completion_mask"].device)
        return micro_batches

    def _training(self) -> bool:
        return bool(self.model is not None and self.model.training)

    def _loss_mask(self, batch: Any) -> torch.Tensor:
        mask = batch["completion_mask"]
        return mask if batch.get("tool_mask") is None else mask * batch["tool_mask"]

    # -- loss ------------------------------------------------------------------------------------
    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        checks.check_loss_inputs(inputs)
        train = self._training()
        window, window_end = self._loss_window(inputs) if train else self._eval_window(inputs)
        mask = self._loss_mask(inputs)
        kw = self._loss_kwargs(inputs, window, train)
        logps = entropies = aux_loss = None
        if self._gf_path.linear and "pixel_values" not in inputs:
            loss, out = self._linear_loss(model, inputs, mask, kw)
        else:
            logps, entropies, aux_loss = self._logps_and_entropies(model, inputs, compute_entropy=True)
            loss, out = self._torch_loss(logps, entropies, inputs, mask, kw, train and window_end)
        mode = self._metrics["train" if train else "eval"]
        if self.aux_loss_enabled and aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss / window.micro_batches
            mode["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        if train:
            self._gf_window.add(out)
            if window_end:
                self._end_window(model, inputs, mask, kw)
        log_probs = None
        if logps is not None:
            old = logps.detach() if kw["old_logp"] is None else kw["old_logp"]
            log_probs = (logps, old, _advantages_2d(inputs["advantages"]))
        metrics.log_micro_batch(
            mode,
            self.accelerator,
            self.args.loss_type,
            self.surrogate.config,
            out,
            mask,
            log_probs=log_probs,
            entropies=entropies,
            is_ratio=kw["is_ratio"],
        )
        return loss

    def _loss_window(self, inputs: dict[str, Any]) -> tuple[Window, bool]:
        """The optimizer window of this training micro-step, and whether it is the window's last."""
        step, ga = self._step, self.args.gradient_accumulation_steps
        plan = (
            self._gf_plan
            if self._gf_plan is not None and self._gf_plan.contains(step)
            else WindowPlan.aligned(step, ga)
        )
        micro = getattr(self, "current_gradient_accumulation_steps", None) or plan.size
        P = self.accelerator.num_processes
        if WINDOW_TOKENS_KEY in inputs:
            tokens = inputs[WINDOW_TOKENS_KEY][self._gf_schedule.replay(step)]
        else:  # inputs not buffered by _prepare_inputs: TRL's estimate, the mean window of the generation batch
            tokens = inputs["num_items_in_batch"].double() * micro / self._gf_schedule.steps_per_generation
        return Window(tokens=tokens, micro_batches=micro, dp_size=P), plan.is_last(step)

    def _eval_window(self, inputs: dict[str, Any]) -> tuple[Window, bool]:
        tokens = inputs["num_items_in_batch"].double()
        return Window(tokens=tokens, micro_batches=1, dp_size=self.accelerator.num_processes), False

    def _loss_kwargs(self, inputs: dict[str, Any], window: Window, train: bool) -> dict[str, Any]:
        """The loss arguments every path shares (see :func:`grpo_fix.surrogate_loss`)."""
        whole_groups = train and self._gf_whole_groups and inputs["completion_ids"].size(0) % self.num_generations == 0
        vllm_is = self.use_vllm and self.vllm_importance_sampling_correction
        return dict(
            old_logp=inputs.get("old_per_token_logps"),
            advantages=inputs["advantages"],
            group_size=self.num_generations if whole_groups else None,
            completion_ids=inputs["completion_ids"] if whole_groups else None,
            ref_logp=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            window=window,
            is_ratio=inputs.get("importance_sampling_ratio") if vllm_is else None,
        )

    def _logps_and_entropies(self, model: Any, inputs: dict[str, Any], compute_entropy: bool) -> tuple[Any, Any, Any]:
        """TRL's log-prob (and entropy, MoE aux loss) forward on a micro-batch's prompt + completion."""
        completion_ids = inputs["completion_ids"]
        return self._get_per_token_logps_and_entropies(
            model,
            torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            completion_ids.size(1),
            compute_entropy=compute_entropy,
            compute_aux_loss=self.aux_loss_enabled and compute_entropy,
            **{key: inputs.get(key) for key in _MODEL_INPUTS},
        )

    def _torch_loss(
        self, logps: Any, entropies: Any, inputs: dict[str, Any], mask: torch.Tensor, kw: dict, window_end: bool
    ) -> tuple[torch.Tensor, SurrogateOutput]:
        """The loss on TRL's log-probs, with TRL's entropy mask, entropy bonus and (vLLM) off-policy mask."""
        policy_mask = entropy.entropy_policy_mask(self, entropies, mask)
        loss_fn = self.surrogate
        sampling = inputs.get("sampling_per_token_logps")
        if self.off_policy_mask_threshold is not None and sampling is not None:
            opsm = self.get_off_policy_mask(
                _advantages_2d(kw["advantages"]), logps, sampling, mask, self.off_policy_mask_threshold
            )
            policy_mask = opsm if policy_mask is None else policy_mask * opsm
            loss_fn = self._gf_sampler_surrogate
        bonus = entropy.bonus_enabled(self)
        coef = entropy.bonus_coefficient(self)
        call = {k: v for k, v in kw.items() if k not in ("old_logp", "advantages")}
        out = loss_fn(
            logps,
            kw["old_logp"],
            kw["advantages"],
            mask,
            policy_mask=policy_mask,
            entropy=entropies if bonus else None,
            entropy_coef=coef,
            **call,
        )
        if bonus:
            mode = "train" if self._training() else "eval"
            value = metrics.policy_loss(loss_fn.config, out, entropies, mask, policy_mask, coef, kw["window"])
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(value).nanmean().item())
            if mode == "train":
                effective = mask if policy_mask is None else mask * policy_mask
                entropy.observe_entropy(self, entropies, effective, window_end)
                if window_end:
                    self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        return out.loss, out

    def _linear_loss(
        self, model: Any, inputs: dict[str, Any], mask: torch.Tensor, kw: dict
    ) -> tuple[torch.Tensor, SurrogateOutput]:
        request = LinearLossRequest(
            loss_fn=self.surrogate,
            completion_ids=inputs["completion_ids"],
            mask=mask,
            temperature=self.temperature,
            **{k: v for k, v in kw.items() if k != "completion_ids"},
        )
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        unwrapped = self.accelerator.unwrap_model(model)
        return linear_loss(model, unwrapped, input_ids, attention_mask, request, self.accelerator.autocast())

    def _end_window(self, model: Any, inputs: dict[str, Any], mask: torch.Tensor, kw: dict) -> None:
        """Hand the window's signal to ClipAwareAdamW (before the last backward) and log the window."""
        rollout_start = self._window_plan().rollout_start(self._gf_schedule)
        signal = self._gf_window.signals.take(all_reduce=True, rollout_start=rollout_start)
        assert signal is not None
        w_agg = self._gf_window.take_w_agg()
        if w_agg is not None and self.accelerator.num_processes > 1:
            w_agg = self.accelerator.reduce(w_agg, reduction="sum")
        opt = self.clip_aware_optimizer()
        if opt is not None:
            opt.observe(signal)
            if opt.backtrack:
                opt.set_backtrack_fn(self._backtrack_fn(model, inputs, mask, kw))
        stats = None if opt is None else opt.last_stats
        lr = float(opt.param_groups[0]["lr"]) if opt is not None and opt.param_groups else 0.0
        metrics.log_window(self._metrics["train"], signal, w_agg, stats, lr)

    def _backtrack_fn(self, model: Any, inputs: dict[str, Any], mask: torch.Tensor, kw: dict) -> Any:
        """The no-grad re-measure ClipAwareAdamW's backtrack calls after a step: the last
        micro-batch's signal with the current parameters, all-reduced over processes."""
        call = {k: v for k, v in kw.items() if k not in ("old_logp", "advantages")}

        def remeasure() -> TrustRegionSignal:
            with torch.no_grad():
                logps, _, _ = self._logps_and_entropies(model, inputs, compute_entropy=False)
                out = self.surrogate(logps, kw["old_logp"], kw["advantages"], mask, **call)
            return out.signal.all_reduce()

        return remeasure


def _advantages_2d(advantages: torch.Tensor) -> torch.Tensor:
    """TRL's advantages as ``(B, 1)`` (sequence) or ``(B, T)`` (per token)."""
    return advantages.unsqueeze(1) if advantages.dim() == 1 else advantages


class _ClipAwareStatsCallback(TrainerCallback):
    """Logs the optimizer's post-step stats (backtracks) after each optimizer step (``on_step_end``
    runs after the real step, with or without DeepSpeed, and before TRL logs)."""

    def __init__(self, trainer: GRPOFixTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        opt = self.trainer._gf_optimizer
        if opt is not None and opt.backtrack:
            self.trainer._metrics["train"]["clip_aware/backtracks"].append(float(opt.last_stats.get("backtracks", 0.0)))
        return control


__all__ = ["GRPOFixTrainer"]
