"""ClipAwareAdamW under DeepSpeed (CPU, gloo, subprocesses) and the DeepSpeed config helper."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from dist_utils import ds_env, run_worker, single_process_env, torchrun

from grpo_fix import ClipAwareAdamW
from grpo_fix.integration.deepspeed import attach_deepspeed, clip_aware_deepspeed_config

WORKER = Path(__file__).parent / "dist" / "ds_clip_aware_worker.py"
SINGLE = ["0:fp32", "1:fp32", "2:fp32", "3:fp32", "0:bf16", "1:bf16", "2:bf16", "3:bf16", "2:fp32:offload"]
TWO_RANK = ["2:fp32", "3:fp32"]


def _run(cmd, env, out: Path, cwd: Path):
    run_worker(cmd, env, out, cwd)
    return {r["config"]: r for r in json.loads(out.read_text())}


@pytest.fixture(scope="module")
def single_results(tmp_path_factory):
    pytest.importorskip("deepspeed")
    d = tmp_path_factory.mktemp("ds1")
    out = d / "out.json"
    return _run([sys.executable, str(WORKER), str(out), ",".join(SINGLE)], single_process_env(), out, d)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    pytest.importorskip("deepspeed")
    d = tmp_path_factory.mktemp("ds2")
    out = d / "out.json"
    cmd = torchrun(2) + [str(WORKER), str(out), ",".join(TWO_RANK)]
    return _run(cmd, ds_env(), out, d)


def _check(rec, *, stage, dtype, world):
    assert "error" not in rec, rec.get("tb", rec.get("error"))
    assert rec["world"] == world
    # final fp32 parameters equal the non-distributed ClipAwareAdamW reference
    assert rec["max_diff"] <= 1e-5
    # every stepped tensor got exactly one step per engine step (+1 for the bf16 wrapper's init step)
    assert rec["steps_in_state"] == [6.0 if (stage == 0 and dtype == "bf16") else 5.0]
    assert rec["step_calls_per_engine_step"] == (1.0 if stage == 0 else 2.0)  # ZeRO: once per group
    # kappa/alpha on every rank equal the reference's (computed from the summed signal)
    for stats in rec["stats_per_rank"]:
        assert sum(stats, []) == pytest.approx(sum(rec["ref_stats"], []), rel=1e-12)
    alphas = [a for _, a in rec["ref_stats"]]
    assert alphas == pytest.approx([1.0, 0.5, 0.625, 0.5, 0.625])  # shrink, grow, reset at step 3, grow
    assert rec["ds"]["stage"] == stage
    # a NaN gradient: skipped (by ZeRO's overflow check inside the engine, or by our step at
    # stage 0), counted once in skipped_steps on every rank, nothing moved
    for nan_step in rec["nan_step_per_rank"]:
        assert nan_step["skipped"] == 1 and nan_step["moved"] == 0.0, nan_step
        if stage > 0:
            assert nan_step["engine_skipped"] == 1 and not nan_step["our_step_called"], nan_step


@pytest.mark.parametrize("spec", SINGLE)
def test_deepspeed_single_process_matches_reference(single_results, spec):
    parts = spec.split(":")
    rec = single_results[spec]
    _check(rec, stage=int(parts[0]), dtype=parts[1], world=1)
    if spec.endswith("offload"):
        assert rec["ds"]["offload"] is True
    if spec == "0:fp32":  # the stepped tensors are the model's parameters: backtrack possible
        assert rec["ds"]["refuse_backtrack"] is None
    else:
        assert "backtrack=True" in rec["ds"]["refuse_backtrack"]


@pytest.mark.distributed
@pytest.mark.parametrize("spec", TWO_RANK)
def test_deepspeed_two_ranks_match_reference_and_agree(two_rank_results, spec):
    rec = two_rank_results[spec]
    _check(rec, stage=int(spec[0]), dtype="fp32", world=2)
    r0, r1 = rec["stats_per_rank"]
    assert r0 == r1  # bitwise identical kappa and alpha on both ranks
    # ...although the ranks' local signals differ (without the all-reduce they would disagree)
    sys.path.insert(0, str(WORKER.parent))
    try:
        from ds_clip_aware_worker import local_signal
    finally:
        sys.path.pop(0)
    assert float(local_signal(0, 0).kappa) != float(local_signal(1, 0).kappa)
    assert float(local_signal(0, 1).overshoot_fraction) > 0.02 >= float(local_signal(1, 1).overshoot_fraction)


# --------------------------------------------------------------------------------------------
# config helper and attach (no DeepSpeed process needed)
# --------------------------------------------------------------------------------------------
def test_config_helper_completes_and_validates():
    base = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}
    cfg = clip_aware_deepspeed_config(base)
    assert cfg["zero_allow_untested_optimizer"] is True
    assert "zero_force_ds_cpu_optimizer" not in cfg
    assert "zero_allow_untested_optimizer" not in base  # input untouched

    off = {
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
        "zero_force_ds_cpu_optimizer": True,
    }
    cfg = clip_aware_deepspeed_config(off)
    assert cfg["zero_force_ds_cpu_optimizer"] is False and cfg["zero_allow_untested_optimizer"] is True

    cfg = clip_aware_deepspeed_config(base, offload=True)
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    none_dev = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}}
    assert "zero_force_ds_cpu_optimizer" not in clip_aware_deepspeed_config(none_dev)


@pytest.mark.parametrize(
    "cfg, kw, match",
    [
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, {}, "remove it"),
        ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.3}}}, {}, "ratio"),
        ({"zero_optimization": {"stage": 0}}, {"offload": True}, "stage >= 1"),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, {"offload": False}, "none"),
    ],
)
def test_config_helper_errors(cfg, kw, match):
    with pytest.raises(ValueError, match=match):
        clip_aware_deepspeed_config(cfg, **kw)


def fake_engine(opt, stage=0, bf16=False):
    return SimpleNamespace(
        basic_optimizer=opt,
        zero_optimization_stage=lambda: stage,
        bfloat16_enabled=lambda: bf16,
        fp16_enabled=lambda: False,
        data_parallel_group=None,
        seq_data_parallel_group=None,
        zero_cpu_offload=lambda: False,
    )


def test_attach_detects_swapped_optimizer():
    ours = ClipAwareAdamW([torch.nn.Parameter(torch.zeros(2))])
    stock = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(RuntimeError, match="zero_force_ds_cpu_optimizer") as e:
        attach_deepspeed(ours, fake_engine(stock))
    assert "optimizer_cls_and_kwargs" in str(e.value) and "AdamW" in str(e.value)
    with pytest.raises(TypeError):
        attach_deepspeed(stock, fake_engine(stock))
    assert attach_deepspeed(ours, fake_engine(ours)) is ours
    assert ours._deepspeed["stage"] == 0 and ours._deepspeed["refuse_backtrack"] is None


@pytest.mark.parametrize("stage, bf16", [(2, False), (3, False), (0, True)])
def test_attach_refuses_backtrack_under_zero_or_low_precision(stage, bf16):
    opt = ClipAwareAdamW([torch.nn.Parameter(torch.zeros(2))], backtrack=True)
    with pytest.raises(ValueError, match=r"backtrack=True\) is not supported under DeepSpeed"):
        attach_deepspeed(opt, fake_engine(opt, stage=stage, bf16=bf16))
    plain = ClipAwareAdamW([torch.nn.Parameter(torch.zeros(2))])
    attach_deepspeed(plain, fake_engine(plain, stage=stage, bf16=bf16))
    with pytest.raises(RuntimeError, match="backtrack"):
        plain.set_backtrack_fn(lambda: None)


# ------------------------------------------------------------------------------------------------
# Loop checks of attach_deepspeed (issue 15 item 7): double accumulation scaling, stale signal
# ------------------------------------------------------------------------------------------------
class LoopEngine:
    """DeepSpeed's engine as a hand-written loop sees it: backward scales by 1/GA unless told not
    to; step() steps the optimizer at the accumulation boundary only."""

    def __init__(self, opt, ga):
        self.basic_optimizer, self.ga, self.micro_steps = opt, ga, 0
        for name, value in vars(fake_engine(opt)).items():
            if name != "basic_optimizer":
                setattr(self, name, value)

    def gradient_accumulation_steps(self):
        return self.ga

    def is_gradient_accumulation_boundary(self):
        return (self.micro_steps + 1) % self.ga == 0

    def backward(self, loss, retain_graph=False, scale_wrt_gas=True):
        (loss / self.ga if scale_wrt_gas else loss).backward(retain_graph=retain_graph)

    def step(self):
        if self.is_gradient_accumulation_boundary():
            self.basic_optimizer.step()
            self.basic_optimizer.zero_grad()
        self.micro_steps += 1


def _window_loop(ga, *, window_tokens, scale_wrt_gas, observe_after_step=False, windows=2):
    from grpo_fix import GroupSurrogateLoss, SignalAccumulator, Window

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 6))
    opt = ClipAwareAdamW([w], lr=1e-2)
    engine = LoopEngine(opt, ga)
    attach_deepspeed(opt, engine)
    loss_fn = GroupSurrogateLoss("uniform")
    x, adv = torch.randn(ga, 2, 4), torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 6, dtype=torch.bool)
    window = Window(tokens=int(mask.sum()) * ga if window_tokens else None)
    signals = SignalAccumulator()
    for _ in range(windows):
        for j in range(ga):
            logp = torch.log_softmax(x[j] @ w, -1)
            out = loss_fn(logp, logp.detach(), adv, mask, group_size=None, window=window)
            signals.add(out.signal)
            if j == ga - 1 and not observe_after_step:
                opt.observe(signals.take())
            engine.backward(out.loss, scale_wrt_gas=scale_wrt_gas)
            engine.step()
            if j == ga - 1 and observe_after_step:
                opt.observe(signals.take())
    return opt


def test_loop_checks_refuse_double_accumulation_scaling():
    with pytest.raises(ValueError, match=r"scale_wrt_gas=False"):
        _window_loop(2, window_tokens=True, scale_wrt_gas=True)
    _window_loop(2, window_tokens=True, scale_wrt_gas=False)  # the right call
    _window_loop(2, window_tokens=False, scale_wrt_gas=True)  # per-call means: DeepSpeed's scaling is right
    _window_loop(1, window_tokens=True, scale_wrt_gas=True)  # nothing to accumulate


def test_loop_checks_refuse_a_stale_signal():
    with pytest.raises(RuntimeError, match=r"stale trust-region signal.*observe\(\) after\s+engine.step\(\)"):
        _window_loop(3, window_tokens=True, scale_wrt_gas=False, observe_after_step=True, windows=3)
    opt = _window_loop(3, window_tokens=True, scale_wrt_gas=False, windows=3)
    assert opt.last_stats["kappa"] == pytest.approx(1.0)


def test_loop_checks_are_installed_once_and_not_on_engines_without_a_loop():
    opt = ClipAwareAdamW([torch.nn.Parameter(torch.zeros(2))])
    engine = LoopEngine(opt, 2)
    attach_deepspeed(opt, engine)
    backward = engine.backward
    attach_deepspeed(opt, engine)
    assert engine.backward is backward
    plain = ClipAwareAdamW([torch.nn.Parameter(torch.zeros(2))])
    attach_deepspeed(plain, fake_engine(plain))
    assert plain._deepspeed.get("loop") is None
