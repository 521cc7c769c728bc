"""grpo_fix.kernels against the torch oracle (``log_softmax(z.float() / T).gather`` + ``surrogate_loss``).

CPU runs use the Triton interpreter (conftest sets TRITON_INTERPRET=1); shapes are small so every
launch stays around <= 1000 program-iterations.  GPU-only numerics tests skip without CUDA and under
the interpreter; on a GPU machine run them with ``TRITON_INTERPRET=0 pytest tests/test_kernels.py -k gpu``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys

import pytest
import torch

from grpo_fix import PRESETS, group_advantages, resolve_config, surrogate_loss
from grpo_fix.kernels import (
    linear_logprobs,
    linear_surrogate_loss,
    logits_surrogate_loss,
    selective_logprob,
    selective_logprob_nograd,
)

TOL = dict(rtol=1e-5, atol=1e-5)
#: The oracle: grpo_fix's torch loss with the eager math (the kernel paths compile it on CUDA).
oracle_loss = functools.partial(surrogate_loss, compile_math=False)
BETA_PRESETS = ("grpo_r1", "dapo", "uniform", "gspo")  # beta > 0 + ref_logp for these
cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    reason="needs CUDA and compiled (not interpreted) Triton kernels",
)
# the oracle tests run on CPU under the interpreter, and on CUDA with the compiled kernels
# (`TRITON_INTERPRET=0 pytest tests/test_kernels.py -k cuda` on a GPU machine)
DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="CPU tensors need TRITON_INTERPRET=1"
        ),
    ),
    pytest.param("cuda", marks=cuda),
]


def to_device(d: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in d.items()}


# ----------------------------------------------------------------------------- data and oracle


def make_batch(B=6, T=7, V=384, G=3, seed=0, all_masked_row=True, zero_adv=False, spread=0.4):
    """Groups with shared prefixes, ragged masks (one all-masked row), old/ref log-probs near the
    current policy (some tokens clipped on both sides)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2.0
    ids = torch.randint(0, V, (B, T), generator=g)
    for start in range(0, B, G):  # rows of a group share a random-length prefix
        for r in range(start + 1, start + G):
            k = int(torch.randint(0, T, (1,), generator=g))
            ids[r, :k] = ids[start, :k]
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if all_masked_row:
        mask[B - 2] = False
    with torch.no_grad():
        lp = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    scale = torch.rand(B, 1, generator=g) * spread + 1e-4
    old = lp + torch.randn(B, T, generator=g) * scale
    ref = lp + torch.randn(B, T, generator=g) * 0.3
    rewards = torch.randn(B, generator=g)
    adv = torch.zeros(B) if zero_adv else group_advantages(rewards, G)
    return dict(logits=logits, ids=ids, mask=mask, old=old, ref=ref, adv=adv, G=G)


def oracle_logp(z, ids, temperature=1.0):
    return torch.log_softmax(z.float() / temperature, -1).gather(-1, ids[..., None].long())[..., 0]


def assert_outputs_close(out, ref, tol=TOL):
    torch.testing.assert_close(out.loss.detach().double(), ref.loss.detach().double(), **tol)
    for f in dataclasses.fields(ref.signal):
        a, b = getattr(out.signal, f.name), getattr(ref.signal, f.name)
        if isinstance(b, torch.Tensor):
            torch.testing.assert_close(a.double(), b.double(), **tol, msg=f"signal.{f.name}")
        else:
            assert a == b, f.name
    assert set(out.metrics) == set(ref.metrics)
    for k in ref.metrics:
        torch.testing.assert_close(out.metrics[k].double(), ref.metrics[k].double(), **tol, msg=f"metric {k}")


def cfg_for(name, beta):
    return resolve_config(name, beta=beta) if beta else PRESETS[name]


def preset_case(name, make, device):
    """(config, batch on ``device``, use_ref) for preset ``name``: beta > 0 with reference
    log-probs for :data:`BETA_PRESETS`, old log-probs near the policy (very near for gspo, whose
    sequence ratio would clip everything otherwise)."""
    beta = 0.05 if name in BETA_PRESETS else 0.0
    d = to_device(make(seed=sum(map(ord, name)), spread=0.4 if name != "gspo" else 0.002), device)
    return cfg_for(name, beta), d, beta > 0


