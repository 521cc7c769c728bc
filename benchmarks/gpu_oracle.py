"""Float64-oracle checks of the Triton paths, for the correctness section of ``gpu_check.py``.

Each check runs a Triton path on fp32 (or bf16) inputs and the torch oracle on the same values in
float64 (``grpo_fix.kernels.selective_logprob_reference`` / ``linear_logprob_reference`` and
``grpo_fix.surrogate_loss`` with eager math; ``ClipAwareAdamW(backend="torch")`` on float64
parameters), and returns one row per case: the errors, the tolerance and ``ok``.

- logits path (``grpo_fix.logits_surrogate_loss(..., backend="triton")``): loss relative error and
  the largest gradient error relative to the largest oracle gradient; dapo, grpo, and uniform with
  prefix classes, the anchor's KL (beta 0.04) and temperature 0.9; eager math and the shipped
  default (compiled on CUDA); fp32 logits (tolerance 1e-5) and bf16 logits (loss 1e-5; gradient
  1e-2: the gradient is written in bf16).
- logits-free path (``grpo_fix.linear_surrogate_loss(..., backend="triton")``): the same for the
  gradients of hidden and weight (several chunks; bf16: loss 1e-2 and gradients 2e-2, since the
  logits GEMM rounds to bf16; the dW accumulation mode that ran is recorded), and on a batch with 3 of 8 groups at zero
  advantage: the lm_head GEMM FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` against
  the same batch with every advantage nonzero (expected: the zero-advantage tokens skipped).
- optimizer (``ClipAwareAdamW(backend="triton")``, gate and controller active): after 5 steps, the
  parameters relative to the largest oracle parameter (1e-6, fp32 storage) and the updates
  relative to the largest oracle update (1e-4: fp32 torch AdamW itself is 2e-5 off float64 here).
"""

from __future__ import annotations

import time

import torch

from grpo_fix import (
    PRESETS,
    ClipAwareAdamW,
    TrustRegionSignal,
    group_advantages,
    linear_surrogate_loss,
    logits_surrogate_loss,
    surrogate_loss,
)
from grpo_fix.kernels import dw_accumulation, linear_logprob_reference, selective_logprob_reference

ANCHOR = dict(beta=0.04, temperature=0.9)
ANCHOR_CASE = "uniform + classes, beta 0.04, temperature 0.9"


def compile_variants(device, dtype: torch.dtype, case: str) -> tuple[str, ...]:
    """``compile_math`` values checked for one case: eager always; the shipped default (``"auto"``,
    compiled on CUDA only) for the anchor case in fp32, so that the GPU call compiles few graphs."""
    compiled = torch.device(device).type == "cuda" and dtype == torch.float32 and case == ANCHOR_CASE
    return ("never", "auto") if compiled else ("never",)


