"""A minimal, fully instrumented GRPO loop on the toy task (:mod:`grpo_fix.toy`).

Protocol (documented in ``benchmarks/README.md``): each rollout samples ``group_size``
completions for each of ``prompts_per_rollout`` prompts from the current policy, scores them,
computes group advantages, and then takes ``inner_steps`` (the paper's mu) optimizer steps on that
fixed batch.  Every step uses the whole rollout batch as one window (exact token normaliser),
so step 1 is on-policy (ratio 1) and every later step measures, *before* it is taken, how far the
policy already drifted: the overshoot fraction (tokens beyond the clip region in their
advantage's direction, paper Eq. 28's R_clip) and the max excess of |log s| past the boundary.
That is exactly the quantity Prop. 3 says momentum inflates.

It is deliberately not TRL: the experiments need per-step control of the optimizer (observe,
backtrack, resets) and must run hundreds of short runs on 2 CPU cores.  ``grpo-fix demo`` uses
TRL's GRPOTrainer.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from grpo_fix import GroupSurrogateLoss, adam_eps_report, group_advantages, prefix_consistent_advantages

from .. import toy
from .baselines import make_optimizer, on_rollout_start


@dataclass
class RunConfig:
    """One experiment run (every field is recorded in the results JSON)."""

    preset: str = "uniform"
    optimizer: str = "adamw"
    inner_steps: int = 4
    rollouts: int = 25
    group_size: int = 8
    prompts_per_rollout: int = 8
    completion_len: int = 12
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    beta: float = 0.0
    reward_scale: float = 1.0
    adv_scale: str = "group"
    eps_clip: float = 0.2
    hidden_size: int = 64
    dtype: str = "float32"
    seed: int = 0


@dataclass
class RunResult:
    config: dict
    rewards: list[float] = field(default_factory=list)  # mean reward per rollout
    steps: list[dict] = field(default_factory=list)  # one record per optimizer step
    seconds: float = 0.0
    final_params: torch.Tensor | None = None
    adam_eps: dict | None = None  # adam_eps_report of the final optimizer state (Prop. 2's condition)

    def summary(self, tail: int = 3) -> dict:
        later = [s for s in self.steps if s["inner"] > 0]  # steps taken off-policy
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        return {
            "reward_start": self.rewards[0] if self.rewards else float("nan"),
            "reward_final": mean(self.rewards[-tail:]),
            "overshoot_fraction": mean([s["overshoot_fraction"] for s in later]),
            "max_excess": max([s["max_excess"] for s in later], default=0.0),
            "mean_max_excess": mean([s["max_excess"] for s in later]),
            "kappa": mean([s["kappa"] for s in later]),
            "w_agg_rel": mean([s["w_agg_abs"] / s["total_mass"] for s in self.steps if s["total_mass"] > 0]),
            "seconds": self.seconds,
        }


@torch.no_grad()
def rollout(model, tokenizer, prompts: list[str], cfg: RunConfig, rollout_idx: int):
    """Sample ``group_size`` completions per prompt; return ids, masks, rewards (seeded per rollout)."""
    batch_prompts = [p for p in prompts for _ in range(cfg.group_size)]
    enc = tokenizer(batch_prompts, return_tensors="pt", padding=True)
    torch.manual_seed(cfg.seed * 100_003 + rollout_idx)
    out = model.generate(
        **enc,
        do_sample=True,
        max_new_tokens=cfg.completion_len,
        min_new_tokens=1,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    prompt_len = enc["input_ids"].shape[1]
    completion = out[:, prompt_len:]
    if completion.shape[1] < cfg.completion_len:  # every row stopped early
        pad = completion.new_full(
            (completion.shape[0], cfg.completion_len - completion.shape[1]), tokenizer.pad_token_id
        )
        completion = torch.cat([completion, pad], 1)
    is_eos = completion == tokenizer.eos_token_id
    first_eos = torch.where(
        is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], cfg.completion_len, dtype=torch.long)
    )
    mask = torch.arange(cfg.completion_len)[None, :] <= first_eos[:, None]  # includes the EOS, as TRL
    texts = tokenizer.batch_decode(completion.masked_fill(~mask, tokenizer.pad_token_id), skip_special_tokens=True)
    rewards = torch.tensor([toy.share_of_target(t) for t in texts], dtype=torch.float64)
    input_ids = torch.cat([enc["input_ids"], completion], 1)
    attention = torch.cat([enc["attention_mask"], mask.long()], 1)
    return input_ids, attention, prompt_len, completion, mask, rewards


def completion_logprobs(model, input_ids, attention, prompt_len: int) -> torch.Tensor:
    """Log-probs of the completion tokens, (B, L), fp32 or the model's float dtype if wider."""
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, prompt_len - 1 : -1]
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    return logp.gather(-1, input_ids[:, prompt_len:, None]).squeeze(-1)


