"""ClipAwareAdamW: identity with AdamW, Prop. 3 reproduced, controller, backtrack, state, bad input, kernel."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from grpo_fix import ClipAwareAdamW, GroupSurrogateLoss
from grpo_fix.kernels.reference import adamw_step_reference
from grpo_fix.signal import TrustRegionSignal


def sig(active=1.0, total=1.0, overshoot=0.0, eligible=100.0, rollout_start=False, clipped=0.0):
    t = lambda x: torch.tensor(float(x), dtype=torch.float64)  # noqa: E731
    return TrustRegionSignal(
        active_mass=t(active),
        total_mass=t(total),
        num_tokens=t(eligible),
        num_eligible=t(eligible),
        num_clipped=t(clipped),
        num_overshoot=t(overshoot),
        max_excess=t(0.0),
        rollout_start=rollout_start,
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2), (11,), (1,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def groups_of(params):
    return [
        {"params": params[:2], "lr": 3e-3, "weight_decay": 0.1},
        {"params": params[2:4], "lr": 1e-3, "weight_decay": 0.0, "betas": (0.8, 0.95)},
        {"params": params[4:], "weight_decay": 0.05},
    ]


IMPLS = {"single": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


# --------------------------------------------------------------------------------------------
# identity
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["no_signal", "unclipped_signal"])
def test_identity_with_adamw(impl, dtype, mode):
    ref_p, our_p = make_params(dtype), make_params(dtype)
    ref = torch.optim.AdamW(groups_of(ref_p), lr=2e-3, weight_decay=1e-2, **IMPLS[impl])
    ours = ClipAwareAdamW(groups_of(our_p), lr=2e-3, weight_decay=1e-2, **IMPLS[impl])
    assert isinstance(ours, torch.optim.AdamW)
    gen = torch.Generator().manual_seed(1)
    for step in range(50):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in ref_p]
        for p, q, g in zip(ref_p, our_p, grads):
            p.grad, q.grad = g.clone(), g.clone()
        if mode == "unclipped_signal":
            # kappa == 1, no overshoot (a realistic "nothing clipped" window)
            ours.observe(sig(active=3.0, total=3.0, overshoot=0.0, rollout_start=step % 4 == 0))
        ref.step()
        ours.step()
    for p, q in zip(ref_p, our_p):
        assert p.dtype == q.dtype == dtype
        assert rel_err(q, p) <= 1e-6
    for p, q in zip(ref_p, our_p):
        for k in ("exp_avg", "exp_avg_sq"):
            assert rel_err(ours.state[q][k], ref.state[p][k]) <= 1e-6
        assert float(ours.state[q]["step"]) == 50
    assert ours.last_stats["kappa"] == (1.0 if mode == "unclipped_signal" else 1.0)
    assert ours.alpha == 1.0


def test_identity_is_not_trivial():
    """The same harness detects a gate that is active (kappa < 1 changes the trajectory)."""
    ref_p, our_p = make_params(), make_params()
    ref = torch.optim.AdamW(groups_of(ref_p), foreach=True)
    ours = ClipAwareAdamW(groups_of(our_p), foreach=True)
    for _ in range(5):
        for p, q in zip(ref_p, our_p):
            g = torch.randn(p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        ours.observe(sig(active=0.5, total=1.0))
        ref.step()
        ours.step()
    assert max(rel_err(q, p) for p, q in zip(ref_p, our_p)) > 1e-6


# --------------------------------------------------------------------------------------------
# Prop. 3 / Prop. 7 (Eqs. 32, 36, 37)
# --------------------------------------------------------------------------------------------
def c_t(b1, b2, T):  # Eq. 32
    return (b1 * (1 - b1 ** (T - 1)) / (1 - b1**T)) * math.sqrt((1 / b2) * (1 - b2**T) / (1 - b2 ** (T - 1)))


def c_tk(b1, b2, T, k):  # Eq. 36
    return (b1 ** (k + 1) * (1 - b1 ** (T - 1)) / (1 - b1 ** (T + k))) * math.sqrt(
        (1 / b2 ** (k + 1)) * (1 - b2 ** (T + k)) / (1 - b2 ** (T - 1))
    )


def run_clip_scenario(opt_cls, T, K, kappa_clipped=None, **kw):
    """Constant gradient on steps 1..T-1, zero (clipped) on steps T..T+K-1.  Returns the step sizes."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = opt_cls([p], lr=1e-2, betas=(0.9, 0.95), eps=1e-30, weight_decay=0.0, foreach=True, **kw)
    g = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    steps = []
    for t in range(1, T + K):
        clipped = t >= T
        p.grad = torch.zeros_like(g) if clipped else g.clone()
        if kappa_clipped is not None:
            opt.observe(sig(active=kappa_clipped, total=1.0) if clipped else sig())
        before = p.detach().clone()
        opt.step()
        steps.append((p.detach() - before).norm().item())
    return steps  # steps[t-1] is the displacement of step t


