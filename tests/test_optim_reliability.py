"""ClipAwareAdamW's reliability guarantees (issue 14: alpha floor, add_param_group, exception-safe
backtrack, per-element finiteness), each a regression test written against the public API only
(``from grpo_fix import ClipAwareAdamW, TrustRegionSignal``), so it also runs on older releases.

- a persistent overshoot (a sampler/trainer log-prob mismatch, ``tau=0``) for 2,000 windows on
  every update path: alpha stops at its floor, parameters stay finite, the user is warned once
  and ``last_stats["stuck_windows"]`` counts the windows;
- ``add_param_group`` (progressive unfreezing) gives the new group the optimizer's current alpha,
  and ``load_state_dict`` works after it;
- a backtrack whose re-measure is non-finite undoes the step and counts it as skipped
  (``nonfinite="skip"``) or raises ``FloatingPointError``; any other exception in the update or
  the re-measure restores parameters and optimizer state before it propagates;
- finite gradients are never treated as non-finite (fp16 norms above 65,504, fp32 elements near
  1e19), in the optimizer and in ``HealthMonitor``; sparse gradients get an error naming the
  parameter.
"""

from __future__ import annotations

import copy
import math
import os
import warnings

import pytest
import torch

from grpo_fix import ClipAwareAdamW, TrustRegionSignal
from grpo_fix.health import HealthMonitor

ALPHA_MIN = 1e-3  # the documented default floor


def sig(overshoot=0.0, eligible=100.0, active=1.0, total=1.0):
    t = lambda x: torch.tensor(float(x), dtype=torch.float64)  # noqa: E731
    return TrustRegionSignal(t(active), t(total), t(eligible), t(eligible), t(0), t(overshoot), t(0))


def _triton_ok() -> bool:
    try:
        from grpo_fix.kernels.adamw_step import triton_available
    except ImportError:
        return False
    return triton_available() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


IMPLS = {
    "single": dict(foreach=False),
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),
    "triton": dict(backend="triton"),
}
TRITON_MARK = pytest.mark.skipif(not _triton_ok(), reason="needs triton with CUDA or TRITON_INTERPRET=1")


def state_snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_state_equal(opt, params, snap, *, skipped=0):
    ps, sd = snap
    for p, q in zip(params, ps):
        assert torch.equal(p.detach(), q)
    now = opt.state_dict()
    assert now["state"].keys() == sd["state"].keys()
    for k, st in sd["state"].items():
        for key, v in st.items():
            assert torch.equal(now["state"][k][key], v) if torch.is_tensor(v) else now["state"][k][key] == v, key
    for g_now, g_then in zip(now["param_groups"], sd["param_groups"]):
        assert g_now.get("ca_skipped", 0) == g_then.get("ca_skipped", 0) + skipped
        assert g_now["ca_alpha"] == g_then["ca_alpha"]


# ------------------------------------------------------------------------------------------------
# 1. alpha has a floor; a stuck controller is reported
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "impl, weight_decay",
    [
        pytest.param(impl, wd, id=f"{impl}-wd{wd}", marks=TRITON_MARK if impl == "triton" else ())
        for impl in IMPLS
        for wd in ((0.01, 0.0) if impl != "triton" else (0.01,))  # the Triton kernel never divided
    ],
)
def test_persistent_overshoot_for_2000_windows_stops_at_the_floor_and_warns(impl, weight_decay):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, generator=gen))]
    opt = ClipAwareAdamW(params, lr=1e-2, weight_decay=weight_decay, **IMPLS[impl])
    alphas, stuck = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2000):
            opt.observe(sig(overshoot=50))  # half the eligible tokens overshoot, every window
            params[0].grad = torch.randn(64, generator=gen)
            before = params[0].detach().clone()
            opt.step()
            alphas.append(opt.alpha)
            stuck.append(opt.last_stats.get("stuck_windows"))
    assert torch.isfinite(params[0]).all()
    assert min(alphas) == ALPHA_MIN and alphas[-1] == ALPHA_MIN
    # the step is still lr * alpha_min (first-order: an Adam step is at most ~lr per coordinate)
    moved = (params[0].detach() - before * (1 - 1e-2 * weight_decay)).abs().max()
    assert 0 < float(moved) <= 1e-2 * ALPHA_MIN * 1.5
    stuck_warnings = [w for w in caught if issubclass(w.category, RuntimeWarning) and "floor" in str(w.message)]
    assert len(stuck_warnings) == 1, [str(w.message) for w in caught]
    assert "log-prob" in str(stuck_warnings[0].message) and "tau" in str(stuck_warnings[0].message)
    assert stuck[-1] >= 1990 - 10  # windows at the floor while still overshooting
    opt.observe(sig(overshoot=0))  # the overshoot stops: the controller recovers, the count resets
    assert opt.alpha == pytest.approx(ALPHA_MIN * 1.25) and opt.last_stats["stuck_windows"] == 0


