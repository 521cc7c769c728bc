"""TrustRegionSignal semantics, the Prop. 2 eps helper, and torch.compile of the common path."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_fix import GroupSurrogateLoss, TrustRegionSignal, adam_eps_report


def _sig(active, total, overshoot=0.0, eligible=10.0, excess=0.0, rollout=False):
    t = lambda x: torch.tensor(float(x), dtype=torch.float64)  # noqa: E731
    return TrustRegionSignal(
        t(active), t(total), t(eligible), t(eligible), t(overshoot), t(overshoot), t(excess), rollout_start=rollout
    )


def test_signal_counts_match_definitions():
    # 4 tokens, A = (+1, +1, -1, 0); ratios (1.5, 1.0, 0.5, 2.0); eps 0.2; uniform alpha = 1/4
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5, 2.0]], dtype=torch.float64))
    old = torch.zeros(1, 4, dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, -1.0, 0.0]], dtype=torch.float64)
    out = GroupSurrogateLoss("dapo", eps_high=0.2)(logp, old, adv, torch.ones(1, 4), group_size=None)
    s = out.signal
    assert float(s.total_mass) == pytest.approx((1.5 + 1.0 + 0.5) / 4)
    assert float(s.active_mass) == pytest.approx(1.0 / 4)  # tokens 0 (A>0, s>1.2) and 2 (A<0, s<0.8) clipped
    assert float(s.num_clipped) == 2 and float(s.num_overshoot) == 2 and float(s.num_eligible) == 3
    assert float(s.kappa) == pytest.approx(1.0 / 3.0)
    assert float(s.overshoot_fraction) == pytest.approx(2.0 / 3.0)
    assert float(s.max_excess) == pytest.approx(max(math.log(1.5) - math.log(1.2), math.log(0.8) - math.log(0.5)))
    assert float(out.metrics["clip_high"]) == pytest.approx(0.25) and float(out.metrics["clip_low"]) == 0.25


def test_signal_accumulates_over_micro_batches():
    a, b = _sig(1, 2, overshoot=1, excess=0.3), _sig(3, 6, overshoot=2, excess=0.1, rollout=True)
    c = a + b
    assert float(c.active_mass) == 4 and float(c.total_mass) == 8 and float(c.num_overshoot) == 3
    assert float(c.max_excess) == pytest.approx(0.3) and c.rollout_start
    assert float(c.kappa) == 0.5
    z = TrustRegionSignal.zeros()
    assert float((z + a).kappa) == 0.5 and float(z.kappa) == 1.0
    assert c.as_dict()["kappa"] == 0.5 and not TrustRegionSignal.zeros().rollout_start
    assert a.with_rollout_start().rollout_start


@pytest.mark.parametrize(
    "sig,match",
    [
        (_sig(float("nan"), 1), "non-finite"),
        (_sig(1, float("inf")), "non-finite"),
        (_sig(-1, 1), "negative"),
        (_sig(2, 1), "active_mass > total_mass"),
    ],
)
def test_signal_validate_rejects_garbage(sig, match):
    with pytest.raises(ValueError, match=match):
        sig.validate()


def test_adam_eps_report_detects_prop2_condition():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(1000))
    for eps, grad_scale, negligible in ((1e-8, 1.0, True), (1e-5, 1e-6, False)):
        opt = torch.optim.AdamW([p], lr=1e-3, eps=eps)
        for _ in range(3):
            p.grad = torch.randn(1000) * grad_scale
            opt.step()
        rep = adam_eps_report(opt)
        assert rep.negligible is negligible, rep
        assert rep.num_coordinates == 1000 and 0 <= rep.median_shrink <= rep.p99_shrink <= rep.max_shrink <= 1
    with pytest.raises(ValueError, match="step it first"):
        adam_eps_report(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]))
    with pytest.raises(ValueError, match="Adam-family"):
        adam_eps_report(torch.optim.SGD([p], lr=0.1))


def test_torch_compile_common_path_has_no_graph_break():
    torch._dynamo.reset()
    loss_fn = GroupSurrogateLoss("uniform", beta=0.05)
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(8, 16, generator=g)).requires_grad_()
    old = logp.detach() + 0.2 * torch.randn(8, 16, generator=g)
    adv = torch.randn(8, 16, generator=g)  # per-token advantages, precomputed at rollout time
    mask = torch.rand(8, 16, generator=g) > 0.2

    def step(lp):
        out = loss_fn(lp, old, adv, mask, group_size=None, ref_logp=old, num_window_tokens=200)
        return out.loss, out.signal.kappa, out.signal.overshoot_fraction

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c, kappa_c, over_c = compiled(logp)
    loss_e, kappa_e, over_e = step(logp)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(kappa_c, kappa_e)
    (gc,) = torch.autograd.grad(loss_c, logp)
    (ge,) = torch.autograd.grad(loss_e, logp)
    torch.testing.assert_close(gc, ge)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_and_hidden_entry_points_match_logprob_path(backend):
    """forward_logits / forward_hidden (kernels under TRITON_INTERPRET on CPU) equal forward on log-probs."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 4, 5, 8, 33
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (0.3 * torch.randn(V, H, generator=g)).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    adv = torch.randn(B, generator=g)
    logp_ref = torch.log_softmax((hidden @ weight.T).float() / 0.7, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = logp_ref.detach() + 0.1 * torch.randn(B, T, generator=g)
    loss_fn = GroupSurrogateLoss("uniform", backend=backend)
    ref = GroupSurrogateLoss("uniform", backend="torch")(logp_ref, old, adv, mask, group_size=2, completion_ids=ids)
    g_ref = torch.autograd.grad(ref.loss, (hidden, weight))
    out_h = loss_fn.forward_hidden(hidden, weight, ids, old, adv, mask, group_size=2, temperature=0.7, chunk_tokens=7)
    torch.testing.assert_close(out_h.loss, ref.loss, rtol=1e-5, atol=1e-7)
    for a, b in zip(torch.autograd.grad(out_h.loss, (hidden, weight)), g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    logits = (hidden @ weight.T).detach().requires_grad_()
    out_l = loss_fn.forward_logits(
        logits.clone() if backend == "torch" else logits, ids, old, adv, mask, group_size=2, temperature=0.7
    )
    torch.testing.assert_close(out_l.loss, ref.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out_l.signal.kappa, ref.signal.kappa)
    with pytest.raises(ValueError, match="backend"):
        GroupSurrogateLoss("uniform", backend="cuda")