@pytest.mark.parametrize("T", [2, 5, 10, 50])
def test_prop3_adamw_residual_matches_eqs_32_36(T):
    b1, b2 = 0.9, 0.95
    steps = run_clip_scenario(torch.optim.AdamW, T, 5)
    pre = steps[T - 2]  # last pre-clip step (step T-1)
    assert steps[T - 1] / pre == pytest.approx(c_t(b1, b2, T), rel=0.01)
    for k in range(5):
        assert steps[T - 1 + k] / pre == pytest.approx(c_tk(b1, b2, T, k), rel=0.01)
    if T == 50:  # large-T limit, Eq. 37
        assert steps[T - 1 + 4] / pre == pytest.approx((b1 / math.sqrt(b2)) ** 5, rel=0.01)
        assert steps[T - 1 + 4] / pre > 0.6  # the residual is large: the problem is real


@pytest.mark.parametrize("T", [5, 50])
def test_prop3_gate_kappa0_moves_exactly_zero(T):
    steps = run_clip_scenario(ClipAwareAdamW, T, 5, kappa_clipped=0.0)
    assert steps[T - 2] > 0
    assert all(s == 0.0 for s in steps[T - 1 :])


@pytest.mark.parametrize("T", [5, 50])
def test_prop3_partly_clipped_scales_residual_by_kappa(T):
    b1, b2 = 0.9, 0.95
    steps = run_clip_scenario(ClipAwareAdamW, T, 5, kappa_clipped=0.5)
    pre = steps[T - 2]
    for k in range(5):  # kappa applied at every clipped step: residual scaled by kappa^(k+1)
        assert steps[T - 1 + k] / pre == pytest.approx(0.5 ** (k + 1) * c_tk(b1, b2, T, k), rel=0.01)


def test_window_without_advantage_signal_drops_momentum_and_holds_alpha():
    """Tokens but no advantage-gradient mass (every advantage 0: converged or constant-reward
    groups): the loss gradient is exactly zero, so any step would be carried momentum alone, i.e.
    Prop. 3's drift with no signal behind it.  The gate latches kappa = 0 (no movement) and the
    controller holds alpha (no overshoot measurement).  A window with no tokens at all
    (``TrustRegionSignal.zeros()``) keeps kappa = 1: nothing was measured, AdamW's behaviour."""
    t = lambda x: torch.tensor(float(x), dtype=torch.float64)  # noqa: E731
    massless = TrustRegionSignal(t(0), t(0), t(48), t(0), t(0), t(0), t(0))
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    ref = torch.nn.Parameter(p.detach().clone())
    opt = ClipAwareAdamW([p], lr=1e-2, weight_decay=0.0)
    adamw = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.0)
    for _ in range(3):  # build momentum
        g = torch.randn(5)
        p.grad, ref.grad = g.clone(), g.clone()
        opt.observe(sig())
        opt.step()
        adamw.step()
    opt.observe(sig(overshoot=30))  # alpha 0.5
    alpha = opt.alpha
    opt.observe(massless)
    assert opt.alpha == alpha and opt.last_stats["kappa"] == 0.0
    before, ref_before = p.detach().clone(), ref.detach().clone()
    p.grad, ref.grad = torch.zeros(5), torch.zeros(5)
    opt.step()
    adamw.step()
    assert torch.equal(p.detach(), before)  # no drift
    assert (ref.detach() - ref_before).abs().max() > 1e-3  # AdamW drifts on stale momentum
    opt.observe(TrustRegionSignal.zeros())
    assert opt.last_stats["kappa"] == 1.0 and opt.alpha == alpha


# --------------------------------------------------------------------------------------------
# controller
# --------------------------------------------------------------------------------------------
def test_controller_alpha_sequence_and_reset():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ClipAwareAdamW([p], tau=0.02, grow=1.25, reset_on_rollout=True)
    seq = []
    for s in [
        sig(overshoot=5),
        sig(overshoot=5),
        sig(overshoot=1),
        sig(overshoot=0),
        sig(overshoot=2),
        sig(overshoot=0),
        sig(overshoot=0),
        sig(overshoot=0),
        sig(overshoot=0),
        sig(overshoot=0),
        sig(overshoot=9),
        sig(overshoot=9, rollout_start=True),
        sig(overshoot=9),
        sig(rollout_start=True),
    ]:
        opt.observe(s)
        seq.append(opt.alpha)
    exp = [
        0.5,
        0.25,
        0.3125,
        0.390625,
        0.48828125,
        0.6103515625,
        0.762939453125,
        0.95367431640625,
        1.0,
        1.0,
        0.5,
        0.5,
        0.25,
        1.0,
    ]
    assert seq == pytest.approx(exp, rel=1e-12)
    assert opt.last_stats["alpha"] == 1.0
    # f == tau exactly is not above tau
    opt.observe(sig(overshoot=2, eligible=100))
    assert opt.alpha == 1.0