def test_alpha_floor_is_a_setting_and_alpha_in_the_state_dict_never_below_it():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ClipAwareAdamW([p], alpha_min=0.1, tau=0.0)
    for _ in range(10):
        opt.observe(sig(overshoot=1))
    assert opt.alpha == 0.1 and opt.alpha_min == 0.1
    sd = opt.state_dict()
    assert sd["param_groups"][0]["ca_alpha"] == 0.1
    assert sd["param_groups"][0]["ca_stuck"] > 0
    # a checkpoint whose alpha lies below this optimizer's floor (saved by an earlier release that
    # had none) is raised to the floor, with a warning
    sd["param_groups"][0]["ca_alpha"] = 1e-250
    fresh = ClipAwareAdamW([torch.nn.Parameter(torch.zeros(3))], alpha_min=0.01)
    with pytest.warns(RuntimeWarning, match="below the floor"):
        fresh.load_state_dict(sd)
    assert fresh.alpha == 0.01


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(lr=math.inf), "lr"),
        (dict(lr=math.nan), "lr"),
        (dict(eps=math.inf), "eps"),
        (dict(weight_decay=math.inf), "weight_decay"),
        (dict(betas=(1.0, 0.999)), "beta"),
        (dict(betas=(0.9, math.nan)), "beta"),
        (dict(tau=math.nan), "tau"),
        (dict(tau=1.5), "tau"),
        (dict(alpha_min=0.0), "alpha_min"),
        (dict(alpha_min=math.nan), "alpha_min"),
        (dict(alpha_init=1e-4), "alpha_init"),
        (dict(grow=math.inf), "grow"),
        (dict(max_backtracks=-1), "max_backtracks"),
    ],
)
def test_constructor_rejects_invalid_settings_naming_them(kw, match):
    with pytest.raises(ValueError, match=match):
        ClipAwareAdamW([torch.nn.Parameter(torch.zeros(2))], **kw)


def test_step_rejects_a_learning_rate_a_scheduler_made_non_finite():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = ClipAwareAdamW([p])
    opt.param_groups[0]["lr"] = math.nan
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(2))


# ------------------------------------------------------------------------------------------------
# 2. add_param_group
# ------------------------------------------------------------------------------------------------
def test_add_param_group_starts_at_the_current_alpha_and_round_trips():
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))
    opt = ClipAwareAdamW([a], lr=1e-2)
    opt.observe(sig(overshoot=40))  # alpha 0.5
    a.grad = torch.randn(4)
    opt.step()
    opt.add_param_group({"params": [b], "lr": 3e-3})  # progressive unfreezing
    assert opt.param_groups[1]["ca_alpha"] == 0.5
    for _ in range(3):
        opt.observe(sig())
        a.grad, b.grad = torch.randn(4), torch.randn(3)
        opt.step()
    assert opt.param_groups[0]["ca_alpha"] == opt.param_groups[1]["ca_alpha"] == pytest.approx(0.5 * 1.25**3)
    sd = copy.deepcopy(opt.state_dict())
    a2, b2 = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    resumed = ClipAwareAdamW([a2], lr=1e-2)
    resumed.add_param_group({"params": [b2], "lr": 3e-3})
    resumed.load_state_dict(sd)
    for o, ps in ((opt, (a, b)), (resumed, (a2, b2))):
        o.observe(sig(overshoot=10))
        ps[0].grad, ps[1].grad = torch.ones(4), torch.ones(3)
        o.step()
    assert torch.equal(a, a2) and torch.equal(b, b2)