def train(cfg: RunConfig, progress: Callable[[int, float], None] | None = None, keep_params: bool = False) -> RunResult:
    """Run one configuration; returns per-rollout rewards and per-step trust-region records."""
    dtype = getattr(torch, cfg.dtype)
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(tokenizer, seed=cfg.seed, hidden_size=cfg.hidden_size, dtype=dtype)
    ref_model = copy.deepcopy(model).eval() if cfg.beta else None
    prompts = toy.build_prompts(cfg.prompts_per_rollout, seed=cfg.seed)
    loss_fn = GroupSurrogateLoss(cfg.preset, eps_low=cfg.eps_clip, beta=cfg.beta)
    opt = make_optimizer(
        cfg.optimizer, model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    result = RunResult(config=asdict(cfg))
    start = time.perf_counter()
    for r in range(cfg.rollouts):
        model.eval()
        input_ids, attention, P, completion, mask, rewards = rollout(model, tokenizer, prompts, cfg, r)
        result.rewards.append(float(rewards.mean()))
        adv = group_advantages(rewards * cfg.reward_scale, cfg.group_size, scale=cfg.adv_scale)
        if loss_fn.config.prefix_consistent:
            adv = prefix_consistent_advantages(completion, adv, cfg.group_size, mask)
        with torch.no_grad():
            old_logp = completion_logprobs(model, input_ids, attention, P)
            ref_logp = completion_logprobs(ref_model, input_ids, attention, P) if ref_model is not None else None
        on_rollout_start(opt)
        model.train()

        def measure():
            with torch.no_grad():
                lp = completion_logprobs(model, input_ids, attention, P)
                return loss_fn(lp, old_logp, adv, mask, group_size=cfg.group_size, ref_logp=ref_logp).signal

        if hasattr(opt, "set_backtrack_fn") and getattr(opt, "backtrack", False):
            opt.set_backtrack_fn(measure)
        for k in range(cfg.inner_steps):
            logp = completion_logprobs(model, input_ids, attention, P)
            out = loss_fn(
                logp, old_logp, adv, mask, group_size=cfg.group_size, completion_ids=completion, ref_logp=ref_logp
            )
            signal = out.signal.with_rollout_start(k == 0)
            if hasattr(opt, "observe"):
                opt.observe(signal)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            record = {"rollout": r, "inner": k, **{key: float(v) for key, v in out.metrics.items()}}
            record.update(
                overshoot_fraction=float(signal.overshoot_fraction),
                max_excess=float(signal.max_excess),
                kappa=float(signal.kappa),
                total_mass=float(signal.total_mass),
                alpha=float(getattr(opt, "last_stats", {}).get("alpha", 1.0)),
            )
            record.setdefault("w_agg_abs", 0.0)
            result.steps.append(record)
        if progress is not None:
            progress(r, result.rewards[-1])
    result.seconds = time.perf_counter() - start
    try:
        rep = adam_eps_report(opt)
        result.adam_eps = {
            "median_shrink": rep.median_shrink,
            "p99_shrink": rep.p99_shrink,
            "fraction_above_1pct": rep.fraction_above_threshold,
            "negligible": rep.negligible,
        }
    except ValueError:  # no second moment yet (no step, or only zero gradients since a reset)
        result.adam_eps = None
    if keep_params:
        result.final_params = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    if not all(math.isfinite(x) for x in result.rewards):
        raise RuntimeError("non-finite reward recorded")
    return result
