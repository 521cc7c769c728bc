"""Regression tests for the loss and kernel defects a hostile-input review found (issue 14, items 2,
3, 5, 6, 7, 8, 11 and the loss part of 12).  Each one failed on 364f844.

They use only names that existed then (``grpo_fix.kernels.*_surrogate_loss`` still resolve, with a
DeprecationWarning), so the same file runs against the old tree.  Both vocabulary backends must
satisfy one contract: the torch references and the Triton kernels (through the interpreter).
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from grpo_fix import PRESETS, GroupSurrogateLoss, group_advantages, prefix_consistent_advantages, surrogate_loss

BACKENDS = ("torch", "triton")
B, T, V, H, G = 4, 5, 17, 6, 2


def batch(seed: int = 0, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1:] = False
    return dict(
        logits=torch.randn(B, T, V, generator=g, dtype=dtype),
        hidden=torch.randn(B, T, H, generator=g, dtype=dtype),
        weight=torch.randn(V, H, generator=g, dtype=dtype) * 0.3,
        ids=torch.randint(0, V, (B, T), generator=g),
        adv=torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=dtype),
        mask=mask,
    )


def grads(backend: str, d: dict, path: str):
    """(loss, grads) of one call on the chosen vocabulary path and backend."""
    loss_fn = GroupSurrogateLoss("uniform", backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if path == "logits":
            z = d["logits"].clone().requires_grad_(True)
            out = loss_fn.forward_logits(z * 1.0, d["ids"], None, d["adv"], d["mask"], group_size=G)
            out.loss.backward()
            return out.loss, (z.grad,)
        h, w = d["hidden"].clone().requires_grad_(True), d["weight"].clone().requires_grad_(True)
        out = loss_fn.forward_hidden(h, w, d["ids"], None, d["adv"], d["mask"], group_size=G)
        out.loss.backward()
        return out.loss, (h.grad, w.grad)


# ------------------------------------------------------------------------------------------ item 3
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["logits", "hidden"])
@pytest.mark.parametrize("poison", ["nan", "inf", "all -inf row"])
def test_garbage_at_masked_positions_never_reaches_the_gradient(backend, path, poison):
    """NaN, +inf or an all -inf row at a masked position: finite loss AND finite gradients (logits,
    hidden states, lm_head weight), equal to those of a clean batch, on both backends."""
    clean = batch()
    d = batch()
    key = "logits" if path == "logits" else "hidden"
    row = d[key][0, 4]  # masked position (row 0 is masked from t = 3)
    row.fill_({"nan": float("nan"), "inf": float("inf"), "all -inf row": float("-inf")}[poison])
    loss, gs = grads(backend, d, path)
    ref_loss, ref_gs = grads("torch", clean, path)
    assert torch.isfinite(loss)
    for g, r in zip(gs, ref_gs):
        assert torch.isfinite(g).all(), f"non-finite gradient on the {backend} backend"
        torch.testing.assert_close(g[torch.isfinite(r)], r[torch.isfinite(r)], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ item 5
@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_ids_at_masked_positions_are_harmless(backend):
    d = batch()
    ids = d["ids"].clone()
    ids[~d["mask"]] = -100
    loss, (g,) = grads(backend, dict(d, ids=ids), "logits")
    ref_loss, (ref,) = grads("torch", d, "logits")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_out_of_range_ids_at_valid_positions_name_completion_ids(backend, path):
    for bad in (V, -1):
        d = batch()
        d["ids"][1, 0] = bad
        with pytest.raises(ValueError, match="completion_ids"):
            grads(backend, d, path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_sequence_logits_and_hidden_states_are_refused(backend):
    """(B, P + T, V) logits or hidden states of the whole sequence gave a silently wrong loss."""
    d = batch()
    with pytest.raises(ValueError, match="logits"):
        grads(backend, dict(d, logits=torch.randn(B, T + 3, V)), "logits")
    with pytest.raises(ValueError, match="hidden"):
        grads(backend, dict(d, hidden=torch.randn(B, T + 3, H)), "hidden")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_is_refused(backend, temperature):
    d = batch()
    loss_fn = GroupSurrogateLoss("uniform", backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        loss_fn.forward_logits(d["logits"], d["ids"], None, d["adv"], d["mask"], group_size=G, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        loss_fn.forward_hidden(
            d["hidden"], d["weight"], d["ids"], None, d["adv"], d["mask"], group_size=G, temperature=temperature
        )


def test_nograd_logprob_functions_refuse_out_of_range_ids():
    from grpo_fix.kernels import linear_logprobs, selective_logprob_nograd

    d = batch()
    ids = d["ids"].clone()
    ids[1, 0] = V + 3
    with pytest.raises(ValueError, match="completion_ids|ids"):
        selective_logprob_nograd(d["logits"], ids, d["mask"])
    with pytest.raises(ValueError, match="completion_ids|ids"):
        linear_logprobs(d["hidden"], d["weight"], ids, d["mask"])


# ------------------------------------------------------------------------------------------ item 6
def _logp_batch():
    g = torch.Generator().manual_seed(3)
    logp = (-torch.rand(B, T, generator=g)).requires_grad_(True)
    return logp, logp.detach() + 0.05 * torch.randn(B, T, generator=g), torch.tensor([1.0, -1.0, 0.5, -0.5])


@pytest.mark.parametrize(
    "preset,kwargs",
    [
        ("uniform", {"num_window_tokens": float("nan")}),
        ("uniform", {"num_window_tokens": float("inf")}),
        ("uniform", {"num_window_tokens": torch.tensor(float("nan"))}),
        ("grpo", {"num_window_seqs": 0}),
        ("grpo", {"num_window_seqs": -4}),
        ("grpo", {"num_window_seqs": 1}),
        ("uniform", {"num_micro_batches": float("nan")}),
        ("uniform", {"dp_size": float("nan")}),
    ],
)
def test_window_counts_are_validated(preset, kwargs):
    logp, old, adv = _logp_batch()
    mask = torch.ones(B, T, dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises((ValueError, TypeError), match="num_window|seqs|tokens|micro_batches|dp_size"):
            surrogate_loss(PRESETS[preset], logp, old, adv, mask, group_size=None, **kwargs)


# ------------------------------------------------------------------------------------------ item 7
@pytest.mark.parametrize("preset", ["uniform", "grpo", "gspo", "dapo", "cispo"])
def test_old_logp_with_grad_is_a_constant(preset):
    """old_logp=logp (the natural on-policy call) must give the on-policy gradient, not zero."""
    logp, _, adv = _logp_batch()
    mask = torch.ones(B, T, dtype=torch.bool)
    (g_const,) = torch.autograd.grad(
        surrogate_loss(PRESETS[preset], logp, logp.detach(), adv, mask, group_size=None).loss, logp
    )
    (g_same,) = torch.autograd.grad(surrogate_loss(PRESETS[preset], logp, logp, adv, mask, group_size=None).loss, logp)
    assert g_const.abs().sum() > 0
    torch.testing.assert_close(g_same, g_const)


def test_ref_logp_gets_no_gradient():
    logp, old, adv = _logp_batch()
    ref = (old - 0.1).clone().requires_grad_(True)
    out = surrogate_loss(
        PRESETS["grpo_r1"].replace(beta=0.1),
        logp,
        old,
        adv,
        torch.ones(B, T, dtype=torch.bool),
        group_size=None,
        ref_logp=ref,
    )
    out.loss.backward()
    assert ref.grad is None or not ref.grad.abs().any()


# ------------------------------------------------------------------------------------------ item 8
@pytest.mark.parametrize("value", [3.4e38, -3.4e38])
def test_huge_advantages_raise_instead_of_nan(value):
    logp, old, _ = _logp_batch()
    adv = torch.tensor([value, 1.0, -1.0, 0.5])
    with pytest.raises(ValueError, match="advantages"):
        surrogate_loss(PRESETS["uniform"], logp, old, adv, torch.ones(B, T, dtype=torch.bool), group_size=None)


def test_group_advantages_of_huge_finite_rewards_are_finite():
    rewards = torch.tensor([3.0e38, -3.0e38, 1.0e38, 2.0e38])
    adv = group_advantages(rewards, 2)
    assert torch.isfinite(adv).all() and adv.dtype == torch.float32
    torch.testing.assert_close(adv[:2].abs(), torch.full((2,), 0.7071), rtol=1e-3, atol=0)


# ----------------------------------------------------------------------------------------- item 11
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_zero_width_vocabulary_is_a_clear_error(backend, path):
    """(B, T, 0) logits killed the process in the Triton entry points: run in a child process."""
    code = f"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from grpo_fix import GroupSurrogateLoss
f = GroupSurrogateLoss("uniform", backend={backend!r})
ids, mask, adv = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool), torch.tensor([1.0, -1.0])
try:
    if {path!r} == "logits":
        f.forward_logits(torch.zeros(2, 3, 0, requires_grad=True), ids, None, adv, mask, group_size=2)
    else:
        f.forward_hidden(torch.zeros(2, 3, 4, requires_grad=True), torch.zeros(0, 4), ids, None, adv, mask,
                         group_size=2)
except ValueError as e:
    print("ValueError:", e)
    sys.exit(0)
sys.exit(3)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"rc={proc.returncode}: {proc.stdout[-500:]} {proc.stderr[-1500:]}"
    assert "vocab" in proc.stdout.lower() or "v = 0" in proc.stdout.lower()


def test_second_backward_through_the_logits_path_is_refused():
    """The Triton backward writes the gradient over the logits; a second backward read garbage."""
    d = batch()
    z = d["logits"].clone().requires_grad_(True)
    out = GroupSurrogateLoss("uniform", backend="triton").forward_logits(
        z * 1.0, d["ids"], None, d["adv"], d["mask"], group_size=G
    )
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        out.loss.backward()


# ------------------------------------------------------------------------------- item 12 (loss part)
def test_prefix_consistent_advantages_refuse_nan_and_non_binary_masks():
    ids = torch.tensor([[1, 2, 3], [1, 2, 4], [5, 6, 7], [5, 6, 8]])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    bad = adv.clone()
    bad[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prefix_consistent_advantages(ids, bad, 2, torch.ones(4, 3))
    with pytest.raises(ValueError, match="0 and 1"):
        prefix_consistent_advantages(ids, adv, 2, torch.full((4, 3), 2.0))


def test_nan_per_token_advantages_at_masked_positions_are_ignored():
    logp, old, adv = _logp_batch()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 2:] = False
    tok = adv[:, None].expand(B, T).clone()
    tok[1, 3] = float("nan")
    out = surrogate_loss(PRESETS["uniform"], logp, old, tok, mask, group_size=None)
    clean = tok.clone()
    clean[1, 3] = 0.0
    ref = surrogate_loss(PRESETS["uniform"], logp, old, clean, mask, group_size=None)
    torch.testing.assert_close(out.loss, ref.loss)


@pytest.mark.parametrize("argument", ["logp", "old_logp", "advantages", "mask"])
@pytest.mark.parametrize("kind", ["list", "numpy"])
def test_non_tensor_inputs_name_the_argument(argument, kind):
    logp, old, adv = _logp_batch()
    args = dict(logp=logp, old_logp=old, advantages=adv, mask=torch.ones(B, T, dtype=torch.bool))
    value = args[argument].detach().numpy()
    args[argument] = value.tolist() if kind == "list" else value
    with pytest.raises((TypeError, ValueError), match=argument):
        surrogate_loss(
            PRESETS["uniform"], args["logp"], args["old_logp"], args["advantages"], args["mask"], group_size=None
        )


def test_helpers_name_non_tensor_arguments():
    with pytest.raises((TypeError, ValueError), match="rewards"):
        group_advantages([1.0, 0.0], 2)
    with pytest.raises((TypeError, ValueError), match="advantages"):
        prefix_consistent_advantages(torch.zeros(2, 3, dtype=torch.long), np.zeros(2), 2)


# -------------------------------------------------------------------------------- item 2 (loss part)
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_on_policy_no_preset_reports_overshoot(name):
    """At ratio 1 no token is past the trust region, whatever the clip / cap settings (TRL's cispo
    with its default epsilon_high maps to a cap below 1: eps_high = 0.2 - 1)."""
    logp, _, adv = _logp_batch()
    caps = (None, 0.28, -0.8) if PRESETS[name].ratio == "sg_logp" else (None, 0.28)
    for eps_high in caps:
        cfg = PRESETS[name] if eps_high is None else PRESETS[name].replace(eps_high=eps_high)
        sig = surrogate_loss(cfg, logp, None, adv, torch.ones(B, T, dtype=torch.bool), group_size=None).signal
        assert float(sig.num_overshoot) == 0 and float(sig.max_excess) == 0, (name, eps_high)


@pytest.mark.parametrize("preset", ["gspo", "gcpo", "vespo", "uniform"])
def test_calls_with_no_tokens_per_row(preset):
    """Zero-length rows (T = 0) give a zero loss and a zero signal on every ratio kind (sequence
    ratios have a (B, 1) log-ratio even then: the diagnostics once took its max over no tokens)."""
    lp = torch.zeros(2, 0, requires_grad=True)
    out = GroupSurrogateLoss(preset)(
        lp, torch.zeros(2, 0), torch.ones(2), torch.zeros(2, 0, dtype=torch.bool), group_size=1
    )
    assert float(out.loss) == 0.0 and float(out.signal.max_excess) == 0.0 and float(out.signal.num_tokens) == 0.0


@pytest.mark.parametrize("B,T", [(4, 5), (64, 512)])
def test_everything_clipped_gives_exactly_zero_active_mass(B, T):
    """The signal's active mass is the total minus the clipped tokens' mass: with every token
    clipped it must be exactly 0, never a rounding-negative mass that ClipAwareAdamW refuses."""
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(B, T, generator=g)
    adv = torch.randn(B, generator=g).abs() + 0.1
    old = logp - 1.0  # every ratio e^1 > 1.2 with A > 0: all clipped
    sig = surrogate_loss(
        PRESETS["uniform"], logp.requires_grad_(), old, adv, torch.ones(B, T, dtype=torch.bool), group_size=None
    ).signal
    sig.validate()
    assert float(sig.active_mass) == 0.0 and float(sig.kappa) == 0.0 and float(sig.total_mass) > 0