def test_controller_default_carries_alpha_across_rollouts_and_keeps_momentum():
    """Defaults (judged in benchmarks/results/fair_*): tau = 0.05, no warm start, alpha is
    not reset at a rollout boundary, and shrinking alpha leaves the momentum alone."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4))
    opt = ClipAwareAdamW([p], lr=1e-2, gate=False)
    assert (opt.tau, opt.alpha_init) == (0.05, 1.0)
    seq = []
    for s in [
        sig(overshoot=10),
        sig(overshoot=5),
        sig(overshoot=6),
        sig(rollout_start=True),
        sig(overshoot=9, rollout_start=True),
    ]:
        opt.observe(s)
        seq.append(opt.alpha)
    g = opt.grow
    # shrink; f == tau is not above tau -> grow; shrink; grow (no reset); shrink
    assert seq == pytest.approx([0.5, 0.5 * g, 0.25 * g, 0.25 * g * g, 0.125 * g * g], rel=1e-12)
    p.grad = torch.randn(4)
    opt.step()
    m1 = opt.state[p]["exp_avg"].clone()
    opt.observe(sig(overshoot=10))  # alpha shrinks; the momentum does not
    g2 = torch.randn(4)
    p.grad = g2.clone()
    opt.step()
    assert torch.allclose(opt.state[p]["exp_avg"], 0.9 * m1 + 0.1 * g2, rtol=1e-6)


def test_warm_start_ramps_alpha_and_then_equals_adamw_steps():
    """With nothing clipped alpha grows from alpha_init by `grow` per window up to 1; the step
    of a window is lr * alpha (first Adam step: exactly lr * alpha * sign(g))."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ClipAwareAdamW([p], lr=1.0, weight_decay=0.0, eps=1e-30, alpha_init=0.1)
    alphas = []
    for i in range(12):
        opt.observe(sig())
        alphas.append(opt.alpha)
        if i == 0:
            p.grad = torch.tensor([1.0, -2.0, 3.0])
            opt.step()
            torch.testing.assert_close(p.detach(), -0.125 * torch.tensor([1.0, -1.0, 1.0]))
    assert alphas == pytest.approx([min(1.0, 0.1 * 1.25 ** (k + 1)) for k in range(12)], rel=1e-12)
    assert alphas[-1] == 1.0 and alphas[9] < 1.0  # ten windows to full step


def test_warm_start_state_of_older_and_plain_adamw_checkpoints():
    """A checkpoint of a ClipAwareAdamW saved before the warm start existed (alpha, no start
    flag) continues from its alpha; a plain AdamW checkpoint warm-starts at its first window."""
    p = torch.nn.Parameter(torch.randn(4))
    old = ClipAwareAdamW([p])
    old.observe(sig(overshoot=40))  # alpha 0.5
    sd = old.state_dict()
    for g in sd["param_groups"]:
        del g["ca_started"]
    resumed = ClipAwareAdamW([torch.nn.Parameter(p.detach().clone())], alpha_init=0.1)
    resumed.load_state_dict(sd)
    resumed.observe(sig())
    assert resumed.alpha == pytest.approx(0.5 * 1.25)
    plain = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())])
    switched = ClipAwareAdamW([torch.nn.Parameter(p.detach().clone())], alpha_init=0.1)
    switched.load_state_dict(plain.state_dict())
    switched.observe(sig())
    assert switched.alpha == pytest.approx(0.1 * 1.25)


