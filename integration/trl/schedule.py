"""The generation and window schedule of ``GRPOFixTrainer``, as plain functions of the micro-step.

TRL 1.16 generates a batch of completions every ``generate_every = steps_per_generation *
num_iterations`` micro-steps, splits it into ``steps_per_generation`` micro-batches and replays
them ``num_iterations`` times: micro-step ``k`` uses micro-batch ``k % steps_per_generation``
(:meth:`GenerationSchedule.slot`) of generation ``k // generate_every``, in replay
``(k % generate_every) // steps_per_generation``.

An optimizer *window* is the run of micro-steps whose gradients one optimizer step sums:
the ``gradient_accumulation_steps`` batches the Trainer prefetches (fewer at the end of an
epoch), :class:`WindowPlan`.  A window may span generation batches (``gradient_accumulation_steps
= 4, steps_per_generation = 2``): the trainer then generates every batch the window touches at
the window's first micro-step.  No optimizer step happens inside a window, so that is the policy
TRL would have sampled them with, and the window's exact valid-token count (the ``uniform`` /
``dapo`` normaliser ``N_window``) is known before its first loss: :func:`window_token_count`.

:func:`group_permutation` is the group-preserving shuffle: TRL shuffles rows; when micro-batches
hold whole groups we shuffle groups, so each micro-batch keeps whole groups and the loss can
measure W_agg (Prop. 1's shared-prefix aggregate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: Key of the per-micro-batch float64 tensor ``(num_iterations,)`` holding, for each replay of
#: the buffered micro-batch, the global valid-token count of the optimizer window it belongs to
#: (NaN until that window starts, so a use before its count is known fails the loss's checks).
WINDOW_TOKENS_KEY = "grpo_fix_window_tokens"


@dataclass(frozen=True)
class GenerationSchedule:
    """Which generation, micro-batch and replay a TRL micro-step uses (module docstring)."""

    steps_per_generation: int
    num_iterations: int

    @property
    def generate_every(self) -> int:
        return self.steps_per_generation * self.num_iterations

    def generation(self, step: int) -> int:
        """Index of the generation batch micro-step ``step`` trains on."""
        return step // self.generate_every

    def slot(self, step: int) -> int:
        """Index of the buffered micro-batch within its generation batch."""
        return step % self.steps_per_generation

    def replay(self, step: int) -> int:
        """How many times the micro-batch was used before (0 on its first use)."""
        return (step % self.generate_every) // self.steps_per_generation

    def starts_generation(self, step: int) -> bool:
        """Whether ``step`` is the first micro-step of a generation batch."""
        return step % self.generate_every == 0


@dataclass(frozen=True)
class WindowPlan:
    """The micro-steps ``start, ..., start + size - 1`` of one optimizer window.

    Args:
        start: the window's first micro-step (TRL's ``_step`` counter).
        size: its number of micro-steps (``gradient_accumulation_steps``, fewer at an epoch's end).
        batches: the dataloader batches of its micro-steps, in order (what the Trainer prefetched;
            ``None`` when the caller drives micro-steps itself).
    """

    start: int
    size: int
    batches: Sequence[Any] | None = None

    @classmethod
    def aligned(cls, step: int, grad_accum: int) -> WindowPlan:
        """The window of ``grad_accum`` micro-steps containing ``step`` when windows start at
        multiples of ``grad_accum`` (what the Trainer does within an epoch)."""
        return cls(start=step - step % grad_accum, size=grad_accum)

    @property
    def steps(self) -> range:
        return range(self.start, self.start + self.size)

    def contains(self, step: int) -> bool:
        return self.start <= step < self.start + self.size

    def position(self, step: int) -> int:
        """Index of ``step`` in the window (``ValueError`` outside it)."""
        if not self.contains(step):
            raise ValueError(f"micro-step {step} is not in the window {self.steps}")
        return step - self.start

    def is_last(self, step: int) -> bool:
        return step == self.start + self.size - 1

    def batch(self, step: int, default: Any) -> Any:
        """The dataloader batch of ``step`` (``default`` when the plan has none)."""
        return default if self.batches is None else self.batches[self.position(step)]

    def generations(self, schedule: GenerationSchedule) -> dict[int, int]:
        """Generation index -> the first micro-step of this window that uses it."""
        first: dict[int, int] = {}
        for step in self.steps:
            first.setdefault(schedule.generation(step), step)
        return first

    def rollout_start(self, schedule: GenerationSchedule) -> bool:
        """Whether the window trains on a freshly generated batch (the optimizer's rollout flag)."""
        return any(schedule.starts_generation(step) for step in self.steps)


def window_token_count(
    plan: WindowPlan,
    micro_batch: Callable[[int], Mapping[str, Any]],
    loss_mask: Callable[[Mapping[str, Any]], torch.Tensor],
) -> torch.Tensor:
    """This process's valid-token count of the window (0-dim float64): the sum of ``loss_mask``
    over the micro-batch of every micro-step (``micro_batch(step)``); all-reduce it over ranks."""
    counts = [loss_mask(micro_batch(step)).sum().to(torch.float64) for step in plan.steps]
    return torch.stack(counts).sum()


def init_window_tokens(batch: dict, schedule: GenerationSchedule, device: torch.device) -> None:
    """Give a new micro-batch its :data:`WINDOW_TOKENS_KEY` entry, NaN for every replay."""
    batch.setdefault(
        WINDOW_TOKENS_KEY, torch.full((schedule.num_iterations,), math.nan, dtype=torch.float64, device=device)
    )


def set_window_tokens(
    plan: WindowPlan, schedule: GenerationSchedule, micro_batch: Callable[[int], dict], total: torch.Tensor
) -> None:
    """Store the window's global token count in each of its micro-batches, at the replay it is
    used in (:data:`WINDOW_TOKENS_KEY`)."""
    for step in plan.steps:
        batch = micro_batch(step)
        init_window_tokens(batch, schedule, total.device)
        batch[WINDOW_TOKENS_KEY][schedule.replay(step)] = total


def group_permutation(num_rows: int, group_size: int | None) -> torch.Tensor:
    """A random row order that keeps each block of ``group_size`` consecutive rows together and in
    order (``None``: TRL's plain row permutation).

    It draws exactly what TRL's ``shuffle_sequence_dict`` draws (one ``torch.randperm(num_rows)``
    from the global RNG) and orders the groups by their first row in that permutation, which is a
    uniformly random group order; so the swap consumes the same random numbers as stock TRL and
    samples the same completions afterwards.
    """
    rows = torch.randperm(num_rows)
    if group_size is None:
        return rows
    if num_rows % group_size:
        raise ValueError(f"{num_rows} rows do not split into groups of {group_size}")
    first = torch.full((num_rows // group_size,), num_rows, dtype=torch.long)
    first.scatter_reduce_(0, rows // group_size, torch.arange(num_rows), reduce="amin")
    groups = torch.argsort(first)
    return (groups[:, None] * group_size + torch.arange(group_size)[None, :]).reshape(-1)


def permute_rows(batch: Mapping[str, Any], order: torch.Tensor) -> dict[str, Any]:
    """``batch`` with every per-row entry (tensors with a batch dimension, lists) in ``order``;
    scalars and ``None`` are kept."""

    def permute(value: Any) -> Any:
        if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
            return value
        if isinstance(value, torch.Tensor):
            return value[order.to(value.device)]
        return [value[i] for i in order.tolist()]

    return {key: permute(value) for key, value in batch.items()}