# ------------------------------------------------------------------------------------------------
# 3. backtrack is all or nothing
# ------------------------------------------------------------------------------------------------
def warm_backtracking(nonfinite="skip"):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))]
    opt = ClipAwareAdamW(params, lr=0.1, backtrack=True, nonfinite=nonfinite)
    opt.set_backtrack_fn(lambda: sig())
    for _ in range(2):
        opt.observe(sig(active=0.5))
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.observe(sig(active=0.5))
    return params, opt


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_backtrack_nonfinite_remeasure_undoes_the_step(nonfinite):
    """``"skip"``: the step is undone and counted as skipped; ``"raise"``: undone, then raised."""
    params, opt = warm_backtracking(nonfinite)
    snap = state_snapshot(opt, params)
    opt.set_backtrack_fn(lambda: sig(overshoot=math.nan, total=math.inf))
    expect = (
        pytest.warns(RuntimeWarning, match="non-finite")
        if nonfinite == "skip"
        else pytest.raises(FloatingPointError, match="re-measure")
    )
    with expect:
        opt.step()
    skipped = int(nonfinite == "skip")
    assert opt.skipped_steps == skipped
    assert_state_equal(opt, params, snap, skipped=skipped)


def test_backtrack_exception_midway_restores_parameters_and_state():
    params, opt = warm_backtracking()
    snap = state_snapshot(opt, params)
    calls = []

    def remeasure():  # overshoots once (one halving applied), then runs out of memory
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return sig(overshoot=90)

    opt.set_backtrack_fn(remeasure)
    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step()
    assert len(calls) == 2
    assert_state_equal(opt, params, snap)
    opt.set_backtrack_fn(lambda: sig())  # and the optimizer still works
    opt.step()
    assert not torch.equal(params[0].detach(), snap[0][0])


# ------------------------------------------------------------------------------------------------
# 4. finiteness per element
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype, value",
    [(torch.float16, 60000.0), (torch.float32, 1e19), (torch.bfloat16, 1e19)],
)
@pytest.mark.parametrize("impl", ["single", "foreach", "fused"])
def test_large_finite_gradients_are_applied_not_skipped(dtype, value, impl):
    p = torch.nn.Parameter(torch.ones(100, dtype=dtype))
    q = torch.nn.Parameter(torch.ones(100, dtype=dtype))
    opt = ClipAwareAdamW([p], lr=1e-2, weight_decay=0.0, **IMPLS[impl])
    ref = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.0, **IMPLS[impl])
    p.grad = torch.full((100,), value, dtype=dtype)
    q.grad = p.grad.clone()
    assert not torch.isfinite(torch._foreach_norm([p.grad], 2)[0])  # its L2 norm overflows
    opt.step()
    ref.step()
    assert opt.skipped_steps == 0
    assert torch.equal(p.detach(), q.detach())  # what AdamW does with it (fp16 state: v overflows, no move)
    if dtype != torch.float16:
        assert torch.allclose(p.detach().float(), torch.full((100,), 1 - 1e-2), rtol=1e-2)
    mon = HealthMonitor(mode="raise", every=1)
    mon.check(0, 0, parameters=[p])  # no FloatingPointError: the gradient is finite


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_one_nonfinite_element_among_huge_ones_is_still_caught(bad):
    p = torch.nn.Parameter(torch.ones(100, dtype=torch.float16))
    opt = ClipAwareAdamW([p])
    p.grad = torch.full((100,), 60000.0, dtype=torch.float16)
    p.grad[17] = bad
    opt.step()
    assert opt.skipped_steps == 1 and torch.equal(p.detach(), torch.ones(100, dtype=torch.float16))
    with pytest.raises(FloatingPointError, match="gradient of parameter 0"):
        HealthMonitor(mode="raise", every=1).check(0, 0, parameters=[p])


def test_sparse_gradient_gets_an_error_naming_the_parameter():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    lin = torch.nn.Linear(3, 1)
    opt = ClipAwareAdamW([{"params": lin.parameters()}, {"params": emb.parameters()}])
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\].*sparse"):
        opt.step()