def test_controller_scales_step_not_lr_or_weight_decay_and_follows_scheduler():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6))
    q = torch.nn.Parameter(p.detach().clone())
    opt = ClipAwareAdamW([p], lr=0.1, weight_decay=0.5, eps=1e-12)
    ref = torch.optim.AdamW([q], lr=0.1, weight_decay=0.5, eps=1e-12)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (i + 1))
    opt.observe(sig(overshoot=50))  # alpha 0.5
    opt.observe(sig(overshoot=50))  # alpha 0.25
    assert opt.alpha == 0.25
    g = torch.randn(6)
    for i in range(3):
        p0 = p.detach().clone()
        lr = opt.param_groups[0]["lr"]
        assert lr == pytest.approx(0.1 / (i + 1))
        p.grad = g.clone() if i == 0 else torch.zeros(6)
        opt.step()
        sched.step()
        if i == 0:
            # first Adam step: |m_hat / sqrt(v_hat)| == 1, so the data step is lr * alpha exactly,
            # and the decay is lr * wd (not alpha-scaled)
            expected = p0 * (1 - lr * 0.5) - lr * 0.25 * torch.sign(g)
            assert torch.allclose(p.detach(), expected, rtol=1e-6, atol=1e-7)
            p1 = p.detach().clone()
        if i == 2:  # the scheduler kept changing the lr we read (0.1 / (i + 1) after i+1 steps)
            assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 4)
    assert opt.param_groups[0]["initial_lr"] == 0.1  # the scheduler owns lr; we never rewrote it
    # plain AdamW from the same start takes the full lr step (alpha really is applied)
    q.grad = g.clone()
    ref.step()
    q0 = p1 + 0.1 * 0.25 * torch.sign(g)  # undo our step to recover p0 * (1 - lr * wd)
    assert torch.allclose(q.detach(), q0 - 0.1 * torch.sign(g), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(q.detach(), p1, atol=1e-3)


def test_controller_momentum_halving_is_applied_once():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4))
    opt = ClipAwareAdamW([p], lr=1e-2, gate=False, shrink_momentum=True)
    p.grad = torch.randn(4)
    opt.step()
    m1 = opt.state[p]["exp_avg"].clone()
    opt.observe(sig(overshoot=10))  # shrink: momentum x0.5 at the next step
    g2 = torch.randn(4)
    p.grad = g2.clone()
    opt.step()
    assert torch.allclose(opt.state[p]["exp_avg"], 0.9 * 0.5 * m1 + 0.1 * g2, rtol=1e-6)
    m2 = opt.state[p]["exp_avg"].clone()
    p.grad = g2.clone()
    opt.step()  # same window, no second halving
    assert torch.allclose(opt.state[p]["exp_avg"], 0.9 * m2 + 0.1 * g2, rtol=1e-6)


def test_skipped_steps_survive_state_dict_round_trip():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ClipAwareAdamW(
        [
            p,
        ],
        nonfinite="skip",
    )
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    opt.step()
    assert opt.skipped_steps == 2
    fresh = ClipAwareAdamW([torch.nn.Parameter(torch.zeros(3))])
    fresh.load_state_dict(opt.state_dict())
    assert fresh.skipped_steps == 2
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]).state_dict()
    fresh.load_state_dict(plain)  # an AdamW checkpoint has no counter: 0
    assert fresh.skipped_steps == 0


def test_alpha_and_kappa_survive_state_dict_round_trip():
    p = torch.nn.Parameter(torch.randn(4))
    opt = ClipAwareAdamW([p])
    opt.observe(sig(active=0.25, total=1.0, overshoot=40))
    p.grad = torch.randn(4)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = ClipAwareAdamW([q])
    assert opt2.alpha == 1.0
    opt2.load_state_dict(torch.load(buf))
    assert opt2.alpha == 0.5
    assert opt2.param_groups[0]["ca_kappa"] == 0.25


# --------------------------------------------------------------------------------------------
# backtrack
# --------------------------------------------------------------------------------------------
LOG_BOUND = math.log(1.2)


def toy_signal(x: torch.Tensor) -> TrustRegionSignal:
    """Tokens with positive advantage whose log-ratio is x: overshoot = share of x > log 1.2."""
    n = x.numel()
    over = float((x > LOG_BOUND).sum())
    return sig(active=n - over, total=n, overshoot=over, eligible=n)


def test_backtrack_accepts_first_step_size_within_bound():
    torch.manual_seed(0)
    x0 = torch.linspace(0.0, 0.17, 100)  # all inside the region (f_before == 0)
    grad = -torch.rand(100) - 0.5  # ascent direction on x: pushes log-ratios up
    m0 = torch.rand(100) * 0.1
    ref_x = torch.nn.Parameter(x0.clone())
    bt_x = torch.nn.Parameter(x0.clone())
    common = dict(lr=0.3, weight_decay=0.0, foreach=True, controller=False, max_backtracks=10)
    ref = ClipAwareAdamW([ref_x], **common)
    opt = ClipAwareAdamW([bt_x], backtrack=True, **common)
    for o, x in ((ref, ref_x), (opt, bt_x)):  # same warm state
        x.grad = grad.clone()
        o.step()
        with torch.no_grad():
            x.copy_(x0)
        o.state[x]["exp_avg"].copy_(m0)
        o.observe(toy_signal(x.detach()))
    calls = []

    def remeasure():
        calls.append(1)
        return toy_signal(bt_x.detach())

    opt.set_backtrack_fn(remeasure)
    ref_x.grad = grad.clone()
    bt_x.grad = grad.clone()
    ref.step()
    opt.step()
    delta = ref_x.detach() - x0
    m_full = ref.state[ref_x]["exp_avg"]
    bound = 0.02
    assert toy_signal(x0 + delta).overshoot_fraction > bound  # the full step overshoots
    a, tries = 1.0, 0
    while float(toy_signal(x0 + a * delta).overshoot_fraction) > bound:
        a *= 0.5
        tries += 1
    assert tries >= 2
    assert torch.allclose(bt_x.detach(), x0 + a * delta, atol=1e-7)
    assert torch.allclose(opt.state[bt_x]["exp_avg"], a * m_full, rtol=1e-6)
    assert opt.last_stats["backtracks"] == tries
    assert len(calls) == tries + 1
    assert float(toy_signal(bt_x.detach()).overshoot_fraction) <= bound
    # a smaller step would also be inside: we took the FIRST (largest) admissible one
    assert float(toy_signal(x0 + 2 * a * delta).overshoot_fraction) > bound


