"""GRPOFixTrainer's edge cases: bad rewards say what happened instead of skipping steps silently,
a resume with another ``num_iterations`` continues instead of raising ``IndexError``, and a
micro-batch holding lists or arrays is refused naming the entry."""

from __future__ import annotations

import logging
import math
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_trl import TRAINER_BASE, build_dataset, build_model, build_tokenizer, reward_len  # noqa: E402

from grpo_fix.integration.trl import GRPOFixConfig, GRPOFixTrainer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def make_trainer(tmp_path, tok, reward=reward_len, **kw):
    args = GRPOFixConfig(output_dir=str(tmp_path), **{**TRAINER_BASE, "use_cpu": True, **kw})
    return GRPOFixTrainer(
        model=build_model(tok, seed=0),
        reward_funcs=reward,
        args=args,
        train_dataset=build_dataset(),
        processing_class=tok,
    )


def inf_for_first(completions, **kwargs):
    return [math.inf] + [0.1 * i for i in range(1, len(completions))]


@pytest.mark.parametrize("optimizer", ["clip_aware_adamw", "adamw"])
def test_infinite_reward_is_refused_naming_the_reward_function(optimizer, tmp_path, tok):
    """Before: every step was skipped with nothing logged (ClipAwareAdamW), or the parameters
    became NaN (AdamW)."""
    trainer = make_trainer(tmp_path, tok, reward=inf_for_first, scale_rewards="none", optimizer=optimizer)
    with pytest.raises(ValueError, match=r"reward function 'inf_for_first' returned inf for completion 0.*finite"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_nan_reward_keeps_trl_semantics(tmp_path, tok):
    """NaN means 'this reward function does not apply' (TRL's nansum over functions): kept."""

    def sometimes_nan(completions, **kwargs):
        return [math.nan if i % 2 else 0.1 * i for i in range(len(completions))]

    trainer = make_trainer(tmp_path, tok, reward=[reward_len, sometimes_nan], max_steps=2)
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_rewards_too_large_for_the_group_statistics(tmp_path, tok):
    def huge(completions, **kwargs):
        return [3e38 * (1 if i % 2 else -1) for i in range(len(completions))]

    trainer = make_trainer(tmp_path, tok, reward=huge)
    with pytest.raises(ValueError, match=r"reward function 'huge' returned -3e\+38 .*square overflows float32"):
        trainer.train()


@pytest.mark.parametrize("kind", ["list", "numpy"])
def test_micro_batch_of_lists_or_arrays_is_refused(kind, tmp_path, tok):
    trainer = make_trainer(tmp_path, tok)
    trainer.model.train()
    inputs = trainer._prepare_inputs([{"prompt": "hello world"}] * 4)
    values = inputs["advantages"].tolist()
    inputs = dict(inputs, advantages=values if kind == "list" else np.asarray(values))
    with pytest.raises(TypeError, match=r"inputs\['advantages'\] must be a torch.Tensor, got (list|ndarray)"):
        trainer._compute_loss(trainer.model, inputs)
    with pytest.raises(KeyError, match="the micro-batch has no 'completion_mask'"):
        trainer._compute_loss(trainer.model, {k: v for k, v in inputs.items() if k != "completion_mask"})


def test_resume_with_changed_num_iterations(tmp_path, tok, caplog):
    """Before: IndexError.  The checkpoint's pending replays do not fit the new schedule: they are
    dropped with a warning, the next window generates, and training continues."""
    first = make_trainer(tmp_path / "a", tok, num_iterations=2, max_steps=3, save_strategy="steps", save_steps=1)
    first.train()
    second = make_trainer(tmp_path / "b", tok, num_iterations=3, max_steps=5)
    with caplog.at_level(logging.WARNING, logger="grpo_fix.integration.trl.buffer"):
        second.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    assert "buffered completions are dropped" in caplog.text
    assert second.state.global_step == 5
    logs = [h for h in second.state.log_history if "loss" in h]
    assert logs and all(math.isfinite(h["loss"]) for h in logs)


def test_num_iterations_zero_never_reaches_train(tmp_path, tok):
    """Before: accepted, and ``train()`` silently did nothing."""
    with pytest.raises(ValueError, match="num_iterations must be an int >= 1"):
        make_trainer(tmp_path, tok, num_iterations=0)


def test_partial_groups_say_why_w_agg_is_absent(tmp_path, tok, caplog):
    """per_device_train_batch_size < num_generations: micro-batches hold partial groups, so W_agg
    cannot be measured; the trainer says so once instead of dropping the metric silently."""
    trainer = make_trainer(tmp_path, tok, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2)
    with caplog.at_level(logging.WARNING, logger="grpo_fix.integration.trl.trainer"):
        trainer.train()
    assert caplog.text.count("grpo_fix/w_agg is not logged: micro-batches hold partial groups") == 1
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and not any("grpo_fix/w_agg" in h for h in logs) and all("grpo_fix/kappa" in h for h in logs)


def test_effective_learning_rate_is_logged_beside_trl_learning_rate(tmp_path, tok):
    """With the warm start (alpha = 0.1) the step size the parameters see is lr * alpha, logged as
    clip_aware/effective_lr next to TRL's learning_rate."""
    trainer = make_trainer(
        tmp_path, tok, num_iterations=2, max_steps=2, lr_scheduler_type="constant", clip_aware_alpha_init=0.1
    )
    trainer.train()
    first = [h for h in trainer.state.log_history if "loss" in h][0]
    assert first["clip_aware/alpha"] <= 0.125
    assert first["clip_aware/effective_lr"] == pytest.approx(first["learning_rate"] * first["clip_aware/alpha"])
