"""GRPOFixTrainer._compute_loss against TRL 1.16's own ``GRPOTrainer._compute_loss``, called on the
same trainer and the same buffered micro-batches: value and gradients of every model parameter,
and TRL's metrics, for every TRL loss type x every vLLM importance-sampling mode x entropy mask
on/off, over a window of gradient accumulation, also with ``steps_per_generation != GA``; the
entropy bonus (static and adaptive); and, on-policy (ratio 1), the trust-region signal reports no
overshoot for every one of them (issue: TRL's cispo with its default ``epsilon_high``).

vLLM cannot run here: the generation batch carries ``sampling_per_token_logps`` and the
``importance_sampling_ratio`` computed from them exactly as TRL's
``_generate_and_score_completions`` does, and the trainer's vLLM attributes are set as TRL sets
them from the config (TRL's ``__init__`` would start a vLLM client).
"""

from __future__ import annotations

import math
import os
import sys
from collections import defaultdict

import pytest
import torch

pytest.importorskip("trl")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import trl  # noqa: E402
from tiny_trl import TRAINER_BASE, build_dataset, build_model, build_tokenizer, fixed_generation, reward_len  # noqa: E402

from grpo_fix.integration.trl import GRPOFixConfig, GRPOFixTrainer  # noqa: E402

