"""A minimal, fully instrumented GRPO loop over the tasks of :mod:`.tasks`.

Protocol (``benchmarks/README.md``): each rollout samples ``group_size`` completions for each of
``prompts_per_rollout`` prompts from the current policy (temperature 1, seeded per (seed, rollout)),
scores them, computes group advantages, and then takes ``inner_steps`` (the paper's mu) optimizer
steps on that fixed batch.  Each step's optimizer window is the whole rollout batch (exact token
normaliser, :class:`grpo_fix.Window`), split into ``micro_batches`` chunks of whole groups whose
gradients accumulate and whose signals a :class:`grpo_fix.SignalAccumulator` sums, as a trainer
does.  What is recorded:

- **per inner step**, before step k > 0 is taken (step 1 is on-policy), on the whole batch: the
  overshoot fraction (tokens beyond the clip region in their advantage's direction, paper Eq. 28's
  R_clip, over tokens with A != 0) and the max ``|log s|`` excess past the boundary;
- **at batch end**, after the last inner step, a read-only re-score of the whole batch (no
  gradient, no optimizer call): the same two quantities plus the share of valid tokens whose
  ratio is outside ``[1 - eps, 1 + eps]``; this is the policy the next rollout samples from, the
  one furthest from the sampler;
- per rollout: mean reward; the share of the (uniformly weighted) advantage mass that sits on
  prefixes shared by the whole group (raw group advantages, before any prefix-consistent
  averaging); the preset's net ``|W_agg|`` relative to its total advantage-gradient mass at the
  on-policy step (Prop. 1); for 0/1 rewards, the mean completion length (tokens incl. ``<eos>``)
  of correct and of incorrect completions;
- the step multiplier each step used (ClipAwareAdamW's alpha; 1 for AdamW);
- after the run, the held-out greedy accuracy when the task has held-out prompts.

It is deliberately not TRL: the experiments need per-step control of the optimizer and run
hundreds of short runs on a few CPU cores.  ``grpo-fix demo`` uses TRL's GRPOTrainer.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from grpo_fix import (
    GroupSurrogateLoss,
    SignalAccumulator,
    TrustRegionSignal,
    Window,
    adam_eps_report,
    group_advantages,
    prefix_classes,
)

from .baselines import make_optimizer, on_rollout_start, step_multiplier
from .tasks import Completions, Task, get_task


@dataclass
class RunConfig:
    """One experiment run (every field is recorded in the results JSON)."""

    task: str = "toy"
    task_options: dict[str, Any] = field(default_factory=dict)
    preset: str = "uniform"
    optimizer: str = "adamw"
    inner_steps: int = 4
    rollouts: int = 25
    group_size: int = 8
    prompts_per_rollout: int = 8
    micro_batches: int = 1
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    beta: float = 0.0
    reward_scale: float = 1.0
    adv_scale: Literal["group", "batch", "none"] = "group"
    eps_clip: float = 0.2
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompts_per_rollout % self.micro_batches:
            raise ValueError(
                f"micro_batches={self.micro_batches} must divide prompts_per_rollout={self.prompts_per_rollout} "
                "(each micro-batch holds whole groups)"
            )


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


@dataclass
class RunResult:
    """What one run measured (module docstring); :meth:`summary` condenses it per run."""

    config: dict[str, Any]
    rewards: list[float] = field(default_factory=list)
    rollouts: list[dict[str, float]] = field(default_factory=list)
    steps: list[dict[str, float]] = field(default_factory=list)
    eval_accuracy: float | None = None
    seconds: float = 0.0
    final_params: torch.Tensor | None = None
    adam_eps: dict[str, Any] | None = None

    def summary(self, tail: int = 3) -> dict[str, float]:
        """Per-run numbers: rewards (``reward_mean`` over the run, ``reward_final`` over the last
        ``tail`` rollouts), ``eval_accuracy`` (NaN without held-out prompts), per-inner-step and
        batch-end overshoot / max excess, ``outside_end``, ``alpha_mean``, the prefix shares and,
        for 0/1 rewards, the mean lengths of correct and incorrect completions over the last third."""
        later = [s for s in self.steps if s["inner"] > 0]
        last = self.rollouts[-max(1, len(self.rollouts) // 3) :]
        excess = [s["max_excess"] for s in later] + [r["end_max_excess"] for r in self.rollouts]
        return {
            "reward_start": self.rewards[0] if self.rewards else float("nan"),
            "reward_mean": _mean(self.rewards),
            "reward_final": _mean(self.rewards[-tail:]),
            "eval_accuracy": float("nan") if self.eval_accuracy is None else self.eval_accuracy,
            "overshoot_step": _mean([s["overshoot_fraction"] for s in later]) if later else 0.0,
            "overshoot_end": _mean([r["end_overshoot"] for r in self.rollouts]),
            "max_excess_step": _mean([s["max_excess"] for s in later]) if later else 0.0,
            "max_excess_end": _mean([r["end_max_excess"] for r in self.rollouts]),
            "max_excess_run": max(excess, default=0.0),
            "outside_end": _mean([r["end_outside"] for r in self.rollouts]),
            "alpha_mean": _mean([s["alpha"] for s in self.steps]),
            "kappa": _mean([s["kappa"] for s in later]) if later else 1.0,
            "prefix_share": _mean([r["prefix_share"] for r in self.rollouts]),
            "w_agg_rel": _mean([r["w_agg_rel"] for r in self.rollouts]),
            "len_correct": _mean([r["len_correct"] for r in last if r["len_correct"] == r["len_correct"]]),
            "len_incorrect": _mean([r["len_incorrect"] for r in last if r["len_incorrect"] == r["len_incorrect"]]),
            "seconds": self.seconds,
        }


def completion_logprobs(model: Any, input_ids: torch.Tensor, attention: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Log-probs of the completion tokens, (B, L), fp32 or the model's float dtype if wider."""
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, prompt_len - 1 : -1]
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    return logp.gather(-1, input_ids[:, prompt_len:, None]).squeeze(-1)