def run_logits_pair(cfg, d, *, temperature=1.0, inplace=True, use_ref=False, dtype=torch.float32, window=None):
    kw = dict(window or {})
    ref_logp = d["ref"] if use_ref else None
    base = d["logits"].to(dtype)
    # oracle on the same (upcast) values
    z_ref = base.float().clone().requires_grad_(True)
    ref = oracle_loss(
        cfg,
        oracle_logp(z_ref, d["ids"], temperature),
        d["old"],
        d["adv"],
        d["mask"],
        group_size=d["G"],
        completion_ids=d["ids"],
        ref_logp=ref_logp,
        **kw,
    )
    ref.loss.backward()
    z = base.clone().requires_grad_(True)
    out = logits_surrogate_loss(
        cfg,
        z * 1 if inplace else z,
        d["ids"],
        d["old"],
        d["adv"],
        d["mask"],
        group_size=d["G"],
        temperature=temperature,
        ref_logp=ref_logp,
        inplace_backward=inplace,
        **kw,
    )
    out.loss.backward()
    return out, ref, z.grad, z_ref.grad


# ----------------------------------------------------------------------------- selective log-prob


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_logprob_forward_backward(temperature, device):
    d = to_device(make_batch(B=4, T=5, V=1000, G=2), device)
    z0, ids, mask = d["logits"], d["ids"], d["mask"]
    w = torch.randn(4, 5).to(device)
    zr = z0.clone().requires_grad_(True)
    ref = oracle_logp(zr, ids, temperature) * mask
    (ref * w).sum().backward()
    for inplace in (False, True):
        z = z0.clone().requires_grad_(True)
        lp = selective_logprob(z * 1.0, ids, mask, temperature, inplace=inplace)
        torch.testing.assert_close(lp, ref.detach(), **TOL)
        assert (lp[~mask] == 0).all()
        (lp * w).sum().backward()
        torch.testing.assert_close(z.grad, zr.grad, **TOL)
        assert (z.grad[~mask] == 0).all()
    nog = selective_logprob_nograd(z0, ids, mask, temperature)
    torch.testing.assert_close(nog, ref.detach(), **TOL)


def test_inplace_writes_into_logits_buffer():
    d = make_batch(B=2, T=4, V=256, G=2)
    buf = d["logits"].clone().requires_grad_(True)
    z = buf * 1.0  # non-leaf buffer owned by the graph
    captured = {}
    z.register_hook(lambda g: captured.setdefault("g", g))
    lp = selective_logprob(z, d["ids"], d["mask"], inplace=True)
    lp.sum().backward()
    assert captured["g"].data_ptr() == z.data_ptr(), "in-place backward must reuse the logits storage"


@pytest.mark.parametrize("device", DEVICES)
def test_backward_skips_rows_with_zero_upstream_gradient(device):
    """Rows whose dL/dlogp is exactly 0 (clipped, zero advantage) are written as zeros without
    reading the logits: poisoning those rows with NaN after the forward changes nothing, and the
    other rows still equal the oracle."""
    from grpo_fix.kernels.logprob import logprob_backward, logprob_forward

    d = to_device(make_batch(B=3, T=4, V=300, G=3), device)
    z, ids, mask = d["logits"], d["ids"], d["mask"]
    _, lse = logprob_forward(z, ids, mask)
    w = torch.randn(3, 4).to(device)
    w[0, 1] = w[2, :] = 0.0
    poisoned = z.clone()
    poisoned[0, 1] = poisoned[2] = float("nan")  # a real read would turn these rows into NaN
    grad = logprob_backward(poisoned, ids, mask, lse, w * mask)
    zr = z.clone().requires_grad_(True)
    (oracle_logp(zr, ids) * mask * w).sum().backward()
    assert (grad[0, 1] == 0).all() and (grad[2] == 0).all()
    torch.testing.assert_close(grad, zr.grad, **TOL)


