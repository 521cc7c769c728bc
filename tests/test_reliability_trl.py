"""Reliability on GRPOFixTrainer (issue 8): the health callback names the micro-batch whose backward
produced a NaN gradient; a run saved at step k and resumed with ``resume_from_checkpoint`` ends where
the uninterrupted run ends (parameters to 1e-6, ca_alpha / ca_kappa / Adam state equal), on one
process and on two ranks mid generation buffer.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

trl = pytest.importorskip("trl")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from dist_utils import launch_env, run_worker, torchrun  # noqa: E402
from tiny_trl import (  # noqa: E402
    TRAINER_BASE,
    build_dataset,
    build_model,
    build_tokenizer,
    reward_len,
)

from grpo_fix.health import HealthMonitor, HealthMonitorCallback  # noqa: E402
from grpo_fix.integration.trl import GRPOFixConfig, GRPOFixTrainer  # noqa: E402

NAN = float("nan")

# ------------------------------------------------------------------------------------------------
# HealthMonitorCallback on GRPOFixTrainer
# ------------------------------------------------------------------------------------------------
BASE = dict(TRAINER_BASE, use_cpu=True)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _trainer(tmp_path, tok, **kw):
    args = GRPOFixConfig(output_dir=str(tmp_path), **{**BASE, **kw})
    return GRPOFixTrainer(
        model=build_model(tok, seed=0),
        reward_funcs=reward_len,
        args=args,
        train_dataset=build_dataset(),
        processing_class=tok,
    )


def _poison(trainer, at_micro_step):
    """Make the loss NaN (hence every gradient) on TRL's micro-step ``at_micro_step`` (0-based)."""
    orig = trainer._compute_loss

    def poisoned(model, inputs):
        loss = orig(model, inputs)
        return loss * torch.tensor(NAN) if trainer._step == at_micro_step else loss

    trainer._compute_loss = poisoned


@pytest.mark.parametrize("micro", [0, 1])
def test_callback_raise_names_step_and_micro_batch(tmp_path, tok, micro):
    # GA 2: micro-step 2 + micro is step 2 (1-based, as logged), micro-batch `micro`
    trainer = _trainer(tmp_path, tok, gradient_accumulation_steps=2)
    trainer.add_callback(HealthMonitorCallback(HealthMonitor(mode="raise", every=1)))
    _poison(trainer, 2 + micro)
    with pytest.raises(
        FloatingPointError, match=rf"non-finite gradient of parameter \S+ at step 2, micro-batch {micro}"
    ):
        trainer.train()
    assert trainer.state.global_step == 1


def test_callback_log_mode_every_8_logs_loss_and_grads(tmp_path, tok):
    trainer = _trainer(tmp_path, tok, gradient_accumulation_steps=2, logging_nan_inf_filter=False)
    mon = HealthMonitor(mode="log", every=8)
    trainer.add_callback(HealthMonitorCallback(mon))
    _poison(trainer, 3)  # step 2, micro-batch 1
    trainer.train()
    assert trainer.state.global_step == 3
    first = mon.events[0]
    assert (first["step"], first["micro_batch"]) == (2, 1) and first["quantity"].startswith("gradient of parameter")
    assert {"step": 2, "micro_batch": None, "quantity": "logged loss"} in mon.events
    # zero_grad: step 3's gradients are healthy again (its *logged* loss stays NaN: transformers
    # resets its running loss with `tr_loss -= tr_loss`, and NaN - NaN is NaN)
    assert not any(e["step"] == 3 and e["quantity"].startswith("gradient") for e in mon.events)
    assert mon.syncs <= 3  # 5 gradient checks + host-side logged values, not one sync per check
    opt = trainer.clip_aware_optimizer()
    assert opt.skipped_steps == 1  # the poisoned step never reached the parameters
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# ------------------------------------------------------------------------------------------------
# TRL resume equivalence
# ------------------------------------------------------------------------------------------------
def _resume_pair(tmp_path, tok, k, **kw):
    """(uninterrupted k+3-step trainer, trainer resumed from its checkpoint-k)."""
    kw = dict(max_steps=k + 3, save_strategy="steps", save_steps=k, **kw)
    a = _trainer(tmp_path / "a", tok, **kw)
    a.train()
    b = _trainer(tmp_path / "b", tok, **kw)
    b.train(resume_from_checkpoint=str(tmp_path / "a" / f"checkpoint-{k}"))
    return a, b