def test_backtrack_respects_max_backtracks_and_before_level():
    x = torch.nn.Parameter(torch.zeros(10))
    opt = ClipAwareAdamW([x], lr=1.0, backtrack=True, max_backtracks=3, controller=False, weight_decay=0.0)
    opt.set_backtrack_fn(lambda: sig(overshoot=50, eligible=100))  # never within the bound
    opt.observe(sig(overshoot=10, eligible=100))
    x.grad = -torch.ones(10)
    opt.step()
    assert opt.last_stats["backtracks"] == 3
    assert opt.last_stats["rejected"] == 1.0  # nothing within the bound: the step is rejected
    assert torch.equal(x.detach(), torch.zeros(10))
    assert torch.equal(opt.state[x]["exp_avg"], torch.zeros(10))
    # overshoot no worse than before the step (0.5 <= 0.5) is accepted at once
    opt.observe(sig(overshoot=50, eligible=100))
    x.grad = -torch.ones(10)
    opt.step()
    assert opt.last_stats["backtracks"] == 0
    assert opt.last_stats["rejected"] == 0.0
    # m was zeroed by the rejection: m_hat = 0.1 / (1 - 0.9**2), v_hat = 1
    assert torch.allclose(x.detach(), torch.full((10,), 0.1 / 0.19), rtol=1e-5)


def test_backtrack_with_surrogate_loss_signal():
    """Realistic signals from GroupSurrogateLoss: logits of isolated contexts, several inner steps."""
    torch.manual_seed(0)
    B, T, V, G = 8, 6, 5, 4
    tokens = torch.randint(0, V, (B, T))
    logits0 = torch.randn(B, T, V)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.5, -0.5])
    mask = torch.ones(B, T, dtype=torch.bool)
    loss_fn = GroupSurrogateLoss("grpo")

    def logp_of(logits):
        return torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]

    old = logp_of(logits0)
    results = {}
    for name, kw in {
        "adamw": dict(gate=False, controller=False),
        "backtrack": dict(backtrack=True, tau=0.05, max_backtracks=8),
    }.items():
        w = torch.nn.Parameter(logits0.clone())
        opt = ClipAwareAdamW([w], lr=0.3, weight_decay=0.0, **kw)
        opt.set_backtrack_fn(lambda w=w: loss_fn(logp_of(w), old, adv, mask, group_size=G).signal)
        worst = 0.0
        for step in range(8):
            out = loss_fn(logp_of(w), old, adv, mask, group_size=G)
            worst = max(worst, float(out.signal.overshoot_fraction))
            opt.zero_grad()
            out.loss.backward()
            opt.observe(out.signal.with_rollout_start(step == 0))
            opt.step()
        worst = max(worst, float(loss_fn(logp_of(w), old, adv, mask, group_size=G).signal.overshoot_fraction))
        results[name] = worst
    assert results["adamw"] > 0.2
    assert results["backtrack"] <= 0.05 + 1e-9  # tau: 2 of 48 eligible tokens


def test_backtrack_refused_under_deepspeed_attach_flag():
    x = torch.nn.Parameter(torch.zeros(3))
    opt = ClipAwareAdamW([x], backtrack=True)
    opt._deepspeed = {"refuse_backtrack": "backtrack is not supported under ZeRO-2"}
    with pytest.raises(RuntimeError, match="ZeRO"):
        opt.set_backtrack_fn(lambda: sig())


# --------------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------------
def signal_for(i):
    return sig(active=1.0 + (i % 3), total=3.0, overshoot=(5 if i % 4 == 1 else 0), rollout_start=i % 5 == 0)