def _late(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


def skipped_row(check: str) -> dict:
    """The row of a check left out because the section's time was spent."""
    return dict(check=check, status="skipped: time budget spent", ok=None)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    a, b = a.double(), b.double()
    scale = float(b.abs().max()) if b.numel() else 0.0
    diff = float((a - b).abs().max()) if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def _loss_err(out, oracle) -> float:
    """Relative difference of two outputs' losses."""
    got, want = float(out.loss.detach()), float(oracle.loss.detach())
    return abs(got - want) / max(abs(want), 1e-30)


def make_batch(B: int, T: int, V: int, G: int, device, *, zero_groups: int = 0, seed: int = 0) -> dict:
    """Groups of G completions sharing prefixes, 0/1 mask (a few tokens masked per row), old and
    reference log-probs near -log V, group-normalised advantages; the first ``zero_groups`` groups
    have equal rewards (advantage exactly 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    for s in range(0, B, G):
        k = int(torch.randint(0, T // 2 + 1, (1,), generator=g))
        ids[s : s + G, :k] = ids[s, :k]
    lengths = torch.randint(max(1, T // 2), T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.randn(B, generator=g)
    rewards[: zero_groups * G] = 1.0
    base = -torch.log(torch.tensor(float(V)))
    old = (base + 0.3 * torch.randn(B, T, generator=g)).clamp(max=0.0)
    ref = (base + 0.3 * torch.randn(B, T, generator=g)).clamp(max=0.0)
    batch = dict(ids=ids, mask=mask, old=old, ref=ref, adv=group_advantages(rewards, G))
    return {k: v.to(device) for k, v in batch.items()} | dict(G=G)


def _cases():
    """(name, config, with prefix classes, beta, temperature)."""
    uniform = PRESETS["uniform"].replace(beta=ANCHOR["beta"])
    return [
        ("dapo", PRESETS["dapo"], False, 0.0, 1.0),
        ("grpo", PRESETS["grpo"], False, 0.0, 1.0),
        (ANCHOR_CASE, uniform, True, ANCHOR["beta"], ANCHOR["temperature"]),
    ]


def _triton_kwargs(d, with_classes, beta, temperature, compile_math) -> dict:
    """The keyword arguments both vocabulary paths get for one case, on the Triton backend."""
    return dict(
        group_size=d["G"] if with_classes else None,
        temperature=temperature,
        ref_logp=d["ref"] if beta else None,
        compile_math=compile_math,
        backend="triton",
    )


def _oracle(cfg, logp64, d, with_classes, beta):
    return surrogate_loss(
        cfg,
        logp64,
        d["old"].double(),
        d["adv"].double(),
        d["mask"],
        group_size=d["G"] if with_classes else None,
        completion_ids=d["ids"] if with_classes else None,
        ref_logp=d["ref"].double() if beta else None,
        compile_math="never",
    )


def logits_path(device, B=8, T=64, V=32000, G=4, deadline=None) -> list[dict]:
    """The logits path against the float64 oracle (module docstring); cases past ``deadline``
    (``time.monotonic()``) are recorded as skipped."""
    rows = []
    d = make_batch(B, T, V, G, device, seed=1)
    for dtype, grad_tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        z = (torch.randn(B, T + 1, V, generator=torch.Generator().manual_seed(2)) * 2).to(device, dtype)
        for name, cfg, with_classes, beta, temperature in _cases():
            if _late(deadline):
                rows.append(skipped_row(f"logits path {str(dtype).split('.')[-1]}: {name}"))
                continue
            z64 = z.double().requires_grad_(True)
            out64 = _oracle(
                cfg, selective_logprob_reference(z64, d["ids"], d["mask"], temperature), d, with_classes, beta
            )
            out64.loss.backward()
            for compile_math in compile_variants(device, dtype, name):
                zk = z.clone().requires_grad_(True)
                kw = _triton_kwargs(d, with_classes, beta, temperature, compile_math)
                out = logits_surrogate_loss(
                    cfg, zk, d["ids"], d["old"], d["adv"], d["mask"], inplace_backward=False, **kw
                )
                out.loss.backward()
                loss_err = _loss_err(out, out64)
                grad_err = _rel(zk.grad, z64.grad)
                rows.append(
                    dict(
                        check=f"logits path {str(dtype).split('.')[-1]}: {name}",
                        compile_math=compile_math,
                        loss_rel_err=loss_err,
                        grad_rel_err=grad_err,
                        tolerance=f"loss 1e-5, grad {grad_tol:g}",
                        ok=loss_err <= 1e-5 and grad_err <= grad_tol,
                    )
                )
    return rows


def _linear_run(cfg, h, w, d, with_classes, beta, temperature, compile_math, chunk_tokens):
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    kw = _triton_kwargs(d, with_classes, beta, temperature, compile_math)
    out = linear_surrogate_loss(cfg, h, w, d["ids"], d["old"], d["adv"], d["mask"], chunk_tokens=chunk_tokens, **kw)
    out.loss.backward()
    return out, h.grad, w.grad


def linear_path(device, B=8, T=64, H=256, V=32000, G=4, deadline=None) -> list[dict]:
    """The logits-free path against the float64 oracle, and the GEMMs it skips (module docstring);
    cases past ``deadline`` are recorded as skipped."""
    from torch.utils.flop_counter import FlopCounterMode

    rows = []
    gen = torch.Generator().manual_seed(3)
    d = make_batch(B, T, V, G, device, seed=4)
    chunk = max(1, B * T // 3)  # several chunks
    for dtype, loss_tol, grad_tol in ((torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-2, 2e-2)):
        h = torch.randn(B, T, H, generator=gen).to(device, dtype)
        w = (torch.randn(V, H, generator=gen) / H**0.5).to(device, dtype)
        for name, cfg, with_classes, beta, temperature in _cases():
            if _late(deadline):
                rows.append(skipped_row(f"logits-free path {str(dtype).split('.')[-1]}: {name}"))
                continue
            h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
            lp64 = linear_logprob_reference(h64, w64, d["ids"], d["mask"], temperature=temperature)
            out64 = _oracle(cfg, lp64, d, with_classes, beta)
            out64.loss.backward()
            for compile_math in compile_variants(device, dtype, name):
                out, gh, gw = _linear_run(cfg, h, w, d, with_classes, beta, temperature, compile_math, chunk)
                loss_err = _loss_err(out, out64)
                errs = (_rel(gh, h64.grad), _rel(gw, w64.grad))
                rows.append(
                    dict(
                        check=f"logits-free path {str(dtype).split('.')[-1]}: {name}",
                        compile_math=compile_math,
                        loss_rel_err=loss_err,
                        grad_rel_err=max(errs),
                        tolerance=f"loss {loss_tol:g}, grad {grad_tol:g}",
                        dw_accumulation=dw_accumulation(device, dtype),
                        ok=loss_err <= loss_tol and max(errs) <= grad_tol,
                    )
                )
    # zero-advantage groups: GEMMs skipped, gradients still the oracle's
    if _late(deadline):
        return rows + [skipped_row("logits-free path fp32: 3 of 8 groups zero advantage")]
    zero = make_batch(8 * G, T // 2, V, G, device, zero_groups=3, seed=5)
    live_all = dict(zero, adv=torch.where(zero["adv"] == 0, torch.ones_like(zero["adv"]), zero["adv"]))
    h = torch.randn(8 * G, T // 2, H, generator=gen).to(device)
    w = (torch.randn(V, H, generator=gen) / H**0.5).to(device)
    flops = {}
    for label, batch in (("zero", zero), ("all live", live_all)):
        with FlopCounterMode(display=False) as counter:
            out, gh, gw = _linear_run(PRESETS["dapo"], h, w, batch, False, 0.0, 1.0, "never", chunk)
        flops[label] = counter.get_total_flops()
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    out64 = _oracle(PRESETS["dapo"], linear_logprob_reference(h64, w64, zero["ids"], zero["mask"]), zero, False, 0.0)
    out64.loss.backward()
    _, gh, gw = _linear_run(PRESETS["dapo"], h, w, zero, False, 0.0, 1.0, "never", chunk)
    valid = zero["mask"]
    expected = 1.0 - float((valid & (zero["adv"] != 0)[:, None]).sum()) / float(valid.sum())
    skipped = 1.0 - flops["zero"] / max(flops["all live"], 1)
    grad_err = max(_rel(gh, h64.grad), _rel(gw, w64.grad))
    rows.append(
        dict(
            check="logits-free path fp32: 3 of 8 groups zero advantage (dapo, beta 0)",
            gemm_flops=flops["zero"],
            gemm_flops_all_live=flops["all live"],
            skipped_fraction=skipped,
            expected_skipped_fraction=expected,
            grad_rel_err=grad_err,
            tolerance="skipped = expected +- 1e-6, grad 1e-5",
            ok=abs(skipped - expected) <= 1e-6 and grad_err <= 1e-5,
        )
    )
    return rows


def optimizer(device, sizes=(1 << 20, 4097, 3), steps=5) -> list[dict]:
    """``ClipAwareAdamW(backend="triton")`` against ``backend="torch"`` on float64 parameters."""
    rows = []
    gen = torch.Generator().manual_seed(6)
    init = [torch.randn(n, generator=gen) * 0.02 for n in sizes]
    grads = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(steps)]
    t = lambda x: torch.tensor(float(x), dtype=torch.float64, device=device)  # noqa: E731
    # kappa = 0.7 (gate), 10 % overshoot > tau = 0.05: the controller shrinks alpha
    signal = dict(
        active_mass=t(7),
        total_mass=t(10),
        num_tokens=t(100),
        num_eligible=t(100),
        num_clipped=t(30),
        num_overshoot=t(10),
        max_excess=t(0.1),
    )
    kernel_params = [torch.nn.Parameter(p.clone().to(device)) for p in init]
    oracle_params = [torch.nn.Parameter(p.clone().to(device, torch.float64)) for p in init]
    opts = [
        ClipAwareAdamW(kernel_params, lr=1e-3, weight_decay=0.01, backend="triton"),
        ClipAwareAdamW(oracle_params, lr=1e-3, weight_decay=0.01, backend="torch", foreach=False),
    ]
    for k in range(steps):
        for opt, params in zip(opts, (kernel_params, oracle_params)):
            for p, g in zip(params, grads[k]):
                p.grad = g.to(device, p.dtype)
            opt.observe(TrustRegionSignal(**signal))
            opt.step()
    params = [pk.detach().double() for pk in kernel_params]
    oracle = [po.detach() for po in oracle_params]
    start = [p0.to(device, torch.float64) for p0 in init]
    param_err = max(_rel(p, o) for p, o in zip(params, oracle))
    update_err = max(_rel(p - s, o - s) for p, o, s in zip(params, oracle, start))
    rows.append(
        dict(
            check=f"ClipAwareAdamW triton fp32, {len(sizes)} tensors, {steps} steps, gate + controller",
            param_rel_err=param_err,
            update_rel_err=update_err,
            tolerance="params 1e-6, updates 1e-4",
            ok=param_err <= 1e-6 and update_err <= 1e-4,
        )
    )
    return rows