def _opt_state(trainer):
    opt = trainer.clip_aware_optimizer()
    groups = [{k: g[k] for k in ("ca_alpha", "ca_kappa", "ca_f", "ca_invalid", "lr")} for g in opt.param_groups]
    tensors = [
        (float(st["step"]), st["exp_avg"].clone(), st["exp_avg_sq"].clone())
        for p in trainer.model.parameters()
        for st in [opt.state[p]]
    ]
    return opt, groups, tensors


# default: a new generation every step; num_iterations=2: checkpoint at a generation boundary
# (k * GA a multiple of steps_per_generation * num_iterations), the controller has shrunk alpha
@pytest.mark.parametrize("k,kw", [(2, {}), (2, dict(num_iterations=2))], ids=["default", "num_iterations_2"])
def test_trl_resume_equals_uninterrupted(tmp_path, tok, k, kw):
    a, b = _resume_pair(tmp_path, tok, k, **kw)
    assert a.state.global_step == b.state.global_step == k + 3
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=n)
    oa, ga, ta = _opt_state(a)
    ob, gb, tb = _opt_state(b)
    assert gb == ga
    assert oa.skipped_steps == ob.skipped_steps == 0
    for (sa, ma, va), (sb, mb, vb) in zip(ta, tb):
        assert sa == sb == k + 3
        torch.testing.assert_close(mb, ma, atol=1e-6, rtol=0)
        torch.testing.assert_close(vb, va, atol=1e-9, rtol=0)
    if kw.get("num_iterations"):
        assert ga[0]["ca_alpha"] < 1.0  # the controller state really had to survive the checkpoint
    # the resumed run restored TRL's micro-step counter with the checkpoint
    assert a._step == b._step == k + 3


def test_trl_resume_mid_generation_buffer_is_exact(tmp_path, tok):
    """Resuming between two generations (k * GA not a multiple of steps_per_generation *
    num_iterations): TRL 1.16 keeps its buffered completions and micro-step counter ``_step`` only
    in memory and would regenerate the pending replay; GRPOFixTrainer checkpoints both, so the
    resumed run replays the same completions at the same window positions."""
    a, b = _resume_pair(tmp_path, tok, 3, num_iterations=2)
    assert a._step == b._step == 6  # the counter was restored, not restarted
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=n)
    _, ga, _ = _opt_state(a)
    _, gb, _ = _opt_state(b)
    assert gb == ga


def _torchrun_resume_worker(run_dir, out, resume=None):
    cmd = torchrun(2) + [os.path.join(HERE, "dist", "trl_resume_worker.py"), str(run_dir), str(out)]
    cmd += [str(resume)] if resume else []
    run_worker(cmd, launch_env(), f"{out}.rank1", REPO, timeout=400)
    return [json.loads(open(f"{out}.rank{r}").read()) for r in (0, 1)]


@pytest.mark.distributed
def test_trl_resume_two_ranks_mid_buffer_is_exact(tmp_path):
    """2 DDP ranks (gloo), checkpoint between two generations: each rank saves and restores its
    own generation buffer and micro-step counter, so the resumed run ends where the uninterrupted
    one ends (parameters, controller state, buffers), on both ranks."""
    full = _torchrun_resume_worker(tmp_path / "a", tmp_path / "full.json")
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert (ckpt / "grpo_fix_generation_buffer_rank0.pt").exists()
    assert (ckpt / "grpo_fix_generation_buffer_rank1.pt").exists()
    resumed = _torchrun_resume_worker(tmp_path / "b", tmp_path / "resumed.json", resume=ckpt)
    assert full[0]["buffer_ids"] != full[1]["buffer_ids"]  # the ranks' buffers differ: both must be saved
    for a, b in zip(full, resumed):
        assert a["world"] == b["world"] == 2
        assert a["global_step"] == b["global_step"] == 6
        assert a["micro_step"] == b["micro_step"] == 12
        assert b["buffer_ids"] == a["buffer_ids"]
        assert b["ca_alpha"] == a["ca_alpha"] and b["ca_kappa"] == a["ca_kappa"]
        assert b["adam_steps"] == a["adam_steps"] == [6.0]
        torch.testing.assert_close(torch.tensor(b["params"]), torch.tensor(a["params"]), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(full[1]["params"]), torch.tensor(full[0]["params"]), atol=0, rtol=0)