def test_strided_layouts_shifted_packed_int32_float_mask():
    g = torch.Generator().manual_seed(3)
    B, T, V = 3, 4, 500
    full = torch.randn(T + 1, B, V, generator=g).transpose(0, 1)  # (B, T+1, V), row strides not contiguous
    ids = torch.randint(0, V, (T, B), generator=g).t()  # non-contiguous ids
    mask = (torch.rand(B, 2 * T, generator=g) > 0.3)[:, ::2]  # strided mask
    fmask = mask.float()
    ref = oracle_logp(full[:, :T], ids) * mask
    w = torch.randn(B, T, generator=g)
    # shifted (B, T+1, V): last position ignored, zero grad
    z = full.clone().requires_grad_(True)
    lp = selective_logprob(z, ids.to(torch.int32), fmask)
    torch.testing.assert_close(lp, ref, **TOL)
    (lp * w).sum().backward()
    zr = full.clone().requires_grad_(True)
    ((oracle_logp(zr[:, :T], ids) * mask) * w).sum().backward()
    torch.testing.assert_close(z.grad, zr.grad, **TOL)
    # sliced view with a row stride, in place
    z2 = full.clone().requires_grad_(True)
    lp2 = selective_logprob((z2 * 1.0)[:, :T], ids, mask, inplace=True)
    (lp2 * w).sum().backward()
    torch.testing.assert_close(z2.grad, zr.grad, **TOL)
    # packed (N, V) with a row stride
    packed = full[:, :T].reshape(B * T, V)[::1]
    wide = torch.zeros(B * T, V + 64)
    wide[:, :V] = packed
    lp3 = selective_logprob_nograd(wide[:, :V], ids.reshape(-1), mask.reshape(-1))
    torch.testing.assert_close(lp3, ref.reshape(-1), **TOL)


def test_extreme_logits_no_nan():
    B, T, V = 2, 3, 300
    z = torch.full((B, T, V), -1e4)
    z[..., ::7] = 1e4
    ids = torch.tensor([[0, 1, 7], [14, 2, 299]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]], dtype=torch.bool)
    zz = z.clone().requires_grad_(True)
    lp = selective_logprob(zz, ids, mask)
    ref = oracle_logp(z, ids) * mask
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(lp, ref, **TOL)
    lp.sum().backward()
    assert torch.isfinite(zz.grad).all()


def test_errors():
    d = make_batch(B=2, T=3, V=64, G=2)
    z = d["logits"]
    with pytest.raises(ValueError, match="vocab"):
        selective_logprob(z.transpose(1, 2).contiguous().transpose(1, 2), d["ids"], d["mask"])
    with pytest.raises(ValueError, match="dtype"):
        selective_logprob(z.double(), d["ids"], d["mask"])
    with pytest.raises(ValueError, match="ids"):
        selective_logprob(z, d["ids"].float(), d["mask"])
    with pytest.raises(ValueError, match="shape"):
        selective_logprob(z[:, :2], d["ids"], d["mask"])
    W = torch.randn(64, 8)
    with pytest.raises(ValueError, match="dtype"):
        linear_surrogate_loss("grpo", torch.randn(2, 3, 8), W.half(), d["ids"], None, d["adv"], d["mask"], group_size=2)
    with pytest.raises(ValueError, match="hidden size"):
        linear_surrogate_loss("grpo", torch.randn(2, 3, 9), W, d["ids"], None, d["adv"], d["mask"], group_size=2)
    with pytest.raises(ValueError, match="ref_logp"):
        linear_surrogate_loss(
            resolve_config("grpo", beta=0.1), torch.randn(2, 3, 8), W, d["ids"], None, d["adv"], d["mask"], group_size=2
        )


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    d = make_batch(B=2, T=3, V=64, G=2)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        selective_logprob(d["logits"], d["ids"], d["mask"])


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import grpo_fix.kernels as k\n"
        "assert not k.is_available()\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


