"""The pre-registered fair optimizer protocol: sizes, seeds, grids, metrics and decision rules.

The values below are the ones registered in ``benchmarks/README.md`` before any full-size run;
:mod:`.fair` runs them and :mod:`.fair_analysis` applies the rules.

- **Arms.**  AdamW and the ClipAwareAdamW settings of :data:`CANDIDATES` (the defaults first) on
  the validation seeds; on the test seeds AdamW, the defaults and the setting the validation rule
  (:func:`grpo_fix.lab.experiments.fair_analysis.select_candidate`) picks, if another.
- **Learning rates.**  A factor-2 grid per task (at least 5 points spanning at least 30x); every
  arm at its own best grid lr, chosen by the mean primary metric over the validation seeds.
- **Reported** on disjoint test seeds: each arm at its validated lr (paired bootstrap intervals of
  differences and ratios); the near-best lr range (grid lrs whose mean metric is within
  :data:`MARGIN` of the arm's best, the contiguous run around the best), counted in grid points;
  collapses at each lr, exact McNemar against AdamW; overshoot per inner step and at batch end.
- **Controls** on the test seeds: AdamW at ClipAwareAdamW's validated lr times its mean step
  multiplier on the validation seeds (matched effective lr); on-policy (mu = 1): TRL's default
  (``dapo`` + AdamW) against grpo-fix (``uniform`` + ClipAwareAdamW) at AdamW's validated lr and at
  the top of the grid, where the arms must tie.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .loop import RunConfig

#: Near-best margin of the primary metric (reward or accuracy units).
MARGIN = 0.02
#: ClipAwareAdamW settings run on the validation seeds, in the tie-break order of the selection rule
#: (keep the default, then the simplest change): the default, the gate alone, the controller with
#: a 4x larger threshold, the excess guard, the warm start.
CANDIDATES = ("clip_aware", "clip_aware_gate", "clip_aware_tau20", "clip_aware_guard", "clip_aware_warm")
#: Design round 2 (registered after round 1's results): the excess guard at two limits, with and
#: without the gate, beside the defaults; the tie-break order puts the larger limit (the guard that
#: acts least) and the gate (the current design) first.
ROUND2_CANDIDATES = ("clip_aware", "guard16", "guard16_nogate", "clip_aware_guard", "guard4_nogate")
#: Round 2's test seeds: fresh, never used by any earlier run (round 1 tested on 2000-2015).
ROUND2_TEST_SEEDS = {"toy": tuple(range(3000, 3016)), "arith": tuple(range(3000, 3008))}
#: The two arms every stage runs.
BASELINE, DEFAULT = "adamw", "clip_aware"


@dataclass(frozen=True)
class Protocol:
    """One task's registered protocol.

    Attributes:
        task, task_options: the task of :mod:`.tasks` and its size.
        metric: the primary metric, a key of :meth:`RunResult.summary` (higher is better).
        collapse_metric, collapse_below: a run collapses when ``collapse_metric`` is below this.
        inner_steps, rollouts, prompts_per_rollout: the GRPO loop of every arm.
        lrs: the learning-rate grid (ascending).
        val_seeds, test_seeds: disjoint seed lists.
        onpolicy_rollouts: rollouts of the mu = 1 control.
        candidates: the ClipAwareAdamW settings of the validation stage, in tie-break order.
        design_round: 1, or 2 (candidates selected jointly over both tasks, no control stage).
    """

    task: str
    metric: str
    collapse_metric: str
    collapse_below: float
    inner_steps: int
    rollouts: int
    prompts_per_rollout: int
    lrs: tuple[float, ...]
    val_seeds: tuple[int, ...]
    test_seeds: tuple[int, ...]
    onpolicy_rollouts: int
    task_options: dict[str, Any] = field(default_factory=dict)
    candidates: tuple[str, ...] = CANDIDATES
    design_round: int = 1

    def __post_init__(self) -> None:
        if set(self.val_seeds) & set(self.test_seeds):
            raise ValueError("validation and test seeds must be disjoint")
        if list(self.lrs) != sorted(self.lrs):
            raise ValueError(f"the lr grid must be ascending, got {self.lrs}")

    def config(self, optimizer: str, lr: float, seed: int, **changes: Any) -> RunConfig:
        """The run of ``optimizer`` at ``lr`` on ``seed`` (``changes``: fields to override)."""
        base = RunConfig(
            task=self.task,
            task_options=dict(self.task_options),
            preset="uniform",
            optimizer=optimizer,
            inner_steps=self.inner_steps,
            rollouts=self.rollouts,
            prompts_per_rollout=self.prompts_per_rollout,
            lr=lr,
            seed=seed,
        )
        return replace(base, **changes)


def _grid(lo: float, points: int) -> tuple[float, ...]:
    return tuple(float(f"{lo * 2**k:.6g}") for k in range(points))


PROTOCOLS: dict[str, Protocol] = {
    "toy": Protocol(
        task="toy",
        metric="reward_mean",
        collapse_metric="reward_final",
        collapse_below=0.5,
        inner_steps=4,
        rollouts=25,
        prompts_per_rollout=8,
        lrs=_grid(5e-3, 8),
        val_seeds=tuple(range(1000, 1008)),
        test_seeds=tuple(range(2000, 2016)),
        onpolicy_rollouts=25,
    ),
    "arith": Protocol(
        task="arith",
        metric="eval_accuracy",
        collapse_metric="eval_accuracy",
        collapse_below=0.25,
        inner_steps=4,
        rollouts=20,
        prompts_per_rollout=16,
        lrs=_grid(6.25e-5, 6),
        val_seeds=tuple(range(1000, 1004)),
        test_seeds=tuple(range(2000, 2008)),
        onpolicy_rollouts=20,
    ),
}

#: Reduced sizes for the test suite (seconds, not minutes): same code paths, tiny grids.
SMOKE: dict[str, dict[str, Any]] = {
    "toy": {"rollouts": 2, "onpolicy_rollouts": 2, "lrs": (1e-2, 4e-2), "val_seeds": (1,), "test_seeds": (2,)},
    "arith": {
        "rollouts": 2,
        "onpolicy_rollouts": 2,
        "prompts_per_rollout": 4,
        "lrs": (1e-4, 4e-4),
        "val_seeds": (1,),
        "test_seeds": (2,),
        "task_options": {"hidden_size": 32, "num_layers": 1, "pretrain_steps": 30, "eval_problems": 40},
    },
}


def protocol(task: str, *, smoke: bool = False, design_round: int = 1) -> Protocol:
    """The registered protocol of ``task`` (``smoke``: the test suite's reduced size) in design
    round ``design_round`` (2: :data:`ROUND2_CANDIDATES` on :data:`ROUND2_TEST_SEEDS`)."""
    if task not in PROTOCOLS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(PROTOCOLS)}")
    if design_round not in (1, 2):
        raise ValueError(f"design_round must be 1 or 2, got {design_round!r}")
    proto = PROTOCOLS[task]
    if design_round == 2:
        proto = replace(proto, candidates=ROUND2_CANDIDATES, test_seeds=ROUND2_TEST_SEEDS[task], design_round=2)
    if smoke:
        proto = replace(proto, **SMOKE[task])
    return proto
