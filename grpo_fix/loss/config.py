"""Configuration of the unified surrogate (paper Eq. 1) and the named presets (paper Table 1, TRL 1.16).

A GRPO-family method is a triple (weighting alpha, importance ratio s, regulariser R) of

    J = sum_i sum_t alpha_{i,t} * min(s_{i,t} A_i, clip(s_{i,t}, 1 - eps_low, 1 + eps_high) A_i) - beta * R   (Eq. 1)

and every preset below is one :class:`SurrogateConfig` of the single implementation in
:mod:`grpo_fix.loss.surrogate`; there is no per-method code path.

Weightings (the normaliser alpha; any per-group std factor lives in the advantages, see
:func:`grpo_fix.group_advantages`).  ``N_window`` is the number of valid completion tokens in the
whole optimizer window (all gradient-accumulation micro-batches on all data-parallel ranks):

========== =============================================== ==========================================
name       alpha_{i,t}                                     constant within a group? (Prop. 1)
========== =============================================== ==========================================
uniform    1 / N_window, token ratios required (ours)      yes
dapo       1 / N_window                                    yes
seq_mean   1 / (N_seqs_window * |o_i|)  (GRPO, GSPO, v3.2) no: length-dependent prefix bias
bnpo       1 / (N_tokens_micro_batch * num_micro_batches)  yes, but depends on micro-batching
dr_grpo    1 / (B_micro * L_max * num_micro_batches)       yes
seq_sum    1 / N_seqs_window  (LUSPO: a sequence's sum)    yes (a long completion weighs more)
========== =============================================== ==========================================

Ratios (how s is formed): ``token`` (exp(logp - old)), ``sequence`` (GSPO: exp(mean_t(logp - old)),
the 1/|o| exponent), ``sequence_unnormalized`` (GCPO: exp(sum_t(logp - old))); and the
log-prob forms with a detached weight: ``sg_logp`` (CISPO: sg(clamp(s)) * logp), ``vespo`` (VESPO:
sg(phi(w)) * logp with the Gamma weight phi(w) = e^lambda w^k e^(-lambda w) of the sequence ratio
w, k and lambda by the advantage's sign), ``logp`` (GPG: plain policy gradient).

Gates (how s becomes the policy term, for ``token`` / ``sequence`` ratios): ``clip`` (PPO's
min/clip of Eq. 1, optionally the two-sided ``delta``) or ``soft`` (SAPO: sigmoid(tau (s - 1)) *
4 / tau * A, tau by the advantage's sign; no hard clip).

Regularisers: ``beta`` times a KL estimate (``kl_estimator``, optionally times the ratio); an
entropy bonus ``- entropy_coef * mean H`` whose coefficient is a call argument (TRL adapts it per
step), averaged over the window (``entropy_weighting="window"``, exact under accumulation) or
over each micro-batch and divided by the accumulation steps (``"micro_batch"``, TRL 1.16).

Decisions recorded here (the paper's Table 1 leaves them open):

- ``beta`` is a hyper-parameter, 0 by default in every preset (TRL's default); rows whose R is a KL
  set the estimator, so ``beta > 0`` (with ``ref_logp``) switches it on.
- TRL 1.16's ``dapo`` divides by ``num_items_in_batch / P * GA / spg``, which equals N_window only
  when ``steps_per_generation == gradient_accumulation_steps``; pass that value as
  ``num_window_tokens`` to reproduce TRL, or the exact count to get the corrected loss.
- GCPO's alpha = 1/(sigma G) is per *sequence*; in the per-token sum of Eq. 1 that is ``seq_mean``.
- CISPO's IS weight is ``sg(clamp(s, 1 - eps_low, 1 + eps_high))``; TRL caps at the raw
  ``epsilon_high`` (5.0 recommended), i.e. our ``eps_high = epsilon_high - 1``; ``eps_low = 1``
  disables the lower bound.
- TRL's vLLM importance-sampling correction and entropy mask are call arguments (``is_ratio``,
  ``policy_mask``) that multiply the policy term (VESPO puts the IS ratio inside w, as TRL does).
- GTPO is not shipped: its conflict-token weights and entropy filter are not pinned down by
  2601.05002, and GPG's batch correction alpha_hat (a per-batch scalar) is left out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, get_args

Weighting = Literal["uniform", "dapo", "seq_mean", "bnpo", "dr_grpo", "seq_sum"]
RatioKind = Literal["token", "sequence", "sequence_unnormalized", "sg_logp", "vespo", "logp"]
Gate = Literal["clip", "soft"]
KLEstimator = Literal["k1", "k2", "k3"]
EntropyWeighting = Literal["window", "micro_batch"]

#: Ratios whose policy term is a function of s (``gate``); the others weight ``log pi``.
RATIO_GATED = ("token", "sequence", "sequence_unnormalized")
#: Kept for 0.1 callers: the ratios PPO's clip applies to (with ``gate="clip"``).
CLIPPED_RATIOS = RATIO_GATED
GROUP_CONSTANT_WEIGHTINGS = ("uniform", "dapo", "bnpo", "dr_grpo", "seq_sum")


@dataclass(frozen=True)
class SurrogateConfig:
    """One point of the (weighting, ratio, regulariser) design space of Eq. 1.

    Args:
        weighting: the normaliser alpha (table in the module docstring).
        ratio: the importance ratio s (module docstring).
        gate: ``"clip"`` (PPO) or ``"soft"`` (SAPO) for ``token`` / ``sequence`` ratios.
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]``; ``eps_high=None`` means
            ``eps_low``.  For ``sg_logp`` it bounds the stop-gradient IS weight instead.  Every
            ratio measures the trust-region signal against it.
        delta: optional upper bound on the unclipped branch (two-sided clipping, INTELLECT-2 /
            TRL's ``delta``); must exceed ``1 + eps_high``.
        sapo_temperature_pos, sapo_temperature_neg: SAPO's tau for ``A > 0`` / ``A <= 0`` (1.0 / 1.05).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's Gamma-weight shape for
            ``A >= 0`` / ``A < 0`` (2, 3, 3, 2, TRL's defaults).
        beta: KL coefficient; needs ``ref_logp`` when non-zero.
        kl_estimator: ``k1`` = log(pi/ref), ``k2`` = (log(pi/ref))^2 / 2, ``k3`` =
            ref/pi - log(ref/pi) - 1 (Table 1's D_KL).
        kl_times_ratio: multiply the KL by the (differentiable) importance ratio (DeepSeek-V3.2,
            Table 1's ``I * D_KL``; TRL's ``use_bias_correction_kl``).
        prefix_consistent: clip tokens sharing a prefix inside a group as one token (ours; see
            :func:`grpo_fix.prefix_consistent_advantages`).  Needs token ratios and a
            group-constant weighting.
        max_completion_length: ``L_max`` of ``dr_grpo`` (default: the call's T).
        adv_threshold: CPPO's gamma: completions with ``|A_i| <= gamma`` are dropped.
        off_policy_mask_threshold: DeepSeek-V3.2's M_{i,t}: a completion with ``A_i < 0`` whose
            mean ``old_logp - logp`` exceeds the threshold is dropped.
        entropy_weighting: how the entropy bonus is averaged (``"window"`` or ``"micro_batch"``).
    """

    weighting: Weighting = "uniform"
    ratio: RatioKind = "token"
    gate: Gate = "clip"
    eps_low: float = 0.2
    eps_high: float | None = None
    delta: float | None = None
    beta: float = 0.0
    kl_estimator: KLEstimator = "k3"
    kl_times_ratio: bool = False
    prefix_consistent: bool = False
    max_completion_length: int | None = None
    adv_threshold: float | None = None
    off_policy_mask_threshold: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    entropy_weighting: EntropyWeighting = "window"

    def __post_init__(self) -> None:
        _check_choice("weighting", self.weighting, Weighting)
        _check_choice("ratio", self.ratio, RatioKind)
        _check_choice("kl_estimator", self.kl_estimator, KLEstimator)
        _check_choice("gate", self.gate, Gate)
        _check_choice("entropy_weighting", self.entropy_weighting, EntropyWeighting)
        if self.gate == "soft":
            if self.ratio not in RATIO_GATED:
                raise ValueError(f"gate='soft' (SAPO) needs a token or sequence ratio, not ratio={self.ratio!r}")
            if self.delta is not None:
                raise ValueError("gate='soft' (SAPO) has no hard clip: delta must be None")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            value = getattr(self, name)
            if not (value == value and abs(value) != float("inf")):
                raise ValueError(f"{name} must be finite, got {value}")
        eps_high = self.eps_low if self.eps_high is None else self.eps_high
        object.__setattr__(self, "eps_high", eps_high)
        if not 0.0 <= self.eps_low <= 1.0:
            raise ValueError(f"eps_low must be in [0, 1] (the lower clip bound is 1 - eps_low), got {self.eps_low}")
        lower_eps_high = -1.0 if self.ratio == "sg_logp" else 0.0
        if not eps_high > lower_eps_high or eps_high != eps_high:
            raise ValueError(f"eps_high must be > {lower_eps_high} for ratio={self.ratio!r}, got {eps_high}")
        if self.delta is not None:
            if self.ratio not in RATIO_GATED:
                raise ValueError(f"delta (two-sided clipping) needs a clipped ratio, not ratio={self.ratio!r}")
            if not self.delta > 1.0 + eps_high:
                raise ValueError(f"delta must exceed 1 + eps_high = {1 + eps_high}, got {self.delta}")
        if not self.beta >= 0.0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.weighting == "uniform" and self.ratio not in ("token", "sg_logp", "logp"):
            raise ValueError(
                f"weighting='uniform' needs token-level ratios: ratio={self.ratio!r} differs across the completions "
                "that share a prefix and breaks the cancellation of Prop. 1. Use weighting='dapo' for a "
                "token-mean with sequence ratios, or ratio='token'."
            )
        if self.prefix_consistent:
            if self.ratio != "token":
                raise ValueError(f"prefix_consistent clipping needs ratio='token', got {self.ratio!r}")
            if self.weighting not in GROUP_CONSTANT_WEIGHTINGS:
                raise ValueError(
                    f"prefix_consistent clipping needs a weighting that is constant within a group "
                    f"{GROUP_CONSTANT_WEIGHTINGS}, got {self.weighting!r}"
                )
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.adv_threshold is not None and not self.adv_threshold >= 0:
            raise ValueError(f"adv_threshold (CPPO gamma) must be >= 0, got {self.adv_threshold}")

    @property
    def clips(self) -> bool:
        """Whether the PPO min/clip wrapper of Eq. 1 is active (a gated ratio with ``gate="clip"``)."""
        return self.ratio in RATIO_GATED and self.gate == "clip"

    @property
    def clip_bounds(self) -> tuple[float, float]:
        """The clip region ``(1 - eps_low, 1 + eps_high)`` of Eq. 1 (``eps_high`` None means ``eps_low``)."""
        eps_high = self.eps_low if self.eps_high is None else self.eps_high
        return 1.0 - self.eps_low, 1.0 + eps_high

    def replace(self, **changes: Any) -> SurrogateConfig:
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_choice(name: str, value: str, literal: object) -> None:
    choices = get_args(literal)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")


#: The paper's Table 1 rows that are well defined, TRL 1.16's loss types, and ``uniform``.
PRESETS: dict[str, SurrogateConfig] = {
    # ours: the corrected loss
    "uniform": SurrogateConfig("uniform", "token", prefix_consistent=True, kl_times_ratio=True),
    # paper Table 1
    "grpo_r1": SurrogateConfig("seq_mean", "token", kl_estimator="k3"),
    "grpo_v32": SurrogateConfig("seq_mean", "token", kl_estimator="k3", kl_times_ratio=True),
    "gspo": SurrogateConfig("seq_mean", "sequence", eps_low=3e-4, eps_high=4e-4),
    "cppo": SurrogateConfig("seq_mean", "token", kl_estimator="k3", adv_threshold=0.0),
    "gpg": SurrogateConfig("dapo", "logp"),
    "gcpo": SurrogateConfig("seq_mean", "sequence_unnormalized"),
    # names shared by Table 1 and TRL 1.16: the rows' structure with TRL 1.16's KL default
    # (k3 times the ratio when beta > 0); DAPO's clip-higher 0.28 and CISPO's cap 5.0 as recommended
    "dapo": SurrogateConfig("dapo", "token", eps_high=0.28, kl_times_ratio=True),
    "dr_grpo": SurrogateConfig("dr_grpo", "token", kl_times_ratio=True),
    "cispo": SurrogateConfig("dapo", "sg_logp", eps_low=1.0, eps_high=4.0, kl_times_ratio=True),
    # TRL 1.16 loss types (TRL's defaults: eps 0.2, k3 KL with the ratio correction when beta > 0)
    "grpo": SurrogateConfig("seq_mean", "token", kl_times_ratio=True),
    "bnpo": SurrogateConfig("bnpo", "token", kl_times_ratio=True),
    "sapo": SurrogateConfig("seq_mean", "token", gate="soft", kl_times_ratio=True),
    "vespo": SurrogateConfig("dapo", "vespo", kl_times_ratio=True),
    "luspo": SurrogateConfig("seq_sum", "token", kl_times_ratio=True),
}


def resolve_config(preset: str | SurrogateConfig | None = None, **overrides: Any) -> SurrogateConfig:
    """A preset by name (or a config), with field overrides; unknown names raise ``ValueError``."""
    if isinstance(preset, SurrogateConfig):
        base = preset
    elif preset is None:
        base = PRESETS["uniform"]
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if "eps_low" in overrides and "eps_high" not in overrides and base.eps_high == base.eps_low:
        overrides["eps_high"] = None  # keep a symmetric preset symmetric
    return replace(base, **overrides) if overrides else base
