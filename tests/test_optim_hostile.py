"""ClipAwareAdamW against hostile input (issue 14, item 6), property-based where it helps.

Properties (hypothesis, the shared strategies of tests/strategies.py):
- gradients with NaN / +-inf / huge / tiny values: a step with any non-finite element is skipped
  and leaves parameters and state bit for bit; any other step is exactly ``torch.optim.AdamW``'s;
- signals with hostile fields: ``observe`` raises (negative masses, active > total), or
  invalidates the window (non-finite), and alpha / kappa stay in their ranges either way;
- settings: the constructor refuses what it cannot run, and what it accepts steps finitely.
Plus the cases one by one: non-tensor signal fields, empty groups, parameters without gradients,
complex parameters, plain / mismatched / corrupt state dicts.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import SPECIAL_FLOATS, poisoned

from grpo_fix import ClipAwareAdamW, TrustRegionSignal
from grpo_fix.signal import TENSOR_FIELDS

IMPLS = {"single": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sig(**fields):
    values = dict(
        active_mass=1.0, total_mass=1.0, num_tokens=10.0, num_eligible=10.0, num_clipped=0.0, num_overshoot=0.0
    )
    values.update(max_excess=0.0)
    values.update(fields)
    return TrustRegionSignal(**{k: torch.tensor(float(v), dtype=torch.float64) for k, v in values.items()})


def pair(impl, dtype=torch.float32):
    """ClipAwareAdamW and torch's AdamW on equal parameters, one ordinary step taken."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(6, generator=gen).to(dtype), torch.randn(2, 3, generator=gen).to(dtype)]
    ours_p = [torch.nn.Parameter(b.clone()) for b in base]
    ref_p = [torch.nn.Parameter(b.clone()) for b in base]
    ours = ClipAwareAdamW(ours_p, lr=1e-2, weight_decay=0.1, **IMPLS[impl])
    ref = torch.optim.AdamW(ref_p, lr=1e-2, weight_decay=0.1, **IMPLS[impl])
    for p, q in zip(ours_p, ref_p):
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        q.grad = p.grad.clone()
    ours.step()
    ref.step()
    return ours, ours_p, ref, ref_p


def same(a, b):
    return torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("impl", list(IMPLS))
@FAST
@given(data=st.data())
def test_any_gradient_is_skipped_if_not_finite_else_exactly_adamw(impl, data):
    ours, ours_p, ref, ref_p = pair(impl)
    grads = [data.draw(poisoned(torch.randn(p.shape))) for p in ours_p]
    finite = all(bool(torch.isfinite(g).all()) for g in grads)
    params_before = [p.detach().clone() for p in ours_p]
    state_before = copy.deepcopy(ours.state_dict()["state"])
    for p, q, g in zip(ours_p, ref_p, grads):
        p.grad, q.grad = g.clone(), g.clone()
    ours.step()
    if not finite:
        assert ours.skipped_steps == 1
        assert all(torch.equal(p.detach(), b) for p, b in zip(ours_p, params_before))
        now = ours.state_dict()["state"]
        assert all(torch.equal(now[i][k], v) for i, s in state_before.items() for k, v in s.items())
        return
    ref.step()
    assert ours.skipped_steps == 0
    assert all(same(p.detach(), q.detach()) for p, q in zip(ours_p, ref_p))
    for p, q in zip(ours_p, ref_p):
        for k in ("exp_avg", "exp_avg_sq"):
            assert same(ours.state[p][k], ref.state[q][k])


@FAST
@given(
    fields=st.dictionaries(
        st.sampled_from(TENSOR_FIELDS), st.sampled_from(SPECIAL_FLOATS + (-1.0, 5.0, 1e6)), min_size=1, max_size=4
    )
)
def test_any_signal_either_raises_or_keeps_the_controller_in_range(fields):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ClipAwareAdamW([p], alpha_min=0.01)
    s = sig(**fields)
    try:
        with pytest.warns(RuntimeWarning) if not s.is_finite() else _no_warning():
            opt.observe(s)
    except ValueError as err:
        assert "negative" in str(err) or "active_mass > total_mass" in str(err)
    g = opt.param_groups[0]
    assert 0.01 <= g["ca_alpha"] <= 1.0 and 0.0 <= g["ca_kappa"] <= 1.0
    assert g["ca_invalid"] == (not s.is_finite())
    p.grad = torch.ones(3)
    opt.step()
    assert torch.isfinite(p).all()


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@FAST
@given(
    name=st.sampled_from(["lr", "eps", "weight_decay", "tau", "alpha_init", "alpha_min", "shrink", "grow"]),
    value=st.sampled_from(SPECIAL_FLOATS + (-1.0, 0.5, 2.0)),
)
def test_any_setting_is_refused_or_steps_finitely(name, value):
    p = torch.nn.Parameter(torch.ones(4))
    try:
        opt = ClipAwareAdamW([p], **{name: value})
    except (ValueError, TypeError) as err:
        assert name in str(err) or "beta" in str(err)
        return
    for _ in range(3):
        opt.observe(sig(num_overshoot=5.0))
        p.grad = torch.randn(4)
        opt.step()
    assert torch.isfinite(p).all() and opt.alpha_min <= opt.alpha <= 1.0