@pytest.mark.parametrize("impl", ["foreach", "single"])
def test_save_at_step_7_resume_equals_uninterrupted(impl):
    gen = torch.Generator().manual_seed(3)
    grads = [[torch.randn(p.shape, generator=gen) for p in make_params()] for _ in range(15)]

    def train(opt, params, steps, observe=lambda i: True):
        for i in steps:
            for p, g in zip(params, grads[i]):
                p.grad = g.clone()
            if observe(i):
                opt.observe(signal_for(i))
            opt.step()

    a_p = make_params()
    a = ClipAwareAdamW(groups_of(a_p), **IMPLS[impl])
    train(a, a_p, range(15))

    b_p = make_params()
    b = ClipAwareAdamW(groups_of(b_p), **IMPLS[impl])
    train(b, b_p, range(7))
    b.observe(signal_for(7))  # saved mid-window: step 7's signal is latched, its step not taken yet
    buf = io.BytesIO()
    torch.save({"opt": b.state_dict(), "params": [p.detach().clone() for p in b_p]}, buf)
    buf.seek(0)
    ck = torch.load(buf)
    c_p = [torch.nn.Parameter(t) for t in ck["params"]]
    c = ClipAwareAdamW(groups_of(c_p), **IMPLS[impl])
    c.load_state_dict(ck["opt"])
    train(c, c_p, range(7, 15), observe=lambda i: i > 7)  # step 7 uses the restored, latched signal
    for p, q in zip(a_p, c_p):
        assert torch.equal(p, q)
    assert c.alpha == a.alpha


def test_resume_with_pending_momentum_halving():
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(5, generator=gen) for _ in range(6)]

    def run(interrupt: bool):
        p = torch.nn.Parameter(torch.ones(5))
        o = ClipAwareAdamW([p], shrink_momentum=True)
        for i, g in enumerate(grads):
            o.observe(sig(overshoot=10 if i == 3 else 0))
            if interrupt and i == 3:
                sd = copy.deepcopy(o.state_dict())
                p = torch.nn.Parameter(p.detach().clone())
                o = ClipAwareAdamW([p], shrink_momentum=True)
                o.load_state_dict(sd)
                # the saved first moment is AdamW's: the pending halving was folded in at saving
                assert "ca_m_scale" not in o.state[p]
            p.grad = g.clone()
            o.step()
        return p.detach()

    assert torch.equal(run(False), run(True))


def test_load_plain_adamw_state_dict():
    gen = torch.Generator().manual_seed(5)
    grads = [[torch.randn(p.shape, generator=gen) for p in make_params()] for _ in range(10)]
    r_p = make_params()
    ref = torch.optim.AdamW(groups_of(r_p), foreach=True)
    for i in range(5):
        for p, g in zip(r_p, grads[i]):
            p.grad = g.clone()
        ref.step()
    q_p = [torch.nn.Parameter(p.detach().clone()) for p in r_p]
    ours = ClipAwareAdamW(groups_of(q_p), foreach=True)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert all(g["ca_alpha"] == 1.0 and g["ca_kappa"] == 1.0 for g in ours.param_groups)
    for i in range(5, 10):
        for p, q, g in zip(r_p, q_p, grads[i]):
            p.grad, q.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    for p, q in zip(r_p, q_p):
        assert torch.equal(p, q)
    # and the reverse: a ClipAwareAdamW checkpoint loads into plain AdamW
    torch.optim.AdamW(groups_of(make_params()), foreach=True).load_state_dict(ours.state_dict())


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_unchanged(opt, params, snap, skipped=0):
    ps, sd = snap
    for p, q in zip(params, ps):
        assert torch.equal(p.detach(), q)
    now = opt.state_dict()
    # everything but the skip counter (which must count the skip) is untouched
    strip = lambda groups: [{k: v for k, v in g.items() if k != "ca_skipped"} for g in groups]  # noqa: E731
    assert strip(now["param_groups"]) == strip(sd["param_groups"])
    assert [g["ca_skipped"] for g in now["param_groups"]] == [g["ca_skipped"] + skipped for g in sd["param_groups"]]
    for k, st in sd["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                assert torch.equal(now["state"][k][key], v), key
            else:
                assert now["state"][k][key] == v


def warmed(nonfinite="skip"):
    params = make_params()
    opt = ClipAwareAdamW(groups_of(params), nonfinite=nonfinite, shrink_momentum=True)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.observe(sig(overshoot=10))
    opt.step()
    opt.observe(sig(overshoot=10))  # pending halving in state: must survive a skipped step
    return params, opt


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skip_leaves_state_untouched(bad):
    params, opt = warmed("skip")
    snap = snapshot(opt, params)
    for p in params:
        p.grad = torch.randn(p.shape)
    params[3].grad[2] = bad  # a single element in one tensor of the second group
    opt.step()
    assert opt.skipped_steps == 1
    assert_unchanged(opt, params, snap, skipped=1)
    for p in params:  # the next finite step works
        p.grad = torch.randn(p.shape)
    opt.step()
    assert opt.skipped_steps == 1
    assert not torch.equal(params[0].detach(), snap[0][0])


def test_nonfinite_gradient_raise():
    params, opt = warmed("raise")
    snap = snapshot(opt, params)
    for p in params:
        p.grad = torch.randn(p.shape)
    params[0].grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()
    assert_unchanged(opt, params, snap)


@pytest.mark.parametrize("field", ["active_mass", "total_mass", "num_overshoot", "max_excess"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_signal(field, bad):
    params, opt = warmed("raise")
    s = sig()
    s = TrustRegionSignal(
        **{
            **{
                f: getattr(s, f)
                for f in (
                    "active_mass",
                    "total_mass",
                    "num_tokens",
                    "num_eligible",
                    "num_clipped",
                    "num_overshoot",
                    "max_excess",
                )
            },
            field: torch.tensor(bad, dtype=torch.float64),
        }
    )
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match="non-finite"):
        opt.observe(s)
    assert_unchanged(opt, params, snap)

    params, opt = warmed("skip")
    snap = snapshot(opt, params)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.observe(s)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    opt.step()
    assert opt.skipped_steps == 2
    ps, sd = snap
    for p, q in zip(params, ps):
        assert torch.equal(p.detach(), q)
    assert [g["ca_alpha"] for g in opt.param_groups] == [g["ca_alpha"] for g in sd["param_groups"]]
    opt.observe(sig())  # a valid window resumes stepping
    opt.step()
    assert opt.skipped_steps == 2
    assert not torch.equal(params[0].detach(), ps[0])


def test_negative_masses_and_wrong_type_raise():
    params, opt = warmed("skip")
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match="negative"):
        opt.observe(sig(active=-1.0, total=1.0))
    with pytest.raises(ValueError, match="negative"):
        opt.observe(sig(overshoot=-3))
    with pytest.raises(ValueError, match="active_mass > total_mass"):
        opt.observe(sig(active=2.0, total=1.0))
    with pytest.raises(TypeError, match="TrustRegionSignal"):
        opt.observe(0.5)
    with pytest.raises(TypeError, match="TrustRegionSignal"):
        opt.observe({"kappa": 1.0})
    assert_unchanged(opt, params, snap)


def test_constructor_rejections():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="capturable"):
        ClipAwareAdamW(p, capturable=True)
    with pytest.raises(ValueError, match="differentiable"):
        ClipAwareAdamW(p, differentiable=True)
    with pytest.raises(ValueError, match="nonfinite"):
        ClipAwareAdamW(p, nonfinite="ignore")
    with pytest.raises(ValueError, match="shrink"):
        ClipAwareAdamW(p, shrink=1.5)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha_init"):
            ClipAwareAdamW(p, alpha_init=bad)