def whole_group_prefix_share(batch: Completions, adv: torch.Tensor, group_size: int) -> tuple[float, float]:
    """``(mass share, token share)``: of the advantage mass ``sum |A_i|`` over valid tokens (uniform
    token weight), the part on tokens whose prefix (up to and including the token) the whole group
    shares; and the share of valid tokens that are such tokens."""
    classes = prefix_classes(batch.completion, group_size, batch.mask)
    whole = batch.mask & (classes.size == group_size)
    mass = adv.abs().double()[:, None] * batch.mask
    total = float(mass.sum())
    return (float((mass * whole).sum()) / total if total > 0 else 0.0), float(whole.sum()) / float(batch.mask.sum())


def lengths_by_correctness(batch: Completions, rewards: torch.Tensor) -> dict[str, float]:
    """Mean length (valid tokens incl. ``<eos>``) of correct (reward 1) and incorrect completions."""
    lengths = batch.mask.sum(1).double()
    right = rewards > 0.5
    pick = lambda sel: float(lengths[sel].mean()) if bool(sel.any()) else float("nan")  # noqa: E731
    return {"len_correct": pick(right), "len_incorrect": pick(~right), "n_correct": float(right.sum())}


class _Batch:
    """One rollout batch and the loss evaluated on it, micro-batch by micro-batch."""

    def __init__(self, cfg: RunConfig, loss_fn: GroupSurrogateLoss, batch: Completions, adv: torch.Tensor) -> None:
        self.cfg, self.loss_fn, self.batch, self.adv = cfg, loss_fn, batch, adv
        rows = batch.completion.shape[0]
        per = rows // cfg.micro_batches
        self.chunks = [slice(i, i + per) for i in range(0, rows, per)]
        self.window = Window(tokens=int(batch.mask.sum()), seqs=rows, micro_batches=cfg.micro_batches)
        self.old_logp = torch.zeros(0)
        self.ref_logp: torch.Tensor | None = None

    def logp(self, model: Any, rows: slice) -> torch.Tensor:
        b = self.batch
        return completion_logprobs(model, b.input_ids[rows], b.attention[rows], b.prompt_len)

    def loss(self, logp: torch.Tensor, rows: slice) -> Any:
        b = self.batch
        ref = None if self.ref_logp is None else self.ref_logp[rows]
        return self.loss_fn(
            logp,
            self.old_logp[rows],
            self.adv[rows],
            b.mask[rows],
            group_size=self.cfg.group_size,
            completion_ids=b.completion[rows],
            ref_logp=ref,
            window=self.window,
        )

    def step(self, model: Any, acc: SignalAccumulator) -> float:
        """Forward + backward of every micro-batch (gradients accumulate); returns the summed
        ``w_agg_abs``; the signals go to ``acc``."""
        w_agg = 0.0
        for rows in self.chunks:
            out = self.loss(self.logp(model, rows), rows)
            out.loss.backward()
            acc.add(out.signal)
            w_agg += float(out.metrics.get("w_agg_abs", 0.0))
        return w_agg

    @torch.no_grad()
    def rescore(self, model: Any) -> tuple[TrustRegionSignal, float]:
        """Read-only: the whole batch's signal with the current parameters, and the share of valid
        tokens whose ratio is outside ``[1 - eps_clip, 1 + eps_clip]``."""
        acc, outside = SignalAccumulator(), 0.0
        for rows in self.chunks:
            logp = self.logp(model, rows)
            acc.add(self.loss(logp, rows).signal)
            ratio = (logp - self.old_logp[rows]).exp()
            outside += float((((ratio - 1).abs() > self.cfg.eps_clip) & self.batch.mask[rows]).sum())
        signal = acc.take()
        assert signal is not None
        return signal, outside / float(self.batch.mask.sum())


