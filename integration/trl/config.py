"""``GRPOFixConfig``: ``trl.GRPOConfig`` plus the grpo-fix switches, and the surrogate it selects.

Every combination the adapter cannot honour is refused here, when the config is built, with a
``ValueError`` naming the fix (:mod:`.checks`); choices that need the model (the loss path, a
user optimizer) are checked when ``GRPOFixTrainer`` is built.  :func:`surrogate_config_from_args`
maps TRL's loss settings onto one :class:`grpo_fix.SurrogateConfig` of the unified surrogate.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig

from grpo_fix import PRESETS, SurrogateConfig
from grpo_fix.loss.config import GROUP_CONSTANT_WEIGHTINGS
from grpo_fix.options import BACKENDS, COMPILE_CHOICES, check_backend, check_compile_math, deprecated

from . import checks

#: ``loss_type`` values accepted by :class:`GRPOFixConfig`, mapped to :data:`grpo_fix.PRESETS`:
#: ``uniform`` (the corrected loss) and every TRL 1.16 loss type.
LOSS_TYPES: dict[str, str] = {
    name: name for name in ("uniform", "dapo", "grpo", "bnpo", "dr_grpo", "cispo", "sapo", "vespo", "luspo")
}
#: ``GRPOFixConfig.optimizer``: grpo-fix's ClipAwareAdamW, or TRL's own optimizer (``args.optim``).
OPTIMIZERS = ("clip_aware_adamw", "adamw")
#: ``GRPOFixConfig.loss_backend`` ('triton' is the logits-free Triton path).
LOSS_BACKENDS = BACKENDS
#: Values of the deprecated ``loss_kernel``, mapped to ``loss_backend``.
LOSS_KERNELS = {"auto": "auto", "linear": "triton", "torch": "torch"}
#: ``GRPOFixConfig.loss_compile_math``: the ``compile_math`` of the grpo_fix loss entry points.
LOSS_COMPILE_MATH = COMPILE_CHOICES
#: Loss types whose TRL normaliser weighs a completion by 1/|o_i| (Prop. 1's prefix bias).
LENGTH_NORMALISED = ("grpo", "sapo")


@dataclass
class GRPOFixConfig(GRPOConfig):
    """``trl.GRPOConfig`` plus the grpo-fix switches.

    Args (beyond ``GRPOConfig``'s):
        loss_type: ``"uniform"`` (default: the corrected loss, 1/N_window per token, token ratios)
            or any TRL 1.16 loss type (``"dapo"``, ``"grpo"``, ``"bnpo"``, ``"dr_grpo"``,
            ``"cispo"``, ``"sapo"``, ``"vespo"``, ``"luspo"``), each the preset of the same name with
            TRL's hyper-parameters: the same loss as TRL's, except that ``dapo``, ``cispo`` and
            ``vespo`` divide by the exact window token count (TRL: its mean over the generation batch).
        prefix_consistent: prefix-consistent clipping (class-mean advantages, and class-mean vLLM
            importance weights, over shared prefixes, computed at generation time over whole groups).
            ``None`` (default): on wherever it is defined (token ratios with a group-constant
            weighting: ``uniform``, ``dapo``, ``bnpo``, ``dr_grpo``, ``luspo``); ``True`` elsewhere
            raises.
        optimizer: ``"clip_aware_adamw"`` (default; replaces TRL's AdamW, so ``optim`` must be an
            AdamW) or ``"adamw"`` (TRL's optimizer ``optim``, untouched).
        clip_aware_gate, clip_aware_controller, clip_aware_tau, clip_aware_alpha_init,
            clip_aware_backtrack: the :class:`grpo_fix.ClipAwareAdamW` mechanisms (``gate``,
            ``controller``, ``tau``, ``alpha_init``, ``backtrack``; same defaults).  The warm start
            ``clip_aware_alpha_init=0.1`` is opt-in: the fair optimizer protocol measured it costing
            reward at a well-tuned lr (README, Results).  ``None``, which chose 0.1 when rollouts
            are replayed, is deprecated: it resolves to that value with a ``DeprecationWarning``.
        loss_backend: ``"auto"`` (default: the logits-free Triton loss where it is known to work, a
            CUDA model without the features listed in :mod:`.linear_forward`; else the torch path),
            ``"torch"`` (TRL's log-probs + the grpo_fix loss) or ``"triton"`` (the logits-free Triton
            loss, refused at construction where it cannot run).
        loss_kernel: deprecated spelling of ``loss_backend`` (``"linear"`` is ``"triton"``).
        loss_compile_math: ``"auto"`` (default: the loss's per-token math under ``torch.compile``
            on CUDA), ``"always"`` or ``"never"`` (see :mod:`grpo_fix.loss.compiled`).
        entropy_weighting: how the entropy bonus averages (``entropy_coef`` / adaptive entropy):
            ``"auto"`` (default: ``"window"`` for ``uniform``, TRL's ``"micro_batch"`` otherwise),
            ``"window"`` (over the optimizer window's tokens, exact under accumulation) or
            ``"micro_batch"`` (TRL 1.16: each micro-batch's mean over its masked tokens / GA).
    """

    loss_type: str = field(
        default="uniform",
        metadata={"help": f"One of {tuple(LOSS_TYPES)}; 'uniform' is the corrected loss."},
    )
    prefix_consistent: bool | None = field(
        default=None,
        metadata={"help": "Prefix-consistent clipping; None: on wherever defined (token ratios, uniform/dapo/...)."},
    )
    optimizer: str = field(default="clip_aware_adamw", metadata={"help": f"One of {OPTIMIZERS}."})
    clip_aware_gate: bool = field(default=True, metadata={"help": "Scale carried momentum by kappa."})
    clip_aware_controller: bool = field(default=True, metadata={"help": "Trust-region step multiplier alpha."})
    clip_aware_tau: float = field(default=0.05, metadata={"help": "Overshoot-fraction threshold."})
    clip_aware_alpha_init: float | None = field(
        default=1.0,
        metadata={
            "help": "The controller's alpha before the first window (0.1: the opt-in warm start). None is deprecated "
            "(it chose 0.1 when rollouts are replayed, else 1.0)."
        },
    )
    clip_aware_backtrack: bool = field(
        default=False, metadata={"help": "Backtrack steps past the trust region (one extra no-grad forward)."}
    )
    loss_backend: str = field(
        default="auto",
        metadata={
            "help": f"One of {LOSS_BACKENDS}: 'triton' = grpo_fix's logits-free Triton loss (hidden + lm_head in, "
            "loss out), 'torch' = TRL's log-probs + the grpo_fix loss, 'auto' = triton where known to work."
        },
    )
    loss_kernel: str | None = field(
        default=None, metadata={"help": "Deprecated: use loss_backend ('linear' is now 'triton')."}
    )
    loss_compile_math: str = field(
        default="auto",
        metadata={"help": f"One of {LOSS_COMPILE_MATH}: the loss's per-token math under torch.compile."},
    )
    entropy_weighting: str = field(
        default="auto",
        metadata={"help": "Entropy bonus average: 'auto', 'window' (exact under accumulation) or 'micro_batch'."},
    )

    def __post_init__(self) -> None:
        self._resolve_vocabulary()
        checks.check_loss_options(self)
        self.prefix_consistent = _resolve_prefix_consistent(self)
        super().__post_init__()  # derives steps_per_generation, which the deprecated alpha_init=None reads
        checks.check_schedule(self)
        self._resolve_alpha_init()
        checks.check_optimizer_options(self)
        try:  # the loss the trainer will build: refuse bad loss settings now, not at the first step
            surrogate_config_from_args(self)
        except ValueError as e:
            raise ValueError(
                f"invalid loss settings for loss_type={self.loss_type!r}: {e} (TRL's epsilon / epsilon_high are the "
                "loss's eps_low / eps_high; cispo's cap is epsilon_high)"
            ) from None
        checks.check_distributed_options(self)
        if self.loss_type in LENGTH_NORMALISED:
            warnings.warn(
                f"loss_type={self.loss_type!r} keeps TRL's per-completion weighting 1/|o_i|: tokens of a prefix "
                "shared by completions of different lengths get different weights, which biases the update "
                "towards the short completions' prefixes (Prop. 1 of arXiv 2601.05002). loss_type='uniform' is "
                "the corrected loss (every token of the optimizer window weighs 1/N_window).",
                UserWarning,
                stacklevel=3,
            )

    def _resolve_alpha_init(self) -> None:
        """``clip_aware_alpha_init=None`` (deprecated): the former automatic warm start, 0.1 when a
        rollout batch is optimised by more than one window, else 1.0, with a ``DeprecationWarning``."""
        if self.clip_aware_alpha_init is not None:
            return
        replays = self.num_iterations > 1 or (self.steps_per_generation or 0) > self.gradient_accumulation_steps
        value = 0.1 if replays else 1.0
        deprecated(
            "GRPOFixConfig(clip_aware_alpha_init=None)",
            f"clip_aware_alpha_init={value} (what None chooses for this configuration; 1.0 is the default, 0.1 the "
            "warm start)",
        )
        self.clip_aware_alpha_init = value

    def _resolve_vocabulary(self) -> None:
        if self.loss_kernel is not None:
            if self.loss_kernel not in LOSS_KERNELS:
                raise ValueError(
                    f"unknown loss_kernel {self.loss_kernel!r}; it is deprecated: use loss_backend, one of "
                    f"{LOSS_BACKENDS}"
                )
            backend = LOSS_KERNELS[self.loss_kernel]
            deprecated(f"GRPOFixConfig(loss_kernel={self.loss_kernel!r})", f"loss_backend={backend!r}")
            if self.loss_backend not in ("auto", backend):
                raise ValueError(
                    f"loss_kernel={self.loss_kernel!r} (deprecated) contradicts loss_backend={self.loss_backend!r}; "
                    "set loss_backend only"
                )
            self.loss_backend, self.loss_kernel = backend, None
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"unknown loss_type {self.loss_type!r} for GRPOFixConfig; choose one of {tuple(LOSS_TYPES)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        check_backend(self.loss_backend, "loss_backend")
        check_compile_math(self.loss_compile_math, "loss_compile_math")
        if self.entropy_weighting not in ("auto", "window", "micro_batch"):
            raise ValueError(
                f"entropy_weighting must be one of ('auto', 'window', 'micro_batch'), got {self.entropy_weighting!r}"
            )


def _resolve_prefix_consistent(args: GRPOFixConfig) -> bool:
    """``args.prefix_consistent`` with ``None`` resolved; ``True`` where it is undefined raises."""
    preset = PRESETS[LOSS_TYPES[args.loss_type]]
    defined = (
        preset.weighting in GROUP_CONSTANT_WEIGHTINGS
        and preset.ratio == "token"
        and args.importance_sampling_level == "token"
    )
    if args.prefix_consistent is None:
        return defined
    if args.prefix_consistent and not defined:
        raise ValueError(
            f"prefix_consistent=True is only defined for token ratios with a group-constant weighting (loss_type "
            f"uniform, dapo, bnpo, dr_grpo or luspo with importance_sampling_level='token'), not loss_type="
            f"{args.loss_type!r} with importance_sampling_level={args.importance_sampling_level!r}; set "
            "prefix_consistent=False (or leave it None)"
        )
    return bool(args.prefix_consistent)


def surrogate_config_from_args(args: GRPOConfig) -> SurrogateConfig:
    """The :class:`grpo_fix.SurrogateConfig` equivalent to a (GRPOFix)Config's loss settings.

    TRL's ``epsilon`` / ``epsilon_high`` / ``delta`` / ``beta`` / ``use_bias_correction_kl`` /
    ``off_policy_mask_threshold`` / ``max_completion_length`` / ``sapo_temperature_*`` /
    ``vespo_*`` become the preset's fields; ``importance_sampling_level="sequence"`` makes a
    clipped or soft-gated ratio the sequence ratio (GSPO); CISPO's raw cap ``epsilon_high`` is our
    ``1 + eps_high`` with no lower bound.  Prefix-consistent advantages are computed at generation
    time by the trainer, so the returned config has ``prefix_consistent=False``.
    """
    preset = PRESETS[LOSS_TYPES[args.loss_type]]
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    kw: dict[str, Any] = dict(
        beta=args.beta,
        kl_estimator="k3",
        kl_times_ratio=bool(args.use_bias_correction_kl),
        prefix_consistent=False,
        off_policy_mask_threshold=args.off_policy_mask_threshold,
        max_completion_length=args.max_completion_length,
        sapo_temperature_pos=args.sapo_temperature_pos,
        sapo_temperature_neg=args.sapo_temperature_neg,
        vespo_k_pos=args.vespo_k_pos,
        vespo_lambda_pos=args.vespo_lambda_pos,
        vespo_k_neg=args.vespo_k_neg,
        vespo_lambda_neg=args.vespo_lambda_neg,
        entropy_weighting=entropy_weighting(args),
    )
    if preset.ratio == "sg_logp":  # CISPO: TRL caps the IS weight at the raw epsilon_high, no lower bound
        kw.update(eps_low=1.0, eps_high=eps_high - 1.0)
    else:
        kw.update(eps_low=args.epsilon, eps_high=eps_high)
        if preset.gate == "clip" and preset.ratio == "token":
            kw["delta"] = args.delta
        if args.importance_sampling_level == "sequence" and preset.ratio == "token":
            kw["ratio"] = "sequence"
    return preset.replace(**kw)


def entropy_weighting(args: GRPOConfig) -> str:
    """``args.entropy_weighting`` with ``"auto"`` resolved (``"window"`` for ``uniform``)."""
    choice = getattr(args, "entropy_weighting", "auto")
    if choice != "auto":
        return choice
    return "window" if args.loss_type == "uniform" else "micro_batch"