TRL_LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo"]
IS_MODES = [None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
CLIP_MIN, CLIP_MAX = 0.5, 2.0
#: TRL's metrics of a micro-batch that GRPOFixTrainer logs under the same name and meaning.
SHARED_METRICS = (
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
    "cispo_clip_ratio",
    "vespo/phi_seq_mean",
    "entropy",
    "kl",
    "policy_loss",
    "entropy_coef",
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def with_vllm_inputs(batch: dict, mode: str | None, seed: int) -> dict:
    """``batch`` plus what TRL's generation adds under vLLM with IS correction ``mode``: the
    sampler's log-probs and TRL's importance weight from them (truncated or masked to
    [CLIP_MIN, CLIP_MAX], per token or per sequence)."""
    if mode is None:
        return batch
    g = torch.Generator().manual_seed(seed)
    old, mask = batch["old_per_token_logps"], batch["completion_mask"]
    sampling = old + 0.4 * torch.randn(old.shape, generator=g)
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        ratio = torch.clamp(ratio, min=CLIP_MIN, max=CLIP_MAX)
    else:
        ratio = ratio.masked_fill((ratio < CLIP_MIN) | (ratio > CLIP_MAX), 0.0)
    return dict(batch, sampling_per_token_logps=sampling, importance_sampling_ratio=ratio)


def full_masks(batch: dict) -> dict:
    """Every completion of full length: every window has the same token count, so TRL's mean-window
    normaliser (``spg != GA``) equals the exact one and the two losses can be compared."""
    mask = torch.ones_like(batch["completion_mask"])
    return dict(batch, completion_mask=mask, num_items_in_batch=mask.sum())


def make_trainer(tmp_path, tok, model=None, **kw):
    args = GRPOFixConfig(
        output_dir=str(tmp_path),
        **{**TRAINER_BASE, "use_cpu": True, "prefix_consistent": False, "per_device_train_batch_size": 4, **kw},
    )
    return GRPOFixTrainer(
        model=build_model(tok, seed=0) if model is None else model,
        reward_funcs=reward_len,
        args=args,
        train_dataset=build_dataset(),
        processing_class=tok,
    )


def set_vllm(trainer, mode):
    """The attributes TRL's ``__init__`` sets from ``use_vllm=True`` and the IS options."""
    trainer.use_vllm = mode is not None
    trainer.vllm_importance_sampling_correction = True
    trainer.vllm_importance_sampling_mode = mode
    trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max = CLIP_MIN, CLIP_MAX


def window_inputs(trainer, monkeypatch, batch, window: int = 0):
    """Generate (the fixed ``batch``) and buffer as GRPOFixTrainer does; the micro-batches of
    optimizer window ``window``, with the micro-steps they run at."""
    monkeypatch.setattr(trl.GRPOTrainer, "_generate_and_score_completions", lambda self, _: dict(batch))
    trainer.model.train()
    ga = trainer.args.gradient_accumulation_steps
    trainer.current_gradient_accumulation_steps = ga
    trainer._gf_buffer.generations.clear()
    trainer._gf_plan = None
    steps = list(range(window * ga, (window + 1) * ga))
    inputs = []
    for k in steps:
        trainer._step = k
        inputs.append(trainer._prepare_inputs([{"prompt": "unused"}]))
    return steps, inputs


_CONTROLLER = ("entropy_coef", "_last_world_entropy", "_entropy_window_stats")


def run_window(trainer, compute_loss, steps, inputs):
    """Run ``compute_loss`` (ours or TRL's) over one window from the same controller state:
    (summed loss, gradients, last value of each metric, controller state after)."""
    start = {a: getattr(trainer, a) for a in _CONTROLLER}
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    total = 0.0
    for k, batch in zip(steps, inputs):
        trainer._step = k
        trainer.accelerator.gradient_state._set_sync_gradients(k == steps[-1])
        loss = compute_loss(trainer, trainer.model, batch)
        loss.backward()
        total += float(loss)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    after = {a: getattr(trainer, a) for a in _CONTROLLER}
    for a, v in start.items():
        setattr(trainer, a, v)
    return total, grads, logged, after


def assert_parity(trainer, steps, inputs, *, value_tol=1e-6):
    ours = run_window(trainer, GRPOFixTrainer._compute_loss, steps, inputs)
    theirs = run_window(trainer, trl.GRPOTrainer._compute_loss, steps, inputs)
    (l_ours, g_ours, m_ours, c_ours), (l_trl, g_trl, m_trl, c_trl) = ours, theirs
    assert abs(l_ours - l_trl) <= value_tol * max(1.0, abs(l_trl)), (l_ours, l_trl)
    assert g_ours.keys() == g_trl.keys() and g_trl
    assert max(float(g.abs().max()) for g in g_trl.values()) > 1e-4  # the inputs really train
    for n in g_trl:
        torch.testing.assert_close(g_ours[n], g_trl[n], rtol=1e-6, atol=1e-7, msg=n)
    shared = [k for k in SHARED_METRICS if k in m_trl]
    for key in shared:
        if math.isnan(m_trl[key]):
            assert math.isnan(m_ours[key]), key
        else:
            assert m_ours[key] == pytest.approx(m_trl[key], rel=1e-5, abs=1e-7), key
    assert c_ours["entropy_coef"] == pytest.approx(c_trl["entropy_coef"])
    return m_ours


def assert_on_policy_no_overshoot(trainer, steps, inputs):
    """Ratio 1 (no old log-probs): no token counts as past the trust region, nothing is clipped."""
    on_policy = [{k: v for k, v in b.items() if k != "old_per_token_logps"} for b in inputs]
    _, _, logged, _ = run_window(trainer, GRPOFixTrainer._compute_loss, steps, on_policy)
    assert logged["grpo_fix/overshoot_fraction"] == 0.0
    assert logged["grpo_fix/max_excess"] == 0.0
    assert logged["grpo_fix/kappa"] == 1.0


@pytest.mark.parametrize("entropy_mask", [False, True], ids=["all_tokens", "entropy_mask"])
@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_matches_trl_for_every_vllm_mode(loss_type, entropy_mask, tmp_path, tok, monkeypatch):
    """GA 2 = steps_per_generation, ragged completions, TRL's default epsilon/epsilon_high."""
    trainer = make_trainer(
        tmp_path,
        tok,
        loss_type=loss_type,
        gradient_accumulation_steps=2,
        top_entropy_quantile=0.5 if entropy_mask else 1.0,
    )
    for i, mode in enumerate(IS_MODES):
        if loss_type == "vespo" and mode is not None and mode.startswith("sequence"):
            continue  # TRL refuses it at construction (VESPO takes token weights only)
        set_vllm(trainer, mode)
        batch = with_vllm_inputs(fixed_generation(tok, n_rows=8, seed=11 + i), mode, seed=i)
        steps, inputs = window_inputs(trainer, monkeypatch, batch)
        assert_parity(trainer, steps, inputs)
        assert_on_policy_no_overshoot(trainer, steps, inputs)


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_matches_trl_when_spg_differs_from_ga(loss_type, tmp_path, tok, monkeypatch):
    """steps_per_generation 4, GA 2: two windows per generation batch (the second replays nothing
    but runs after a step in TRL's schedule), token-level vLLM weights and the entropy mask."""
    trainer = make_trainer(
        tmp_path,
        tok,
        loss_type=loss_type,
        gradient_accumulation_steps=2,
        steps_per_generation=4,
        top_entropy_quantile=0.5,
    )
    set_vllm(trainer, "token_truncate")
    batch = with_vllm_inputs(full_masks(fixed_generation(tok, n_rows=16, seed=5)), "token_truncate", seed=5)
    for window in (0, 1):
        steps, inputs = window_inputs(trainer, monkeypatch, batch, window)
        assert_parity(trainer, steps, inputs)


@pytest.mark.parametrize(
    "loss_type,extra",
    [
        ("grpo", dict(importance_sampling_level="sequence")),
        ("sapo", dict(importance_sampling_level="sequence")),
        ("luspo", dict(importance_sampling_level="sequence")),
        ("bnpo", dict(importance_sampling_level="sequence")),
        ("dapo", dict(delta=1.5, epsilon_high=0.28)),
        ("cispo", dict(epsilon_high=5.0)),
        ("vespo", dict(vespo_k_pos=1.5, vespo_lambda_neg=2.5)),
        ("sapo", dict(sapo_temperature_pos=0.7, sapo_temperature_neg=1.3)),
        ("dapo", dict(off_policy_mask_threshold=0.05)),
        ("grpo", dict(off_policy_mask_threshold=0.05)),
    ],
)
def test_matches_trl_for_loss_options(loss_type, extra, tmp_path, tok, monkeypatch):
    """TRL's other loss options, with vLLM's token weights (the off-policy mask then measures
    against the sampler's log-probs, as TRL does)."""
    trainer = make_trainer(tmp_path, tok, loss_type=loss_type, gradient_accumulation_steps=2, **extra)
    set_vllm(trainer, "token_mask")
    batch = with_vllm_inputs(fixed_generation(tok, n_rows=8, seed=7), "token_mask", seed=7)
    steps, inputs = window_inputs(trainer, monkeypatch, batch)
    assert_parity(trainer, steps, inputs)
    assert_on_policy_no_overshoot(trainer, steps, inputs)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo", "dr_grpo", "luspo"])
def test_matches_trl_with_kl(loss_type, tmp_path, tok, monkeypatch):
    from tiny_trl import save_tiny

    path = save_tiny(str(tmp_path / "tiny"))
    trainer = make_trainer(tmp_path, tok, model=path, loss_type=loss_type, beta=0.04, gradient_accumulation_steps=2)
    set_vllm(trainer, None)
    steps, inputs = window_inputs(trainer, monkeypatch, fixed_generation(tok, n_rows=8, seed=9, beta=True))
    logged = assert_parity(trainer, steps, inputs)
    assert "kl" in logged


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "luspo"])
@pytest.mark.parametrize("entropy_mask", [False, True], ids=["all_tokens", "entropy_mask"])
def test_static_entropy_bonus_matches_trl(loss_type, entropy_mask, tmp_path, tok, monkeypatch):
    """The bonus - coef * mean H (TRL's per-micro-batch mean over the masked tokens, / GA)."""
    trainer = make_trainer(
        tmp_path,
        tok,
        loss_type=loss_type,
        gradient_accumulation_steps=2,
        entropy_coef=0.05,
        top_entropy_quantile=0.5 if entropy_mask else 1.0,
    )
    set_vllm(trainer, None)
    steps, inputs = window_inputs(trainer, monkeypatch, fixed_generation(tok, n_rows=8, seed=13))
    logged = assert_parity(trainer, steps, inputs)
    assert logged["entropy_coef"] == 0.05 and "policy_loss" in logged