def train(cfg: RunConfig, progress: Callable[[int, float], None] | None = None, keep_params: bool = False) -> RunResult:
    """Run one configuration (module docstring); returns per-rollout and per-step records."""
    task: Task = get_task(cfg.task, cfg.task_options)
    model = task.make_policy(cfg.seed).to(getattr(torch, cfg.dtype))
    ref_model = task.make_policy(cfg.seed).to(getattr(torch, cfg.dtype)).eval() if cfg.beta else None
    loss_fn = GroupSurrogateLoss(cfg.preset, eps_low=cfg.eps_clip, beta=cfg.beta)
    opt = make_optimizer(
        cfg.optimizer, model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    result = RunResult(config=asdict(cfg))
    start = time.perf_counter()
    for r in range(cfg.rollouts):
        model.eval()
        prompts = [p for p in task.make_prompts(cfg.seed, r, cfg.prompts_per_rollout) for _ in range(cfg.group_size)]
        torch.manual_seed(cfg.seed * 100_003 + r)
        batch = task.generate(model, prompts, sample=True)
        rewards = task.rewards(prompts, batch.texts)
        result.rewards.append(float(rewards.mean()))
        adv = group_advantages(rewards * cfg.reward_scale, cfg.group_size, scale=cfg.adv_scale)
        work = _Batch(cfg, loss_fn, batch, adv)
        with torch.no_grad():
            work.old_logp = torch.cat([work.logp(model, rows) for rows in work.chunks])
            if ref_model is not None:
                work.ref_logp = torch.cat([work.logp(ref_model, rows) for rows in work.chunks])
        share, token_share = whole_group_prefix_share(batch, adv, cfg.group_size)
        record: dict[str, float] = {"reward": result.rewards[-1], "prefix_share": share, "prefix_tokens": token_share}
        if task.binary:
            record.update(lengths_by_correctness(batch, rewards))
        else:
            record.update(len_correct=float("nan"), len_incorrect=float("nan"))
        on_rollout_start(cfg.optimizer, opt)
        model.train()
        if getattr(opt, "backtrack", False):
            opt.set_backtrack_fn(functools.partial(_rescore_signal, work, model))  # type: ignore[attr-defined]
        for k in range(cfg.inner_steps):
            acc = SignalAccumulator()
            opt.zero_grad(set_to_none=True)
            w_agg = work.step(model, acc)
            signal = acc.take(rollout_start=k == 0)
            assert signal is not None
            if k == 0:
                total = float(signal.total_mass)
                record["w_agg_rel"] = w_agg / total if total > 0 else 0.0
            if hasattr(opt, "observe"):
                opt.observe(signal)
            result.steps.append(
                {
                    "rollout": r,
                    "inner": k,
                    "overshoot_fraction": float(signal.overshoot_fraction),
                    "max_excess": float(signal.max_excess),
                    "kappa": float(signal.kappa),
                    "alpha": step_multiplier(opt),
                }
            )
            opt.step()
        model.eval()
        end, outside = work.rescore(model)
        record.update(
            end_overshoot=float(end.overshoot_fraction), end_max_excess=float(end.max_excess), end_outside=outside
        )
        result.rollouts.append(record)
        if progress is not None:
            progress(r, result.rewards[-1])
    result.eval_accuracy = task.evaluate(model)
    result.seconds = time.perf_counter() - start
    result.adam_eps = _adam_eps(opt)
    if keep_params:
        result.final_params = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    if not all(math.isfinite(x) for x in result.rewards):
        raise RuntimeError("non-finite reward recorded")
    return result


def _rescore_signal(work: _Batch, model: Any) -> TrustRegionSignal:
    """The backtrack re-measure: the whole batch's signal with the current parameters."""
    return work.rescore(model)[0]


def _adam_eps(opt: torch.optim.Optimizer) -> dict[str, Any] | None:
    try:
        rep = adam_eps_report(opt)
    except ValueError:  # no second moment yet (no step, or only zero gradients since a reset)
        return None
    return {
        "median_shrink": rep.median_shrink,
        "p99_shrink": rep.p99_shrink,
        "fraction_above_1pct": rep.fraction_above_threshold,
        "negligible": rep.negligible,
    }