def test_signal_fields_that_are_not_tensors_are_refused_naming_the_field():
    s = TrustRegionSignal(1.0, 1.0, 10.0, 10.0, 0.0, 0.0, 0.0)
    with pytest.raises(TypeError, match="active_mass"):
        ClipAwareAdamW([torch.nn.Parameter(torch.zeros(2))]).observe(s)
    two = sig()
    two = TrustRegionSignal(**{**{f: getattr(two, f) for f in TENSOR_FIELDS}, "total_mass": torch.ones(2)})
    with pytest.raises(TypeError, match="total_mass"):
        ClipAwareAdamW([torch.nn.Parameter(torch.zeros(2))]).observe(two)


def test_empty_groups_and_parameters_without_gradients():
    a, b, c = (torch.nn.Parameter(torch.ones(2)) for _ in range(3))
    opt = ClipAwareAdamW([{"params": [a, b]}, {"params": []}, {"params": [c]}])
    opt.observe(sig(active_mass=0.5))
    a.grad = torch.ones(2)
    opt.step()
    assert not torch.equal(a.detach(), torch.ones(2))
    assert torch.equal(b.detach(), torch.ones(2)) and torch.equal(c.detach(), torch.ones(2))
    assert b not in opt.state and c not in opt.state
    opt.zero_grad()
    opt.step()  # no gradient at all: nothing happens
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("impl", list(IMPLS))
def test_complex_parameters_equal_their_real_view(impl):
    gen = torch.Generator().manual_seed(1)
    z = torch.nn.Parameter(torch.randn(5, dtype=torch.complex64, generator=gen))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    if impl == "fused":  # torch's fused kernels are real-only: refused at construction, not at the first step
        with pytest.raises(ValueError, match=r"fused=True.*param_groups\[0\]\['params'\]\[0\] is torch.complex64"):
            ClipAwareAdamW([z], fused=True)
        return
    oz = ClipAwareAdamW([z], lr=1e-2, **IMPLS[impl])
    orr = ClipAwareAdamW([r], lr=1e-2, **IMPLS[impl])
    for i in range(4):
        gz = torch.randn(5, dtype=torch.complex64, generator=gen)
        z.grad, r.grad = gz, torch.view_as_real(gz).clone()
        for o in (oz, orr):
            o.observe(sig(active_mass=0.5, num_overshoot=3.0 if i == 1 else 0.0))
            o.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=1e-6, atol=1e-7)


def test_state_dicts_plain_mismatched_and_corrupt():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ClipAwareAdamW([p])
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    opt.load_state_dict(plain.state_dict())  # a plain AdamW checkpoint: defaults for our keys
    assert opt.alpha == 1.0 and opt.param_groups[0]["ca_started"] is False
    two_groups = ClipAwareAdamW(
        [{"params": [torch.nn.Parameter(torch.ones(3))]}, {"params": [torch.nn.Parameter(torch.ones(1))]}]
    )
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict(two_groups.state_dict())
    for key, bad in (
        ("ca_alpha", math.nan),
        ("ca_alpha", 2.0),
        ("ca_kappa", -0.5),
        ("ca_skipped", -1),
        ("ca_alpha", "1"),
    ):
        sd = copy.deepcopy(opt.state_dict())
        sd["param_groups"][0][key] = bad
        with pytest.raises(ValueError, match=rf"param_groups\[0\]\['{key}'\]"):
            ClipAwareAdamW([torch.nn.Parameter(torch.ones(3))]).load_state_dict(sd)
