"""The TRL adapter's generation / window schedule and generation buffer as plain functions
(no trainer): which window and micro-batch a micro-step uses, the exact window token counts, the
group-preserving shuffle, and the buffer's checkpoint state."""

from __future__ import annotations

import logging
import math

import pytest
import torch

pytest.importorskip("trl")

from grpo_fix.integration.trl.buffer import GenerationBuffer  # noqa: E402
from grpo_fix.integration.trl.schedule import (  # noqa: E402
    WINDOW_TOKENS_KEY,
    GenerationSchedule,
    WindowPlan,
    group_permutation,
    permute_rows,
    set_window_tokens,
    window_token_count,
)


def test_generation_schedule_matches_trl():
    """TRL 1.16: generate every spg * mu micro-steps, micro-batch k % spg, replay (k % (spg mu)) // spg."""
    s = GenerationSchedule(steps_per_generation=4, num_iterations=2)
    assert s.generate_every == 8
    assert [s.generation(k) for k in range(17)] == [0] * 8 + [1] * 8 + [2]
    assert [s.slot(k) for k in range(9)] == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert [s.replay(k) for k in range(9)] == [0, 0, 0, 0, 1, 1, 1, 1, 0]
    assert [s.starts_generation(k) for k in (0, 4, 8, 16)] == [True, False, True, True]


def test_window_plan_positions():
    plan = WindowPlan.aligned(13, 4)
    assert (plan.start, plan.size, list(plan.steps)) == (12, 4, [12, 13, 14, 15])
    assert plan.position(13) == 1 and plan.is_last(15) and not plan.is_last(14)
    assert not plan.contains(16)
    with pytest.raises(ValueError, match="micro-step 16 is not in the window"):
        plan.position(16)
    prefetched = WindowPlan(start=3, size=2, batches=["a", "b"])  # an epoch's shorter last window
    assert prefetched.batch(4, default="x") == "b" and plan.batch(12, default="x") == "x"


@pytest.mark.parametrize(
    "ga,spg,mu,windows",
    [
        # window -> {generation: first micro-step using it}; rollout_start per window
        (2, 2, 1, [({0: 0}, True), ({1: 2}, True)]),
        (2, 4, 1, [({0: 0}, True), ({0: 2}, False), ({1: 4}, True)]),
        (4, 2, 1, [({0: 0, 1: 2}, True), ({2: 4, 3: 6}, True)]),  # windows span two generation batches
        (3, 2, 1, [({0: 0, 1: 2}, True), ({1: 3, 2: 4}, True)]),  # and straddle them
        (2, 2, 2, [({0: 0}, True), ({0: 2}, False), ({1: 4}, True)]),
    ],
)
def test_window_generations_and_rollout_flag(ga, spg, mu, windows):
    s = GenerationSchedule(spg, mu)
    for w, (generations, rollout) in enumerate(windows):
        plan = WindowPlan.aligned(w * ga, ga)
        assert plan.generations(s) == generations
        assert plan.rollout_start(s) is rollout


def _buffer(spg, mu, lengths_per_generation):
    """A GenerationBuffer whose micro-batches have the given valid-token counts."""
    buf = GenerationBuffer(GenerationSchedule(spg, mu))
    for g, lengths in enumerate(lengths_per_generation):
        micro = []
        for n in lengths:
            mask = torch.zeros(1, 10, dtype=torch.long)
            mask[0, :n] = 1
            micro.append({"completion_mask": mask})
        buf.put(g, micro)
    return buf


@pytest.mark.parametrize(
    "ga,spg,mu,lengths,expect",
    [
        (2, 4, 1, [[1, 2, 3, 4]], [3, 7]),  # two windows per generation
        (4, 2, 1, [[1, 2], [3, 4], [5, 6], [7, 8]], [10, 26]),  # a window spans two generations
        (3, 2, 1, [[1, 2], [3, 4], [5, 6]], [6, 15]),  # windows straddle generations
        (2, 2, 2, [[1, 2], [3, 4]], [3, 3, 7]),  # replays are counted again
    ],
)
def test_window_token_counts_are_exact(ga, spg, mu, lengths, expect):
    buf = _buffer(spg, mu, lengths)
    mask = lambda b: b["completion_mask"]  # noqa: E731
    for w, n in enumerate(expect):
        plan = WindowPlan.aligned(w * ga, ga)
        total = window_token_count(plan, buf.micro_batch, mask)
        assert float(total) == n
        set_window_tokens(plan, buf.schedule, buf.micro_batch, total)
        for step in plan.steps:
            assert float(buf.micro_batch(step)[WINDOW_TOKENS_KEY][buf.schedule.replay(step)]) == n


