"""Bad input gets a clear ValueError or a defined finite result, never a silent NaN."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grpo_fix import PRESETS, GroupSurrogateLoss, SurrogateConfig, group_advantages, prefix_consistent_advantages


def _batch(B=4, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g)).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    return logp, old, adv, mask


def _call(preset="uniform", **kw):
    logp, old, adv, mask = _batch()
    args = dict(logp=logp, old_logp=old, advantages=adv, mask=mask)
    args.update({k: v for k, v in kw.items() if k in args})
    rest = {k: v for k, v in kw.items() if k not in args}
    rest.setdefault("group_size", 2)
    return GroupSurrogateLoss(preset)(args["logp"], args["old_logp"], args["advantages"], args["mask"], **rest)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"old_logp": torch.zeros(4, 5)}, "old_logp shape"),
        ({"mask": torch.ones(4, 5)}, "mask shape"),
        ({"advantages": torch.zeros(3)}, "advantages must be"),
        ({"advantages": torch.zeros(4, dtype=torch.long)}, "advantages must be a floating"),
        ({"logp": torch.zeros(4, 6, dtype=torch.long)}, "logp must be a floating"),
        ({"logp": torch.zeros(4)}, r"logp must be a \(B, T\)"),
        ({"group_size": 3}, "does not divide"),
        ({"group_size": 0}, "positive int"),
        ({"mask": torch.full((4, 6), 2)}, "only 0 and 1"),
        ({"logp": torch.full((4, 6), float("nan"))}, "logp has NaN"),
        ({"old_logp": torch.full((4, 6), float("inf"))}, "old_logp has NaN"),
        ({"advantages": torch.tensor([0.0, float("nan"), 0.0, 0.0])}, "advantages contain"),
        ({"num_window_tokens": 5}, "num_window_tokens is smaller"),
        ({"completion_ids": torch.zeros(4, 6)}, "integer tensor"),
        ({"completion_ids": torch.zeros(4, 6, dtype=torch.long), "group_size": None}, "needs group_size"),
        ({"num_micro_batches": 0}, "must be >= 1"),
    ],
)
def test_clear_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(**kwargs)


def test_beta_without_reference_is_an_error():
    logp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match="needs ref_logp"):
        GroupSurrogateLoss("uniform", beta=0.1)(logp, old, adv, mask, group_size=2)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"weighting": "token_sum"}, "unknown weighting"),
        ({"ratio": "sequence"}, "needs token-level ratios"),
        ({"eps_low": 1.5}, "eps_low"),
        ({"eps_high": -0.1}, "eps_high"),
        ({"delta": 1.1}, "delta must exceed"),
        ({"beta": -1.0}, "beta"),
        ({"kl_estimator": "k4"}, "unknown kl_estimator"),
    ],
)
def test_bad_configuration(overrides, match):
    with pytest.raises(ValueError, match=match):
        GroupSurrogateLoss("uniform", **overrides)


def test_unknown_preset_and_invalid_prefix_combinations():
    with pytest.raises(ValueError, match="unknown preset"):
        GroupSurrogateLoss("ppo2")
    with pytest.raises(ValueError, match="constant within a group"):
        SurrogateConfig("seq_mean", "token", prefix_consistent=True)
    with pytest.raises(ValueError, match="ratio='token'"):
        SurrogateConfig("dapo", "sequence", prefix_consistent=True)


def test_nonfinite_values_at_masked_positions_are_harmless():
    logp, old, adv, mask = _batch()
    mask[0, 3:] = False
    logp_bad = logp.detach().clone()
    logp_bad[0, 3:] = float("nan")
    old_bad = old.clone()
    old_bad[0, 4:] = float("-inf")
    leaf = logp_bad.requires_grad_()
    out = GroupSurrogateLoss("uniform", beta=0.1)(leaf, old_bad, adv, mask, group_size=2, ref_logp=old_bad)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert (grad[0, 3:] == 0).all()
    clean = GroupSurrogateLoss("uniform", beta=0.1)(logp, old, adv, mask, group_size=2, ref_logp=old)
    torch.testing.assert_close(out.loss, clean.loss)


def test_empty_batch_and_all_masked_give_zero():
    for B, T in ((0, 5), (4, 0)):
        logp = torch.zeros(B, T, requires_grad=True)
        out = GroupSurrogateLoss("uniform")(logp, logp.detach(), torch.zeros(B), torch.ones(B, T), group_size=None)
        assert float(out.loss.detach()) == 0.0
        out.loss.backward()  # differentiable, connected to logp
    logp, old, adv, mask = _batch()
    out = GroupSurrogateLoss("grpo")(logp, old, adv, torch.zeros_like(mask), group_size=2)
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert float(out.loss.detach()) == 0.0 and (grad == 0).all()
    assert float(out.signal.kappa) == 1.0 and float(out.signal.num_tokens) == 0.0


def test_extreme_ratios_stay_finite():
    logp, _, adv, mask = _batch()
    old = logp.detach() - 1e4  # ratio e^{1e4} would overflow
    for preset in PRESETS:
        leaf = logp.detach().clone().requires_grad_()
        out = GroupSurrogateLoss(preset, beta=0.1)(leaf, old, adv, mask, group_size=2, ref_logp=old)
        (grad,) = torch.autograd.grad(out.loss, leaf)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all(), preset


def test_group_advantages_edge_cases():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.1 + 0.2, 0.3])
    a = group_advantages(r[:6], 3)
    assert (a[:3] == 0).all() and torch.isfinite(a).all()
    for scale in ("group", "batch", "none"):
        assert (group_advantages(torch.full((4,), 7.0), 2, scale=scale, eps=0.0) == 0).all()
    assert (group_advantages(torch.tensor([1.0, 2.0]), 1) == 0).all()  # G = 1
    with pytest.raises(ValueError, match="does not divide"):
        group_advantages(r, 3)
    with pytest.raises(ValueError, match="NaN or inf"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, 2, scale="global")
    a = group_advantages(torch.tensor([1.0, 0.0, 3.0, 1.0]), 2, scale="none")
    torch.testing.assert_close(a, torch.tensor([0.5, -0.5, 1.0, -1.0]))
    assert group_advantages(torch.tensor([1, 0]), 2).dtype == torch.float32


def test_prefix_consistent_advantages_errors():
    with pytest.raises(ValueError, match="integer"):
        prefix_consistent_advantages(torch.zeros(4, 3), torch.zeros(4), 2)
    with pytest.raises(ValueError, match="does not divide"):
        prefix_consistent_advantages(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4), 3)
    with pytest.raises(ValueError, match="advantages must be"):
        prefix_consistent_advantages(torch.zeros(4, 3, dtype=torch.long), torch.zeros(5), 2)
    assert prefix_consistent_advantages(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0), 2).shape == (0, 3)


@st.composite
def _random_call(draw):
    G = draw(st.integers(1, 4))
    B = G * draw(st.integers(0, 3))
    T = draw(st.integers(0, 7))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.0, 0.5, 5.0, 50.0]))
    logp = (-torch.rand(B, T, generator=g) * 5).to(dtype)
    old = (logp.float() + scale * torch.randn(B, T, generator=g)).to(dtype)
    mask = torch.rand(B, T, generator=g) < draw(st.floats(0.0, 1.0))
    rewards = torch.randint(0, 3, (B,), generator=g).float()
    ids = torch.randint(0, 3, (B, T), generator=g)
    non_contig = draw(st.booleans())
    if non_contig and T > 1:
        logp, old, mask, ids = (x.t().contiguous().t() for x in (logp, old, mask, ids))
    preset = draw(st.sampled_from(sorted(PRESETS)))
    beta = draw(st.sampled_from([0.0, 0.1]))
    return dict(
        logp=logp,
        old=old,
        mask=mask,
        rewards=rewards,
        ids=ids,
        G=G,
        preset=preset,
        beta=beta,
        with_ids=draw(st.booleans()),
    )


@settings(
    max_examples=int(__import__("os").environ.get("GRPO_FIX_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(_random_call())
def test_property_finite_loss_and_gradient(c):
    adv = group_advantages(c["rewards"], c["G"])
    leaf = c["logp"].clone().requires_grad_()
    out = GroupSurrogateLoss(c["preset"], beta=c["beta"])(
        leaf,
        c["old"],
        adv,
        c["mask"],
        group_size=c["G"],
        completion_ids=c["ids"] if c["with_ids"] else None,
        ref_logp=c["old"] if c["beta"] else None,
    )
    (grad,) = torch.autograd.grad(out.loss, leaf)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert (grad[~c["mask"]] == 0).all()
    sig = out.signal
    sig.validate()
    assert 0.0 <= float(sig.kappa) <= 1.0
    assert float(sig.num_tokens) == float(c["mask"].sum())
    for v in out.metrics.values():
        assert torch.isfinite(v)


# ------------------------------------------------------------------------------------------------
# issue 8: token counts above 65,535 and the kernels' logits entry point with extreme logits
# ------------------------------------------------------------------------------------------------
def test_token_count_above_65535_is_exact():
    """One row of 70,000 valid tokens: counts stay exact (no 16-bit overflow), the loss and its
    gradient are finite and equal the float64 computation, every token gets the same gradient."""
    T = 70_000
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(1, T, generator=g)
    old = logp + 0.01 * torch.randn(1, T, generator=g)
    adv = torch.tensor([0.7])
    mask = torch.ones(1, T)
    mask[0, -5:] = 0
    outs = {}
    for dt in (torch.float32, torch.float64):
        leaf = logp.to(dt).requires_grad_()
        out = GroupSurrogateLoss("uniform")(leaf, old.to(dt), adv.to(dt), mask.to(dt), group_size=None)
        (grad,) = torch.autograd.grad(out.loss, leaf)
        outs[dt] = (out, grad)
    out, grad = outs[torch.float32]
    assert float(out.signal.num_tokens) == T - 5 and float(out.signal.total_mass) > 0
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all() and (grad[0, -5:] == 0).all()
    torch.testing.assert_close(out.loss.double(), outs[torch.float64][0].loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), outs[torch.float64][1], rtol=1e-4, atol=1e-9)


_FILLS = [1e4, -1e4, float("inf"), float("-inf"), float("nan")]


@st.composite
def _extreme_logits(draw):
    B, T, V = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 9))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) < draw(st.floats(0.0, 1.0))).float()
    for _ in range(draw(st.integers(0, 3))):  # extreme values at random (masked or unmasked) positions
        b, t = draw(st.integers(0, B - 1)), draw(st.integers(0, T - 1))
        v = ids[b, t] if draw(st.booleans()) else draw(st.integers(0, V - 1))  # often the target id
        logits[b, t, v] = draw(st.sampled_from(_FILLS))
    if draw(st.booleans()):  # a whole masked row of garbage
        logits[0, :, :] = draw(st.sampled_from(_FILLS))
        mask[0] = 0
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    old = -2.0 + torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    return dict(logits=logits.to(dtype), ids=ids, mask=mask, old=old, adv=adv)


@settings(
    max_examples=int(__import__("os").environ.get("GRPO_FIX_HYPOTHESIS_EXAMPLES", "60")) // 2,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(_extreme_logits())
def test_property_kernel_logits_entry_extreme_values(c):
    """grpo_fix.kernels.logits_surrogate_loss (Triton; TRITON_INTERPRET=1 on CPU) with +-1e4, inf
    and NaN logits: garbage at masked positions changes nothing; at valid positions either the
    log-probs are still finite (then loss and gradient equal the float64 torch oracle) or a
    ValueError names the NaN/inf; never a silent NaN."""
    from grpo_fix.kernels import logits_surrogate_loss

    loss_fn = GroupSurrogateLoss("uniform")
    valid = c["mask"].bool()
    ref_logp = torch.log_softmax(c["logits"].double(), -1).gather(-1, c["ids"][..., None]).squeeze(-1)
    leaf = c["logits"].clone().requires_grad_()
    if not torch.isfinite(ref_logp[valid]).all():
        with pytest.raises(ValueError, match="NaN/inf at valid"):
            logits_surrogate_loss(
                loss_fn, leaf, c["ids"], c["old"], c["adv"], c["mask"], group_size=None, inplace_backward=False
            )
        return
    out = logits_surrogate_loss(
        loss_fn, leaf, c["ids"], c["old"], c["adv"], c["mask"], group_size=None, inplace_backward=False
    )
    out.loss.backward()
    grad = leaf.grad.float()
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert (grad[~valid] == 0).all()
    # oracle: float64 log_softmax of the same (rounded) logits; masked positions zeroed
    oracle_leaf = torch.where(valid[..., None], c["logits"].double(), 0.0).requires_grad_()
    logp = torch.log_softmax(oracle_leaf, -1).gather(-1, c["ids"][..., None]).squeeze(-1)
    ref = loss_fn(logp, c["old"].double(), c["adv"].double(), c["mask"].double(), group_size=None)
    ref.loss.backward()
    torch.testing.assert_close(out.loss.double(), ref.loss.detach(), rtol=1e-4, atol=1e-5)
    ref_grad = torch.where(valid[..., None], oracle_leaf.grad, 0.0)
    # the gradient is returned in the logits' dtype: its rounding sets the tolerance
    tol = {torch.float32: (1e-3, 1e-5), torch.float16: (2e-3, 1e-4), torch.bfloat16: (1.6e-2, 1e-3)}[leaf.dtype]
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol[0], atol=tol[1])
