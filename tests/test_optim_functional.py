"""The optimizer room's pieces on their own: the functional update ``clip_aware_adamw`` on every
implementation against the float64 torch reference, the controller's rule ``next_alpha``, and
the constructor's deprecated ``kernel=`` spelling."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch.optim.adam import adam as torch_adam

from grpo_fix import ClipAwareAdamW
from grpo_fix.kernels.adamw_step import triton_available
from grpo_fix.kernels.reference import adamw_step_reference
from grpo_fix.optim import clip_aware_adamw
from grpo_fix.optim.controller import next_alpha, next_stuck

HYPER = dict(lr=3e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
SIZES = (3000, 5, 1024, 1)

needs_triton = pytest.mark.skipif(
    not triton_available() or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton with CUDA or TRITON_INTERPRET=1",
)
IMPLS = {
    "single": dict(backend="torch", foreach=False),
    "foreach": dict(backend="torch", foreach=True),
    "fused": dict(backend="torch", fused=True),
    "triton": dict(backend="triton"),
}
IMPL_PARAMS = [pytest.param(k, marks=needs_triton) if k == "triton" else k for k in IMPLS]


def tensors(dtype=torch.float32, seed=0, device="cpu"):
    """Parameters, gradients and a warm Adam state (steps 0, 3, 7, 0)."""
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(n, generator=gen).to(dtype).to(device) for n in SIZES]
    gs = [torch.randn(n, generator=gen).to(dtype).to(device) for n in SIZES]
    ms = [torch.randn(n, generator=gen).mul(0.1).to(dtype).to(device) for n in SIZES]
    vs = [torch.rand(n, generator=gen).mul(0.1).to(dtype).to(device) for n in SIZES]
    steps = [torch.tensor(float(s)) for s in (0, 3, 7, 0)]
    return ps, gs, ms, vs, steps


def oracle(ps, gs, ms, vs, steps, *, alpha, kappa, m_scales, maximize=False):
    out = []
    for p, g, m, v, st, s in zip(ps, gs, ms, vs, steps, m_scales):
        p, g, m, v = (x.detach().double().cpu().clone() for x in (p, g, m, v))
        adamw_step_reference(p, g, m, v, int(st) + 1, alpha=alpha, m_scale=kappa * s, maximize=maximize, **HYPER)
        out.append((p, m, v))
    return out


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("alpha, kappa, maximize", [(1.0, 1.0, False), (0.25, 0.6, False), (0.5, 0.0, True)])
def test_functional_matches_float64_reference(impl, alpha, kappa, maximize):
    ps, gs, ms, vs, steps = tensors()
    m_scales = [1.0, 0.5, 1.0, 0.25]
    refs = oracle(ps, gs, ms, vs, steps, alpha=alpha, kappa=kappa, m_scales=m_scales, maximize=maximize)
    stored = clip_aware_adamw(
        ps, gs, ms, vs, steps, alpha=alpha, kappa=kappa, m_scales=m_scales, maximize=maximize, **HYPER, **IMPLS[impl]
    )
    assert [float(s) for s in steps] == [1.0, 4.0, 8.0, 1.0]
    if impl != "fused" or (alpha, kappa) == (1.0, 1.0) and m_scales == [1.0] * 4:
        assert stored == [1.0] * 4  # only torch's fused CPU kernel keeps the first moment scaled
    for p, m, v, s, (rp, rm, rv) in zip(ps, ms, vs, stored, refs):
        assert rel_err(p, rp) <= 1e-6 and rel_err(m * s, rm) <= 1e-6 and rel_err(v, rv) <= 1e-6


@pytest.mark.parametrize("impl", ["single", "foreach", "fused"])
def test_functional_without_gate_or_controller_is_torch_adamw_bit_for_bit(impl):
    ours, ref = tensors(), tensors()
    kw = IMPLS[impl]
    clip_aware_adamw(*ours, **HYPER, **kw)
    p, g, m, v, st = ref
    torch_adam(
        p,
        g,
        m,
        v,
        [],
        st,
        foreach=kw.get("foreach"),
        fused=kw.get("fused"),
        amsgrad=False,
        maximize=False,
        decoupled_weight_decay=True,
        beta1=HYPER["beta1"],
        beta2=HYPER["beta2"],
        lr=HYPER["lr"],
        weight_decay=HYPER["weight_decay"],
        eps=HYPER["eps"],
    )
    for a, b in zip(ours, ref):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_functional_rejects_mismatched_lists_and_ineligible_triton():
    ps, gs, ms, vs, steps = tensors()
    with pytest.raises(ValueError, match="same length"):
        clip_aware_adamw(ps, gs[:2], ms, vs, steps, **HYPER)
    with pytest.raises(ValueError, match="backend='triton'"):
        clip_aware_adamw(ps, gs, ms, vs, steps, amsgrad=True, max_exp_avg_sqs=vs, backend="triton", **HYPER)
    clip_aware_adamw([], [], [], [], [], **HYPER)  # nothing to do


def test_next_alpha_rule_and_floor():
    kw = dict(tau=0.05, shrink=0.5, grow=1.25, alpha_min=0.3)
    assert next_alpha(0.8, 0.06, informative=True, **kw) == pytest.approx(0.4)
    assert next_alpha(0.8, 0.05, informative=True, **kw) == 1.0  # f == tau is not above tau
    assert next_alpha(0.4, 0.0, informative=True, **kw) == pytest.approx(0.5)
    assert next_alpha(0.4, 0.0, informative=False, **kw) == 0.4  # nothing measured: held
    assert next_alpha(0.4, 0.9, informative=True, **kw) == 0.3  # the floor


def test_next_stuck_counts_overshooting_windows_at_the_floor():
    kw = dict(tau=0.05, alpha_min=0.3)
    assert next_stuck(0, 0.3, 0.5, informative=True, **kw) == 1
    assert next_stuck(4, 0.3, 0.5, informative=True, **kw) == 5
    assert next_stuck(4, 0.6, 0.5, informative=True, **kw) == 0  # above the floor: shrinking works
    assert next_stuck(4, 0.3, 0.0, informative=False, **kw) == 4  # nothing measured: held
    assert next_stuck(4, 0.3, 0.0, informative=True, **kw) == 0  # within the bound: recovered


def test_kernel_keyword_is_deprecated_for_backend():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.warns(DeprecationWarning, match=r"kernel='torch'.*backend='torch'"):
        opt = ClipAwareAdamW(p, kernel="torch")
    assert opt.backend == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        ClipAwareAdamW(p, backend="cuda")


def test_fused_cpu_kernel_keeps_the_first_moment_lazily_scaled_and_saves_adamw_moments():
    """torch's fused kernel has one coefficient for m: the gate keeps exp_avg scaled by
    state['ca_m_scale'] (no extra pass); state_dict() folds the scale in, so the checkpoint holds
    the moments the foreach path holds, and a run that saves continues like one that resumes."""
    from grpo_fix import TrustRegionSignal

    def sig(i):
        t = lambda x: torch.tensor(float(x), dtype=torch.float64)  # noqa: E731
        return TrustRegionSignal(t(1 + i % 3), t(3), t(100), t(100), t(10), t(9 if i % 2 else 0), t(0))

    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(n, generator=gen) for n in SIZES]
    grads = [[torch.randn(n, generator=gen) for n in SIZES] for _ in range(12)]

    def run(kw, steps, params=None, opt=None):
        params = params or [torch.nn.Parameter(x.clone()) for x in init]
        opt = opt or ClipAwareAdamW(params, lr=1e-2, weight_decay=0.1, **kw)
        for i in steps:
            for p, g in zip(params, grads[i]):
                p.grad = g.clone()
            opt.observe(sig(i))
            opt.step()
        return params, opt

    fused_p, fused = run(dict(fused=True), range(6))
    assert any("ca_m_scale" in st for st in fused.state.values())  # the lazy scale is in use
    foreach_p, foreach = run(dict(foreach=True), range(6))
    saved = copy.deepcopy(fused.state_dict())  # folds the scales in place
    assert not any("ca_m_scale" in st for st in fused.state.values())
    for k, p in enumerate(foreach_p):
        torch.testing.assert_close(saved["state"][k]["exp_avg"], foreach.state[p]["exp_avg"], rtol=1e-5, atol=1e-7)
    resumed_p = [torch.nn.Parameter(p.detach().clone()) for p in fused_p]
    resumed = ClipAwareAdamW(resumed_p, lr=1e-2, weight_decay=0.1, fused=True)
    resumed.load_state_dict(saved)
    run({}, range(6, 12), fused_p, fused)
    run({}, range(6, 12), resumed_p, resumed)
    assert all(torch.equal(a, b) for a, b in zip(fused_p, resumed_p))
    never_saved, _ = run(dict(fused=True), range(12))
    for a, b in zip(fused_p, never_saved):  # folding at saving moved the rounding only
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.optim.AdamW([torch.nn.Parameter(x.clone()) for x in init], fused=True).load_state_dict(saved)