def test_window_tokens_are_nan_until_counted():
    """A replay's count is set when its window starts; until then it is NaN (the loss refuses it)."""
    buf = _buffer(2, 2, [[1, 2]])
    plan = WindowPlan.aligned(0, 2)
    total = window_token_count(plan, buf.micro_batch, lambda b: b["completion_mask"])
    set_window_tokens(plan, buf.schedule, buf.micro_batch, total)
    counts = buf.micro_batch(0)[WINDOW_TOKENS_KEY]
    assert float(counts[0]) == 3 and math.isnan(float(counts[1]))


def test_group_permutation_keeps_groups():
    torch.manual_seed(0)
    order = group_permutation(12, 4)
    assert sorted(order.tolist()) == list(range(12))
    blocks = order.view(3, 4)
    assert all(b.tolist() == list(range(b[0], b[0] + 4)) and b[0] % 4 == 0 for b in blocks)
    with pytest.raises(ValueError, match="do not split into groups of 5"):
        group_permutation(12, 5)


def test_group_permutation_draws_what_trl_draws():
    """Whole groups or not, the shuffle consumes TRL's random numbers: the RNG state after it is
    the one after TRL's shuffle_sequence_dict, so later sampling is the same as stock TRL's."""
    from trl.trainer.utils import shuffle_sequence_dict

    torch.manual_seed(2)
    group_permutation(12, 4)
    ours = torch.rand(3)
    torch.manual_seed(2)
    shuffle_sequence_dict({"x": torch.arange(12)})
    assert torch.equal(ours, torch.rand(3))
    # and every group order is reachable, about equally often
    seen = {}
    for seed in range(600):
        torch.manual_seed(seed)
        key = tuple(group_permutation(6, 2).view(3, 2)[:, 0].tolist())
        seen[key] = seen.get(key, 0) + 1
    assert len(seen) == 6 and min(seen.values()) > 60


def test_plain_permutation_draws_like_trl():
    """Partial groups: TRL's shuffle_sequence_dict itself."""
    from trl.trainer.utils import shuffle_sequence_dict

    batch = {"x": torch.arange(6), "y": list("abcdef"), "n": torch.tensor(3), "none": None}
    torch.manual_seed(1)
    ours = permute_rows(batch, group_permutation(6, None))
    torch.manual_seed(1)
    theirs = shuffle_sequence_dict(batch)
    assert torch.equal(ours["x"], theirs["x"]) and ours["y"] == theirs["y"] and ours["n"] is batch["n"]
    assert ours["none"] is None


def test_buffer_release_and_missing_generation():
    buf = _buffer(2, 1, [[1, 2], [3, 4], [5, 6]])
    buf.release_before(2)
    assert sorted(buf.generations) == [2]
    with pytest.raises(RuntimeError, match=r"no buffered completions for micro-step 0 \(generation batch 0\)"):
        buf.micro_batch(0)
    with pytest.raises(ValueError, match="splits into 2 micro-batches, got 3"):
        buf.put(3, [{}, {}, {}])


def test_buffer_state_round_trip_and_changed_schedule(caplog):
    buf = _buffer(2, 2, [[1, 2], [3, 4]])
    state = buf.state_dict(step=5, whole_groups=True)
    again = GenerationBuffer(GenerationSchedule(2, 2))
    assert again.load_state_dict(state) == (5, True)
    assert again.micro_batch(5) is state["generations"][1][1]
    # a resume with another num_iterations: the counter is kept, the pending replays are dropped
    changed = GenerationBuffer(GenerationSchedule(2, 3))
    with caplog.at_level(logging.WARNING):
        assert changed.load_state_dict(state) == (5, True)
    assert changed.generations == {} and "buffered completions are dropped" in caplog.text
    # grpo-fix 0.2 checkpoints: one generation batch under "buffered_inputs"
    legacy = {"step": 3, "whole_groups": False, "buffered_inputs": state["generations"][1]}
    old = GenerationBuffer(GenerationSchedule(2, 2))
    assert old.load_state_dict(legacy) == (3, False)
    assert old.micro_batch(3) is state["generations"][1][1]