# ----------------------------------------------------------------------------- logits path


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_logits_loss_every_preset(name, device):
    cfg, d, use_ref = preset_case(name, make_batch, device)
    out, ref, g, g_ref = run_logits_pair(cfg, d, temperature=0.9, use_ref=use_ref)
    assert_outputs_close(out, ref)
    torch.testing.assert_close(g, g_ref, **TOL)
    assert g.abs().sum() > 0


@pytest.mark.parametrize("inplace", [True, False])
def test_logits_loss_window_kwargs_and_inplace(inplace):
    d = make_batch(seed=11)
    for name, window in (
        ("dapo", dict(num_window_tokens=97, dp_size=2)),
        ("bnpo", dict(num_micro_batches=3)),
        ("grpo", dict(num_window_seqs=20, num_micro_batches=2)),
        ("dr_grpo", dict(num_micro_batches=2)),
    ):
        out, ref, g, g_ref = run_logits_pair(PRESETS[name], d, inplace=inplace, window=window)
        assert_outputs_close(out, ref)
        torch.testing.assert_close(g, g_ref, **TOL)


def test_logits_loss_zero_advantages_and_all_masked():
    d = make_batch(seed=5, zero_adv=True)
    out, ref, g, g_ref = run_logits_pair(PRESETS["uniform"], d)
    assert_outputs_close(out, ref)
    torch.testing.assert_close(g, g_ref, **TOL)
    assert g.abs().max() == 0
    # beta > 0 with zero advantages: only the KL gradient remains
    out, ref, g, g_ref = run_logits_pair(resolve_config("grpo", beta=0.1), d, use_ref=True)
    assert_outputs_close(out, ref)
    torch.testing.assert_close(g, g_ref, **TOL)
    assert g.abs().max() > 0
    # a fully masked batch
    d["mask"][:] = False
    out, ref, g, g_ref = run_logits_pair(PRESETS["dapo"], d)
    assert_outputs_close(out, ref)
    assert g.abs().max() == 0