@pytest.mark.parametrize("target", [0.0, 100.0], ids=["entropy_above_target", "entropy_below_target"])
def test_adaptive_entropy_matches_trl_over_windows(target, tmp_path, tok, monkeypatch):
    """The adaptive controller: the same coefficient applied, and the same update at every window
    end (measured over the whole window's tokens), over three windows of GA 2."""
    trainer = make_trainer(
        tmp_path,
        tok,
        loss_type="dapo",
        gradient_accumulation_steps=2,
        steps_per_generation=2,
        use_adaptive_entropy=True,
        entropy_coef=0.01,
        entropy_target=target,
        entropy_coef_delta=0.005,
    )
    set_vllm(trainer, None)
    coefs = []
    for window in range(3):
        steps, inputs = window_inputs(trainer, monkeypatch, fixed_generation(tok, n_rows=8, seed=20 + window), window)
        assert_parity(trainer, steps, inputs)
        _, _, _, after = run_window(trainer, GRPOFixTrainer._compute_loss, steps, inputs)
        for attr, value in after.items():  # keep our controller's step, as training would
            setattr(trainer, attr, value)
        coefs.append(trainer.entropy_coef)
    expect = [0.005, 0.0, 0.0] if target == 0.0 else [0.015, 0.02, 0.025]
    assert coefs == pytest.approx(expect)


def test_window_entropy_weighting_is_exact_under_accumulation(tmp_path, tok, monkeypatch):
    """``entropy_weighting="window"`` (the ``uniform`` default): the bonus's gradient over a window
    does not depend on how the window is split into micro-batches."""
    batch = fixed_generation(tok, n_rows=8, seed=17)
    grads = {}
    for ga in (1, 2):
        trainer = make_trainer(
            tmp_path / str(ga),
            tok,
            loss_type="uniform",
            per_device_train_batch_size=8 // ga,
            gradient_accumulation_steps=ga,
            entropy_coef=0.5,
        )
        assert trainer.surrogate.config.entropy_weighting == "window"
        steps, inputs = window_inputs(trainer, monkeypatch, batch)
        _, grads[ga], _, _ = run_window(trainer, GRPOFixTrainer._compute_loss, steps, inputs)
    for n in grads[1]:
        torch.testing.assert_close(grads[2][n], grads[1][n], rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize("loss_type", ["uniform", *TRL_LOSS_TYPES])
def test_on_policy_training_reports_no_overshoot(loss_type, tmp_path, tok):
    """Real generation, TRL's defaults (cispo caps at epsilon_high = epsilon = 0.2): on-policy
    windows never count as overshoot, so the controller's alpha stays 1."""
    trainer = make_trainer(tmp_path, tok, loss_type=loss_type, max_steps=2, clip_aware_alpha_init=1.0)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["grpo_fix/overshoot_fraction"] for h in logs] == [0.0, 0.0]
    assert [h["clip_aware/alpha"] for h in logs] == [1.0, 1.0]