def test_zero_grad_step_is_harmless_and_groups_can_be_stepped_separately():
    """DeepSpeed patterns: a zero-gradient step before any signal; ZeRO-1/2 narrowing param_groups
    to one group per step() call; ZeRO-3 emptying the other groups.  All must equal one full step."""
    gen = torch.Generator().manual_seed(6)
    grads = [torch.randn(p.shape, generator=gen) for p in make_params()]

    def run(mode):
        ps = make_params()
        o = ClipAwareAdamW(groups_of(ps), foreach=True)
        for p in ps:
            p.grad = torch.zeros_like(p)
        o.step()  # the bf16 wrapper's init step
        o.observe(sig(active=0.5, total=1.0, overshoot=10))
        for _ in range(2):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            if mode == "full":
                o.step()
            elif mode == "zero12":
                orig = o.param_groups
                for grp in orig:
                    o.param_groups = [grp]
                    o.step()
                o.param_groups = orig
            else:  # zero3
                saved = [grp["params"] for grp in o.param_groups]
                for i in range(len(saved)):
                    for j, grp in enumerate(o.param_groups):
                        grp["params"] = saved[j] if j == i else []
                    o.step()
                for grp, s in zip(o.param_groups, saved):
                    grp["params"] = s
        return ps

    full = run("full")
    for mode in ("zero12", "zero3"):
        for p, q in zip(full, run(mode)):
            assert torch.equal(p, q)


# --------------------------------------------------------------------------------------------
# Triton kernel (TRITON_INTERPRET=1 on CPU; the real thing on CUDA)
# --------------------------------------------------------------------------------------------
def _triton_ok():
    from grpo_fix.kernels.adamw_step import triton_available

    return triton_available()


needs_triton = pytest.mark.skipif(not _triton_ok(), reason="triton not installed")


def oracle_step(p, g, m, v, t, m_scale, **kw):
    """The torch reference in float64: (p, m, v) after one step from copies of the inputs."""
    p, g, m, v = (x.detach().double().cpu().clone() for x in (p, g, m, v))
    adamw_step_reference(p, g, m, v, t, m_scale=m_scale, **kw)
    return p, m, v