def test_logits_loss_prefix_consistent_matters():
    """The uniform preset's prefix-consistent advantages reach the kernel path (W_agg == oracle and
    the gradient differs from the plain token-ratio one)."""
    d = make_batch(seed=21, spread=0.6)
    out, ref, g, g_ref = run_logits_pair(PRESETS["uniform"], d)
    assert_outputs_close(out, ref)
    torch.testing.assert_close(g, g_ref, **TOL)
    assert "w_agg" in out.metrics
    _, _, g_plain, _ = run_logits_pair(PRESETS["uniform"].replace(prefix_consistent=False), d)
    assert not torch.allclose(g, g_plain, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logits_loss_half_inputs(dtype):
    d = make_batch(seed=7)
    for name, use_ref in (("dapo", False), ("grpo_r1", True)):
        cfg = cfg_for(name, 0.04 if use_ref else 0.0)
        out, ref, g, g_ref = run_logits_pair(cfg, d, temperature=1.1, use_ref=use_ref, dtype=dtype)
        assert g.dtype == dtype
        assert_outputs_close(out, ref, tol=dict(rtol=1e-4, atol=1e-5))
        scale = g_ref.abs().max()
        torch.testing.assert_close(g.float(), g_ref, rtol=1e-2, atol=1e-2 * float(scale))


# ----------------------------------------------------------------------------- logits-free path


def linear_case(seed=0, B=6, T=7, H=24, V=384, G=3, dtype=torch.float32, spread=0.4):
    d = make_batch(B=B, T=T, V=V, G=G, seed=seed, spread=spread)
    g = torch.Generator().manual_seed(seed + 100)
    d["hidden"] = torch.randn(B, T, H, generator=g).to(dtype)
    d["weight"] = (torch.randn(V, H, generator=g) * 0.4).to(dtype)
    d["bias"] = (torch.randn(V, generator=g) * 0.2).to(dtype)
    with torch.no_grad():  # old / ref near the current policy of this head
        lp = oracle_logp(d["hidden"].float() @ d["weight"].float().t() + d["bias"].float(), d["ids"])
    scale = torch.rand(B, 1, generator=g) * spread + 1e-4
    d["old"] = lp + torch.randn(B, T, generator=g) * scale
    d["ref"] = lp + torch.randn(B, T, generator=g) * 0.3
    return d


def run_linear_pair(
    cfg, d, *, chunk_tokens, temperature=1.0, use_ref=False, use_bias=True, frozen=False, packed_hidden=False
):
    ref_logp = d["ref"] if use_ref else None
    h_r = d["hidden"].float().clone().requires_grad_(True)
    W_r = d["weight"].float().clone().requires_grad_(not frozen)
    b_r = d["bias"].float().clone().requires_grad_(True) if use_bias else None
    z = h_r @ W_r.t() + (b_r if use_bias else 0)
    ref = oracle_loss(
        cfg,
        oracle_logp(z, d["ids"], temperature),
        d["old"],
        d["adv"],
        d["mask"],
        group_size=d["G"],
        completion_ids=d["ids"],
        ref_logp=ref_logp,
    )
    ref.loss.backward()
    h = d["hidden"].clone().requires_grad_(True)
    W = d["weight"].clone().requires_grad_(not frozen)
    b = d["bias"].clone().requires_grad_(True) if use_bias else None
    hin = h.reshape(-1, h.shape[-1]) if packed_hidden else h
    out = linear_surrogate_loss(
        cfg,
        hin,
        W,
        d["ids"],
        d["old"],
        d["adv"],
        d["mask"],
        group_size=d["G"],
        bias=b,
        temperature=temperature,
        ref_logp=ref_logp,
        chunk_tokens=chunk_tokens,
    )
    out.loss.backward()
    return out, ref, (h, W, b), (h_r, W_r, b_r)


def check_linear_grads(got, want, tol=TOL):
    for a, b in zip(got, want):
        if b is None or b.grad is None:
            assert a is None or a.grad is None
            continue
        torch.testing.assert_close(a.grad.float(), b.grad, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_linear_loss_every_preset(name, device):
    cfg, d, use_ref = preset_case(name, linear_case, device)
    for chunk in (5, 64):  # 5 does not divide the valid-token count; gspo: 1 row per chunk when < T
        out, ref, got, want = run_linear_pair(cfg, d, chunk_tokens=chunk, temperature=0.8, use_ref=use_ref)
        assert_outputs_close(out, ref)
        check_linear_grads(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["gspo", "gcpo"])
def test_linear_loss_row_chunks(name, device):
    """Sequence ratios chunk over whole rows: 1, 2 and 4 rows per chunk (4 does not divide 6)."""
    d = to_device(linear_case(seed=31, spread=0.002 if name == "gspo" else 0.05), device)
    T = d["ids"].shape[1]
    for chunk in (1, 2 * T, 4 * T + 3):
        out, ref, got, want = run_linear_pair(PRESETS[name], d, chunk_tokens=chunk)
        assert_outputs_close(out, ref)
        check_linear_grads(got, want)


def test_linear_loss_off_policy_mask_uses_row_chunks():
    d = linear_case(seed=41, spread=0.8)
    cfg = resolve_config("grpo_v32", off_policy_mask_threshold=0.05)
    out, ref, got, want = run_linear_pair(cfg, d, chunk_tokens=3)
    assert_outputs_close(out, ref)
    check_linear_grads(got, want)


def test_linear_loss_frozen_weight_no_bias_packed_hidden():
    d = linear_case(seed=51)
    out, ref, got, want = run_linear_pair(
        PRESETS["uniform"], d, chunk_tokens=7, use_bias=False, frozen=True, packed_hidden=True
    )
    assert_outputs_close(out, ref)
    h, W, b = got
    assert W.grad is None and b is None
    torch.testing.assert_close(h.grad, want[0].grad, **TOL)


def test_linear_loss_zero_adv_and_no_grad():
    d = linear_case(seed=61)
    d["adv"] = torch.zeros_like(d["adv"])
    out, ref, got, want = run_linear_pair(PRESETS["dapo"], d, chunk_tokens=9)
    assert_outputs_close(out, ref)
    check_linear_grads(got, want)
    assert got[0].grad.abs().max() == 0
    with torch.no_grad():
        out2 = linear_surrogate_loss(
            "dapo", d["hidden"], d["weight"], d["ids"], d["old"], d["adv"], d["mask"], group_size=d["G"], bias=d["bias"]
        )
    torch.testing.assert_close(out2.loss, ref.loss.detach(), **TOL)


def test_linear_loss_backward_scales_by_upstream_grad():
    d = linear_case(seed=71)
    out, ref, got, want = run_linear_pair(PRESETS["grpo"], d, chunk_tokens=11)
    h = d["hidden"].clone().requires_grad_(True)
    W = d["weight"].clone().requires_grad_(True)
    out3 = linear_surrogate_loss(
        "grpo", h, W, d["ids"], d["old"], d["adv"], d["mask"], group_size=d["G"], bias=d["bias"], chunk_tokens=11
    )
    (3.0 * out3.loss).backward()
    torch.testing.assert_close(h.grad, 3.0 * got[0].grad, **TOL)
    torch.testing.assert_close(W.grad, 3.0 * got[1].grad, **TOL)


def test_linear_loss_bf16():
    d = linear_case(seed=81, dtype=torch.bfloat16)
    out, ref, got, want = run_linear_pair(PRESETS["dapo"], d, chunk_tokens=8)
    # the bf16 GEMM output is rounded: loose tolerance against the fp32 oracle
    torch.testing.assert_close(out.loss.double(), ref.loss.double(), rtol=2e-2, atol=2e-3)
    for a, b in zip(got, want):
        scale = float(b.grad.abs().max())
        torch.testing.assert_close(a.grad.float(), b.grad, rtol=5e-2, atol=5e-2 * scale)


def test_dw_accumulation_mode_and_fp32_accumulator():
    """dW of 16-bit weights is accumulated in fp32 across chunks: with many chunks the result is
    the fp32 sum of the per-chunk products (each rounded to bf16 on CPU, as documented), not a
    running bf16 sum."""
    from grpo_fix.kernels import dw_accumulation
    from grpo_fix.kernels.linear import _acc_mm

    assert dw_accumulation("cpu", torch.float32) == "fp32"
    assert dw_accumulation("cpu", torch.bfloat16) == "16-bit product + fp32 add"
    g = torch.Generator().manual_seed(5)
    chunks = [
        (torch.randn(3, 40, generator=g).bfloat16(), torch.randn(40, 2, generator=g).bfloat16()) for _ in range(64)
    ]
    acc = torch.full((3, 2), 256.0)  # large accumulator: bf16 running sums would lose the small products
    for a, b in chunks:
        _acc_mm(acc, a, b)
    want = torch.full((3, 2), 256.0, dtype=torch.float64) + sum(torch.mm(a, b).double() for a, b in chunks)
    torch.testing.assert_close(acc.double(), want, rtol=0, atol=1e-4)
    running16 = torch.full((3, 2), 256.0, dtype=torch.bfloat16)
    for a, b in chunks:
        running16 += torch.mm(a, b)
    assert (running16.double() - want).abs().max() > 1e-2  # what the fp32 accumulator avoids


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_linear_logprobs(temperature):
    d = linear_case(seed=91)
    z = d["hidden"] @ d["weight"].t() + d["bias"]
    want = oracle_logp(z, d["ids"], temperature) * d["mask"]
    for chunk in (4, 1000):
        got = linear_logprobs(
            d["hidden"], d["weight"], d["ids"], d["mask"], bias=d["bias"], temperature=temperature, chunk_tokens=chunk
        )
        torch.testing.assert_close(got, want, **TOL)
    got = linear_logprobs(
        d["hidden"].reshape(-1, 24), d["weight"], d["ids"].reshape(-1), bias=d["bias"], temperature=temperature
    )
    torch.testing.assert_close(got, oracle_logp(z, d["ids"], temperature).reshape(-1), **TOL)


# ----------------------------------------------------------------------------- GPU only


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0)


@cuda
def test_gpu_bf16_numerics_logits_and_linear():
    torch.manual_seed(0)
    dev = "cuda"
    B, T, V, H, G = 8, 256, 32000, 1024, 4
    ids = torch.randint(0, V, (B, T), device=dev)
    mask = torch.rand(B, T, device=dev) > 0.2
    adv = group_advantages(torch.randn(B, device=dev), G)
    z32 = torch.randn(B, T, V, device=dev) * 3
    with torch.no_grad():
        old = oracle_logp(z32, ids) + 0.1 * torch.randn(B, T, device=dev)
    zr = z32.clone().requires_grad_(True)
    ref = oracle_loss(PRESETS["dapo"], oracle_logp(zr, ids), old, adv, mask, group_size=G, completion_ids=ids)
    ref.loss.backward()
    zb = z32.bfloat16().requires_grad_(True)
    out = logits_surrogate_loss("dapo", zb * 1, ids, old, adv, mask, group_size=G)
    out.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) / abs(ref.loss.item()) < 1e-3
    assert _cos(zb.grad, zr.grad) > 0.999
    # logits-free, bf16 vs fp32 reference
    h = torch.randn(B, T, H, device=dev)
    W = torch.randn(V, H, device=dev) / H**0.5
    hr, Wr = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    ref = oracle_loss(PRESETS["dapo"], oracle_logp(hr @ Wr.t(), ids), old, adv, mask, group_size=G)
    ref.loss.backward()
    hb, Wb = h.bfloat16().requires_grad_(True), W.bfloat16().requires_grad_(True)
    out = linear_surrogate_loss("dapo", hb, Wb, ids, old, adv, mask, group_size=G, chunk_tokens=512)
    out.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) / abs(ref.loss.item()) < 1e-3
    assert _cos(hb.grad, hr.grad) > 0.999 and _cos(Wb.grad, Wr.grad) > 0.999
    # extreme logits and masked positions: no NaN
    ze = torch.where(torch.rand(B, T, V, device=dev) > 0.5, 1e4, -1e4).bfloat16().requires_grad_(True)
    out = logits_surrogate_loss("grpo", ze * 1, ids, old, adv, mask, group_size=G)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(ze.grad).all()


