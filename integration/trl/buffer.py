"""The generated micro-batches ``GRPOFixTrainer`` still has to train on, and their checkpoint.

TRL 1.16 keeps one generation batch (``_buffered_inputs``) and its micro-step counter ``_step``
only in memory, so a run resumed between two generations would regenerate the pending replays
with the current policy and shift its schedule.  :class:`GenerationBuffer` holds the pending
generation batches by index (a window may span two, :mod:`.schedule`), and is saved with the
counter in every checkpoint, one file per process, so ``resume_from_checkpoint`` is exact at any
optimizer step.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .schedule import GenerationSchedule

logger = logging.getLogger(__name__)

#: Version of the checkpointed buffer state (1: grpo-fix 0.2, one generation batch).
STATE_FORMAT = 2


def buffer_file(process_index: int) -> str:
    """File name of one process's buffer in a checkpoint folder."""
    return f"grpo_fix_generation_buffer_rank{process_index}.pt"


class GenerationBuffer:
    """Generation index -> the ``steps_per_generation`` micro-batches of that generation batch."""

    def __init__(self, schedule: GenerationSchedule) -> None:
        self.schedule = schedule
        self.generations: dict[int, list[dict[str, Any]]] = {}

    def __contains__(self, generation: int) -> bool:
        return generation in self.generations

    def put(self, generation: int, micro_batches: list[dict[str, Any]]) -> None:
        if len(micro_batches) != self.schedule.steps_per_generation:
            raise ValueError(
                f"a generation batch splits into {self.schedule.steps_per_generation} micro-batches, got "
                f"{len(micro_batches)}"
            )
        self.generations[generation] = micro_batches

    def release_before(self, generation: int) -> None:
        """Forget the generation batches no later micro-step uses."""
        for index in [g for g in self.generations if g < generation]:
            del self.generations[index]

    def micro_batch(self, step: int) -> dict[str, Any]:
        """The buffered micro-batch micro-step ``step`` trains on."""
        generation = self.schedule.generation(step)
        if generation not in self.generations:
            raise RuntimeError(
                f"no buffered completions for micro-step {step} (generation batch {generation}); buffered: "
                f"{sorted(self.generations)}"
            )
        return self.generations[generation][self.schedule.slot(step)]

    # -- checkpoint ------------------------------------------------------------------------------
    def state_dict(self, step: int, whole_groups: bool) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "step": step,
            "whole_groups": whole_groups,
            "schedule": (self.schedule.steps_per_generation, self.schedule.num_iterations),
            "generations": self.generations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> tuple[int, bool]:
        """Restore the buffer; returns the saved ``(step, whole_groups)``.  A checkpoint written
        with another ``steps_per_generation`` / ``num_iterations`` keeps its counter, but its pending
        replays do not fit the new schedule: they are dropped with a warning and the next window
        generates."""
        step = int(state["step"])
        if state.get("format", 1) == 1:  # grpo-fix 0.2: the generation batch of `step`, same schedule
            generations = {self.schedule.generation(step): state["buffered_inputs"]}
            saved = (self.schedule.steps_per_generation, self.schedule.num_iterations)
        else:
            generations, saved = state["generations"], tuple(state["schedule"])
        current = (self.schedule.steps_per_generation, self.schedule.num_iterations)
        if saved != current:
            logger.warning(
                "the checkpoint was written with (steps_per_generation, num_iterations) = %s, this run uses %s: its "
                "buffered completions are dropped and the next optimizer window generates new ones",
                saved,
                current,
            )
            generations = {}
        self.generations = dict(generations)
        return step, bool(state["whole_groups"])


def save_buffer(folder: str, process_index: int, state: dict[str, Any]) -> None:
    torch.save(state, os.path.join(folder, buffer_file(process_index)))


def load_buffer(checkpoint: str | None, process_index: int, device: torch.device) -> dict[str, Any] | None:
    """The buffer state a checkpoint holds for this process (None if it holds none), on ``device``."""
    path = None if checkpoint is None else os.path.join(checkpoint, buffer_file(process_index))
    if path is None or not os.path.exists(path):
        return None
    # load on CPU, then move: under multi-process CPU training accelerate's device is "cpu:<i>",
    # which torch.load's map_location does not accept
    from accelerate.utils import send_to_device

    return send_to_device(torch.load(path, map_location="cpu", weights_only=False), device)