@needs_triton
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernel_matches_reference(pdtype):
    from grpo_fix.kernels.adamw_step import adamw_step_

    if not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(7)
    sizes = [3000, 5, 1024]
    ps = [torch.randn(n, generator=gen).to(pdtype).to(dev) for n in sizes]
    gs = [torch.randn(n, generator=gen).to(pdtype).to(dev) for n in sizes]
    ms = [torch.randn(n, generator=gen).mul(0.1).to(dev) for n in sizes]  # fp32 state
    vs = [torch.rand(n, generator=gen).mul(0.1).to(dev) for n in sizes]
    steps = [torch.tensor(float(s)) for s in (0, 4, 9)]
    scales = [1.0, 0.5, 0.0]
    kw = dict(lr=1e-2, alpha=0.25, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    refs = [oracle_step(p, g, m, v, int(s) + 1, sc, **kw) for p, g, m, v, s, sc in zip(ps, gs, ms, vs, steps, scales)]
    adamw_step_(ps, gs, ms, vs, steps, m_scales=scales, **kw)
    assert [float(s) for s in steps] == [1.0, 5.0, 10.0]
    for p, m, v, (rp, rm, rv) in zip(ps, ms, vs, refs):
        assert p.dtype == pdtype and m.dtype == torch.float32
        assert rel_err(m.cpu(), rm) <= 1e-6
        assert rel_err(v.cpu(), rv) <= 1e-6
        if pdtype == torch.float32:
            assert rel_err(p.cpu(), rp) <= 1e-6
        else:  # one rounding of the fp32 result to the parameter dtype (at most 1 ulp: the
            # interpreter truncates on the bf16 cast instead of rounding to nearest)
            ulp = 2**-7 if pdtype == torch.bfloat16 else 2**-10
            assert torch.allclose(p.cpu().double(), rp, rtol=ulp, atol=1e-6)


@needs_triton
def test_optimizer_triton_path_matches_torch_path():
    if not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a_p = [p.to(dev) for p in make_params()]
    b_p = [p.to(dev) for p in make_params()]
    a_p = [torch.nn.Parameter(p.detach()) for p in a_p]
    b_p = [torch.nn.Parameter(p.detach()) for p in b_p]
    a = ClipAwareAdamW(groups_of(a_p), backend="torch", foreach=True)
    b = ClipAwareAdamW(groups_of(b_p), backend="triton")
    gen = torch.Generator().manual_seed(8)
    for i in range(6):
        for p, q in zip(a_p, b_p):
            g = torch.randn(p.shape, generator=gen).to(dev)
            p.grad, q.grad = g.clone(), g.clone()
        s = signal_for(i)
        a.observe(s)
        b.observe(s)
        a.step()
        b.step()
    for p, q in zip(a_p, b_p):
        assert rel_err(q.detach().cpu(), p.detach().cpu()) <= 1e-6
        assert rel_err(b.state[q]["exp_avg"].cpu(), a.state[p]["exp_avg"].cpu()) <= 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_kernel_identity_with_fused_adamw():
    a_p = [torch.nn.Parameter(p.detach().cuda()) for p in make_params()]
    b_p = [torch.nn.Parameter(p.detach().cuda()) for p in make_params()]
    ref = torch.optim.AdamW(groups_of(a_p), fused=True)
    ours = ClipAwareAdamW(groups_of(b_p))  # backend="auto" -> Triton on CUDA
    for _ in range(50):
        for p, q in zip(a_p, b_p):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    for p, q in zip(a_p, b_p):
        assert rel_err(q.detach(), p.detach()) <= 1e-6


def test_benchmark_script_smoke(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_optimizer.py"
    spec = importlib.util.spec_from_file_location("bench_optimizer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(
        [
            "--device",
            "cpu",
            "--sizes",
            "2e4",
            "--tensors",
            "4",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    import json

    res = json.loads((tmp_path / "b.json").read_text())["results"]["20000"]
    assert res["AdamW foreach"]["ratio"] == 1.0
    signal = res["ClipAwareAdamW fused, signal"]
    assert signal["baseline"] == "AdamW fused" and signal["kappa"] == pytest.approx(0.7)
    assert 0.4 <= signal["alpha"] <= 0.5  # the controller really runs below 1 (not at its floor)
    assert res["ClipAwareAdamW default, no signal"]["alpha"] == 1.0
    assert "| 0.02M |" in capsys.readouterr().out


def test_deepcopy_and_pickle_keep_knobs_and_state():
    import pickle

    p = torch.nn.Parameter(torch.randn(4))
    opt = ClipAwareAdamW([p], tau=0.1, shrink=0.25, gate=False, foreach=True)
    opt.observe(sig(overshoot=50))
    p.grad = torch.randn(4)
    opt.step()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert (clone.tau, clone.shrink, clone.gate, clone.alpha) == (0.1, 0.25, False, 0.25)
        assert clone._backtrack_fn is None and clone._step_supports_amp_scaling is False
        (q,) = clone.param_groups[0]["params"]
        q.grad = p.grad.clone()
        clone.observe(sig())
        clone.step()
        assert clone.alpha == pytest.approx(0.3125)