# ----------------------------------------------------------------------------- packed (cu_seqlens) inputs


def packed_case(seed=0, G=3, H=16, V=320):
    """Six sequences of lengths (incl. 0) packed back to back, a loss mask with holes."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 0, 7, 1, 4])
    B, T = lengths.numel(), int(lengths.max())
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    N = int(cu[-1])
    ids_pad = torch.randint(0, V, (B, T), generator=g)
    ids_pad[1, :2] = ids_pad[0, :2]  # shared prefix inside group 0
    ids = torch.cat([ids_pad[b, : lengths[b]] for b in range(B)])
    mask = torch.rand(N, generator=g) > 0.15
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.4
    with torch.no_grad():
        lp = oracle_logp(hidden @ weight.t(), ids)
    old = lp + torch.randn(N, generator=g) * 0.3
    ref = lp + torch.randn(N, generator=g) * 0.3
    adv = group_advantages(torch.randn(B, generator=g), G)
    return dict(
        cu=cu,
        lengths=lengths,
        B=B,
        T=T,
        ids=ids,
        mask=mask,
        hidden=hidden,
        weight=weight,
        old=old,
        ref=ref,
        adv=adv,
        G=G,
        logits=hidden @ weight.t(),
    )


def pad_ref(x, d, fill=0):
    """Independent padding of a packed (N,) tensor to (B, T) (differentiable)."""
    pieces = [x[int(d["cu"][b]) : int(d["cu"][b + 1])] for b in range(d["B"])]
    return torch.stack([torch.nn.functional.pad(p, (0, d["T"] - p.numel()), value=fill) for p in pieces])


def packed_oracle(cfg, d, z, use_ref):
    return oracle_loss(
        cfg,
        pad_ref(oracle_logp(z, d["ids"]), d),
        pad_ref(d["old"], d),
        d["adv"],
        pad_ref(d["mask"], d, False),
        group_size=d["G"],
        completion_ids=pad_ref(d["ids"], d),
        ref_logp=pad_ref(d["ref"], d) if use_ref else None,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,beta", [("uniform", 0.0), ("grpo", 0.05), ("gspo", 0.0)])
def test_packed_logits_and_linear(name, beta, device):
    d = to_device(packed_case(seed=sum(map(ord, name))), device)
    cfg = cfg_for(name, beta)
    if name == "gspo":
        cfg = cfg.replace(eps_low=0.05, eps_high=0.05)
    use_ref = beta > 0
    ref_logp = d["ref"] if use_ref else None
    zr = d["logits"].clone().requires_grad_(True)
    ref = packed_oracle(cfg, d, zr, use_ref)
    ref.loss.backward()
    z = d["logits"].clone().requires_grad_(True)
    out = logits_surrogate_loss(
        cfg, z * 1, d["ids"], d["old"], d["adv"], d["mask"], group_size=d["G"], ref_logp=ref_logp, cu_seqlens=d["cu"]
    )
    out.loss.backward()
    assert_outputs_close(out, ref)
    torch.testing.assert_close(z.grad, zr.grad, **TOL)

    hr, Wr = d["hidden"].clone().requires_grad_(True), d["weight"].clone().requires_grad_(True)
    ref = packed_oracle(cfg, d, hr @ Wr.t(), use_ref)
    ref.loss.backward()
    for chunk in (4, 50):
        h, W = d["hidden"].clone().requires_grad_(True), d["weight"].clone().requires_grad_(True)
        out = linear_surrogate_loss(
            cfg,
            h,
            W,
            d["ids"],
            d["old"],
            d["adv"],
            d["mask"],
            group_size=d["G"],
            ref_logp=ref_logp,
            chunk_tokens=chunk,
            cu_seqlens=d["cu"],
        )
        out.loss.backward()
        assert_outputs_close(out, ref)
        torch.testing.assert_close(h.grad, hr.grad, **TOL)
        torch.testing.assert_close(W.grad, Wr.grad, **TOL)


def test_packed_errors():
    d = packed_case()
    with pytest.raises(ValueError, match="cu_seqlens"):
        logits_surrogate_loss(
            "grpo", d["logits"], d["ids"], None, d["adv"], d["mask"], group_size=3, cu_seqlens=d["cu"][:-1]
        )
    with pytest.raises(ValueError, match="packed"):
        linear_surrogate_loss(
            "grpo", d["hidden"], d["weight"], d["ids"][:-1], None, d["adv"], d["mask"], group_size=3, cu_seqlens=d["cu"]
        )


def test_accepts_loss_module_and_preset_name():
    from grpo_fix import GroupSurrogateLoss

    d = make_batch(seed=99)
    module = GroupSurrogateLoss("grpo", beta=0.02)
    out_mod = logits_surrogate_loss(
        module,
        d["logits"],
        d["ids"],
        d["old"],
        d["adv"],
        d["mask"],
        group_size=d["G"],
        ref_logp=d["ref"],
        inplace_backward=False,
    )
    ref = module(
        oracle_logp(d["logits"], d["ids"]),
        d["old"],
        d["adv"],
        d["mask"],
        group_size=d["G"],
        completion_ids=d["ids"],
        ref_logp=d["ref"],
    )
    assert_outputs_close(out_mod, ref)
    out_name = logits_surrogate_loss("dapo", d["logits"], d["ids"], d["old"], d["adv"], d["mask"], group_size=d["G"])
    ref = oracle_loss(
        PRESETS["dapo"],
        oracle_logp(d["logits"], d["ids"]),
        d["old"],
        d["adv"],
        d["mask"],
        group_size=d["G"],
        completion_ids=d["ids"],
    )
    assert_outputs_close(out_name, ref)
    with pytest.raises(ValueError, match="preset"):
        logits_surrogate_loss("nope", d["logits"], d["ids"], d["old"], d["adv"], d["mask"], group_size=d["G"])
