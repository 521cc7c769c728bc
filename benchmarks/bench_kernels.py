"""GPU benchmark of grpo_fix.kernels against TRL-style eager / compiled losses, Liger-Kernel and TRL's chunked head.

Usage (on a CUDA machine)::

    python benchmarks/bench_kernels.py                 # both sections, writes benchmarks/results/
    python benchmarks/bench_kernels.py --only logits   # or --only sweep / --only linear
    python benchmarks/bench_kernels.py --smoke-cpu     # tiny shapes on CPU (Triton interpreter), no results

Every entry runs forward + backward (gradients w.r.t. the logits, or hidden and lm_head weight)
and is measured the same way: median of ``--iters`` CUDA-event timings after ``--warmup`` runs,
and peak extra memory = ``max_memory_allocated`` during the timed runs minus the memory allocated
before them (inputs resident; gradients and every temporary included; gradients are freed at the
end of each run).  Loss: DAPO-style token-level PPO clip (eps 0.2 / 0.28), token-mean over the
20 % masked batch, beta = 0 — the same math in every entry.

Sections (issue 5):

- logits path, bf16 logits ``(B, T + 1, V)``: (8, 1024, 32000), (8, 2048, 151936), (8, 4096, 151936):
  a logits copy (one read + one write, bandwidth reference), TRL-style eager loss
  (``log_softmax(logits.float() / T).gather``), ``torch.compile`` of it, Liger 0.8.5
  ``triton_grpo_loss`` (when importable), ours (``logits_surrogate_loss``, in-place backward;
  as shipped, i.e. the per-token math compiled on CUDA, and with ``compile_math=False``).
- logits-free path, 16k tokens (B = 8, T = 2048), H = 4096 and 2048, V = 151936, bf16: the three
  lm_head GEMMs alone (the floor; also on the valid tokens only), materialised logits + ours,
  materialised logits + Liger ``triton_grpo_loss``, Liger ``LigerFusedLinearGRPOLoss``, TRL 1.16
  ``ChunkedLogProbFunction`` + TRL's loss, ours (``linear_surrogate_loss``, chunks of 4096 and
  8192 tokens, and 4096 with ``compile_math=False``).

Without CUDA (and without ``--smoke-cpu``) it prints a message and exits 0 without writing results.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--smoke-cpu" in sys.argv:  # must precede any triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from grpo_fix.kernels import dw_accumulation  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
EPS_LOW, EPS_HIGH = 0.2, 0.28
MASKED_FRACTION = 0.2

LOGITS_SHAPES = [(8, 1024, 32000), (8, 2048, 151936), (8, 4096, 151936)]
LINEAR_SHAPES = [(8, 2048, 4096, 151936), (8, 2048, 2048, 151936)]  # (B, T, H, V): 16k tokens
SMOKE_LOGITS_SHAPES = [(2, 8, 512)]
SMOKE_LINEAR_SHAPES = [(2, 8, 32, 512)]


# ----------------------------------------------------------------------------- reference loss (TRL style)


def dapo_loss_from_logp(logp, old_logp, advantages, mask):
    """TRL 1.16 ``loss_type="dapo"``-style token PPO clip, beta = 0, token mean over the batch."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH) * adv)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def trl_eager_loss(logits, ids, old_logp, advantages, mask):
    """Materialised fp32 log_softmax + gather (TRL <= 1.x eager path), then the loss."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    return dapo_loss_from_logp(logp, old_logp, advantages, mask)


# ----------------------------------------------------------------------------- measurement


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, iters, warmup, setup=None):
    """(median ms, peak extra GiB, loss) of ``fn()`` (forward + backward, frees its own gradients,
    returns the detached loss or None).  ``setup()`` runs before every run, untimed: it restores
    inputs that an in-place backward overwrote, so every run (and every entry) sees the same data."""
    loss = None
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    _sync(device)
    if device.type != "cuda":
        if setup:
            setup()
        t0 = time.perf_counter()
        loss = fn()
        return (time.perf_counter() - t0) * 1e3, float("nan"), None if loss is None else float(loss)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        if setup:
            setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return statistics.median(times), peak, None if loss is None else float(loss)


def run_entry(rows, section, shape, name, make_fn, device, iters, warmup, note="", setup=None):
    """Build and measure one entry; OOM / missing packages become a row with a status."""
    row = dict(
        section=section, shape=shape, entry=name, median_ms=None, peak_extra_gib=None, loss=None, status="ok", note=note
    )
    try:
        fn = make_fn()
        if fn is None:
            row["status"] = "unavailable (not importable, or disabled)"
        else:
            row["median_ms"], row["peak_extra_gib"], row["loss"] = measure(fn, device, iters, warmup, setup)
    except torch.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as e:  # keep the other entries running; record why this one did not
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    finally:
        fn = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows.append(row)
    ms = "-" if row["median_ms"] is None else f"{row['median_ms']:.2f} ms"
    mem = "-" if row["peak_extra_gib"] is None else f"{row['peak_extra_gib']:.2f} GiB"
    print(f"  {name:<44s} {ms:>12s} {mem:>12s}  {row['status']}", flush=True)


def _mask(B, T, device, gen):
    return torch.rand(B, T, generator=gen, device=device) >= MASKED_FRACTION


def train_step(loss_fn, *leaves):
    """fwd + bwd of ``loss_fn()``; the gradients are freed; returns the detached loss."""

    def fn():
        for t in leaves:
            t.grad = None
        loss = loss_fn()
        loss.backward()
        for t in leaves:
            t.grad = None
        return loss.detach()

    return fn


@torch.no_grad()
def reference_loss(logits_rows, ids, old, adv, mask):
    """The DAPO loss in fp32 from ``logits_rows(b)`` (the ``(T, V)`` logits of row b), one row at a
    time so that the largest shapes fit: the value every entry is checked against."""
    logp = torch.stack(
        [torch.log_softmax(logits_rows(b).float(), -1).gather(-1, ids[b, :, None])[:, 0] for b in range(ids.shape[0])]
    )
    return float(dapo_loss_from_logp(logp, old, adv, mask))


def check_losses(rows, section, shape, ref, rtol=2e-2):
    """Flag entries of (section, shape) whose loss differs from the fp32 reference (bf16 inputs:
    a few 1e-3 relative is rounding; a wrong argument order is far off)."""
    for r in rows:
        if (
            r["section"] == section
            and r["shape"] == shape
            and r["loss"] is not None
            and r["status"] == "ok"
            and "loss_rel_err" not in r
        ):  # rows checked against an earlier reference keep that check
            r["loss_rel_err"] = abs(r["loss"] - ref) / max(abs(ref), 1e-12)
            if r["loss_rel_err"] > rtol:
                r["status"] = f"LOSS MISMATCH: {r['loss']:.6g} vs fp32 reference {ref:.6g}"


# ----------------------------------------------------------------------------- logits path


def _math_variants(device, compile_ok):
    """(entry-name suffix, compile_math) of our entries: the default, plus eager math on CUDA."""
    if not compile_ok:
        return [("", False)]
    return [("", "auto")] + ([(", eager math", False)] if device.type == "cuda" else [])


def bench_logits(rows, device, iters, warmup, shapes, compile_ok, save=lambda: None):
    from grpo_fix import PRESETS
    from grpo_fix.kernels import logits_surrogate_loss, selective_logprob_nograd

    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except Exception:
        triton_grpo_loss = None

    compiled_loss = torch.compile(trl_eager_loss, dynamic=False) if compile_ok else None
    # our default ("auto") compiles the per-token math on CUDA; the eager-math entries measure
    # what that buys (kernel launches of 130-200 small ops, see grpo_fix.loss.compiled)
    math_variants = _math_variants(device, compile_ok)
    for B, T, V in shapes:
        shape = f"B={B} T={T} V={V}"
        gib = B * (T + 1) * V * 2 / 2**30
        print(f"\nlogits path {shape} bf16 (logits {gib:.2f} GiB)", flush=True)
        gen = torch.Generator(device=device).manual_seed(0)
        logits0 = (torch.randn(B, T + 1, V, generator=gen, device=device) * 2).to(torch.bfloat16)
        logits = logits0.clone().requires_grad_(True)
        ids = torch.randint(0, V, (B, T), generator=gen, device=device)
        mask = _mask(B, T, device, gen)
        old = -torch.rand(B, T, generator=gen, device=device) * 12 - 2
        adv = torch.randn(B, generator=gen, device=device)

        def restore():  # in-place backwards (ours, Liger) overwrite the logits with their gradient
            with torch.no_grad():
                logits.copy_(logits0)

        def step(loss_fn):
            return train_step(loss_fn, logits)

        def copy_fn():
            def fn():
                with torch.no_grad():
                    logits.detach().clone()

            return fn

        def entry(name, make_fn, note=""):
            run_entry(rows, "logits", shape, name, make_fn, device, iters, warmup, note=note, setup=restore)

        entry("logits copy (1 read + 1 write)", copy_fn)
        entry("TRL-style eager (fp32 log_softmax)", lambda: step(lambda: trl_eager_loss(logits, ids, old, adv, mask)))
        entry(
            "torch.compile of the same",
            lambda: step(lambda: compiled_loss(logits, ids, old, adv, mask)) if compiled_loss else None,
        )
        entry(
            "Liger 0.8.5 triton_grpo_loss (inplace)",
            lambda: (
                step(
                    lambda: triton_grpo_loss(
                        logits,
                        old,
                        None,
                        ids,
                        adv,
                        mask,
                        temperature=1.0,
                        beta=0.0,
                        eps_low=EPS_LOW,
                        eps_high=EPS_HIGH,
                        inplace=True,
                        loss_type="dapo",
                        reduce=True,
                    )[0]
                )
                if triton_grpo_loss
                else None
            ),
        )
        for suffix, compile_math in math_variants:
            entry(
                "ours logits_surrogate_loss (dapo, inplace)" + suffix,
                lambda: step(
                    lambda: (
                        logits_surrogate_loss(
                            PRESETS["dapo"],
                            logits,
                            ids,
                            old,
                            adv,
                            mask,
                            group_size=None,
                            inplace_backward=True,
                            compile_math=compile_math,
                        ).loss
                    )
                ),
            )
        check_losses(rows, "logits", shape, reference_loss(lambda b: logits0[b, :T], ids, old, adv, mask))
        # The old log-probs above are far from the policy (as in the anchors' measurements), so
        # about half the tokens are clipped and our backward skips their rows; Liger reads every
        # row.  Near on-policy (ratios ~ 1, nothing clipped) that advantage is gone: measured too.
        near = selective_logprob_nograd(logits0, ids, mask) + 0.01 * torch.randn(B, T, generator=gen, device=device)
        tag = ", near on-policy old (nothing clipped)"
        if triton_grpo_loss:
            entry(
                "Liger 0.8.5 triton_grpo_loss (inplace)" + tag,
                lambda: step(
                    lambda: triton_grpo_loss(
                        logits,
                        near,
                        None,
                        ids,
                        adv,
                        mask,
                        temperature=1.0,
                        beta=0.0,
                        eps_low=EPS_LOW,
                        eps_high=EPS_HIGH,
                        inplace=True,
                        loss_type="dapo",
                        reduce=True,
                    )[0]
                ),
            )
        for suffix, compile_math in math_variants:
            entry(
                "ours logits_surrogate_loss (dapo, inplace)" + tag + suffix,
                lambda: step(
                    lambda: (
                        logits_surrogate_loss(
                            PRESETS["dapo"],
                            logits,
                            ids,
                            near,
                            adv,
                            mask,
                            group_size=None,
                            inplace_backward=True,
                            compile_math=compile_math,
                        ).loss
                    )
                ),
            )
        check_losses(rows, "logits", shape, reference_loss(lambda b: logits0[b, :T], ids, near, adv, mask))
        # a different loss (uniform preset: prefix-consistent advantages, W_agg): timed, not compared
        entry(
            "ours, uniform preset (prefix-consistent, G=8)",
            lambda: step(
                lambda: (
                    logits_surrogate_loss(
                        PRESETS["uniform"], logits, ids, old, adv, mask, group_size=B, inplace_backward=True
                    ).loss
                )
            ),
            note="includes prefix classes and W_agg; another loss, not compared",
        )
        del logits, logits0, ids, mask, old, near, adv
        save()


SWEEP_SHAPE = (8, 2048, 151936)
SWEEP_CONFIGS = [(b, w) for b in (1024, 2048, 4096, 8192, 16384) for w in (4, 8, 16) if b // (32 * w) >= 4]
SMOKE_SWEEP = ((2, 8, 512), [(1024, 4), (4096, 8)])


def bench_block_sweep(rows, device, iters, warmup, shape, configs, save=lambda: None):
    """Time our forward and backward log-prob kernels alone over (BLOCK_V, num_warps) at one
    logits shape (bf16, 20 % masked, every unmasked row with a nonzero upstream gradient): the
    data for choosing ``grpo_fix.kernels.logprob``'s launch heuristic.  Configurations with fewer
    than 4 elements per thread are left out (no 64-bit bf16 access)."""
    from grpo_fix.kernels import logprob as lp

    B, T, V = shape
    label = f"B={B} T={T} V={V}"
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(B, T + 1, V, generator=gen, device=device) * 2).to(torch.bfloat16)
    ids = torch.randint(0, V, (B, T), generator=gen, device=device)
    mask = _mask(B, T, device, gen)
    dlogp = torch.randn(B, T, generator=gen, device=device)
    block0 = lp._block_v(V, lp._interpret())
    default = (block0, lp._num_warps(block0))
    orig = lp._block_v, lp._num_warps
    print(f"\nlaunch sweep {label} bf16 (default BLOCK_V={default[0]}, num_warps={default[1]})", flush=True)
    state = {}

    def fwd():
        lp.logprob_forward(logits, ids, mask)

    def bwd():
        lp.logprob_backward(logits, ids, mask, state["lse"], dlogp)

    try:
        for block, warps in configs:
            lp._block_v, lp._num_warps = (lambda *_a, _b=block: _b), (lambda *_a, _w=warps: _w)
            tag = f"BLOCK_V={block} warps={warps}" + (" (default)" if (block, warps) == default else "")
            state["lse"] = lp.logprob_forward(logits, ids, mask)[1]
            run_entry(rows, "sweep", label, f"fwd {tag}", lambda: fwd, device, iters, warmup)
            run_entry(rows, "sweep", label, f"bwd {tag}", lambda: bwd, device, iters, warmup)
            save()
    finally:
        lp._block_v, lp._num_warps = orig
    del logits, state


# ----------------------------------------------------------------------------- logits-free path


def bench_linear(rows, device, iters, warmup, shapes, liger_fused_iters, compile_ok, save=lambda: None):
    from grpo_fix import PRESETS
    from grpo_fix.kernels import linear_surrogate_loss, logits_surrogate_loss

    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except Exception:
        triton_grpo_loss = None
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except Exception:
        LigerFusedLinearGRPOLoss = None
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as trl_chunk
    except Exception:
        ChunkedLogProbFunction, trl_chunk = None, 32768

    for B, T, H, V in shapes:
        shape = f"N={B * T} (B={B} T={T}) H={H} V={V}"
        print(f"\nlogits-free {shape} bf16", flush=True)
        gen = torch.Generator(device=device).manual_seed(0)
        dt = torch.bfloat16
        hidden = torch.randn(B, T + 1, H, generator=gen, device=device).to(dt).requires_grad_(True)
        weight = (torch.randn(V, H, generator=gen, device=device) / H**0.5).to(dt).requires_grad_(True)
        ids = torch.randint(0, V, (B, T), generator=gen, device=device)
        mask = _mask(B, T, device, gen)
        old = -torch.rand(B, T, generator=gen, device=device) * 12 - 2
        adv = torch.randn(B, generator=gen, device=device)
        n_valid = int(mask.sum())

        def h_view():
            return hidden[:, :T]

        def step(loss_fn):
            return train_step(loss_fn, hidden, weight)

        def floor(valid_only):
            X = hidden.detach()[:, :T].reshape(-1, H)
            if valid_only:
                X = X[mask.reshape(-1)]
            W = weight.detach()

            def fn():
                logits = X @ W.t()
                dX = logits @ W  # noqa: F841
                dW = logits.t() @ X  # noqa: F841

            return fn

        def liger_fused():
            if LigerFusedLinearGRPOLoss is None:
                return None
            mod = LigerFusedLinearGRPOLoss(
                beta=0.0,
                use_ref_model=False,
                epsilon_low=EPS_LOW,
                epsilon_high=EPS_HIGH,
                loss_type="dapo",
                compiled=device.type == "cuda",
            )
            return step(lambda: mod(h_view(), weight, ids, mask, adv, old_per_token_logps=old)[0])

        def trl_head():
            if ChunkedLogProbFunction is None:
                return None

            def loss():
                h = h_view()
                lp_valid = ChunkedLogProbFunction.apply(
                    h[mask], weight, None, ids[mask], 1.0, trl_chunk, None, 1.0, ()
                )[0]
                logp = lp_valid.new_zeros(mask.shape).masked_scatter(mask, lp_valid)
                return dapo_loss_from_logp(logp, old, adv, mask)

            return step(loss)

        def entry(name, make_fn, n_iters=iters, n_warmup=warmup):
            run_entry(rows, "linear", shape, name, make_fn, device, n_iters, n_warmup)

        entry("floor: 3 lm_head GEMMs (all tokens)", lambda: floor(False))
        entry(f"floor: 3 lm_head GEMMs (valid {n_valid})", lambda: floor(True))
        entry(
            "materialised logits + ours (inplace)",
            lambda: step(
                lambda: (
                    logits_surrogate_loss(
                        PRESETS["dapo"], hidden @ weight.t(), ids, old, adv, mask, group_size=None
                    ).loss
                )
            ),
        )
        entry(
            "materialised logits + Liger triton_grpo_loss",
            lambda: (
                step(
                    lambda: triton_grpo_loss(
                        hidden @ weight.t(),
                        old,
                        None,
                        ids,
                        adv,
                        mask,
                        temperature=1.0,
                        beta=0.0,
                        eps_low=EPS_LOW,
                        eps_high=EPS_HIGH,
                        inplace=True,
                        loss_type="dapo",
                        reduce=True,
                    )[0]
                )
                if triton_grpo_loss
                else None
            ),
        )
        entry("Liger LigerFusedLinearGRPOLoss", liger_fused, liger_fused_iters, 1)
        entry("TRL 1.16 ChunkedLogProbFunction + loss", trl_head)
        (_, default), *eager = _math_variants(device, compile_ok)
        variants = [(4096, "", default), (8192, "", default)] + [(4096, suffix, False) for suffix, _ in eager]
        for chunk, suffix, compile_math in variants:
            entry(
                f"ours linear_surrogate_loss (chunk {chunk})" + suffix,
                lambda: step(
                    lambda: (
                        linear_surrogate_loss(
                            PRESETS["dapo"],
                            h_view(),
                            weight,
                            ids,
                            old,
                            adv,
                            mask,
                            group_size=None,
                            chunk_tokens=chunk,
                            compile_math=compile_math,
                        ).loss
                    )
                ),
            )
        with torch.no_grad():
            ref = reference_loss(lambda b: hidden[b, :T] @ weight.t(), ids, old, adv, mask)
        check_losses(rows, "linear", shape, ref)
        del hidden, weight, ids, mask, old, adv
        save()


# ----------------------------------------------------------------------------- report


SECTIONS = (  # (section, title, entries whose time the others are divided by)
    ("logits", "Logits path (bf16, 20 % masked)", ("Liger 0.8.5 triton_grpo_loss (inplace)",)),
    ("sweep", "Launch sweep of our log-prob kernels alone (bf16, 20 % masked)", ()),
    (
        "linear",
        "Logits-free path (bf16, 20 % masked)",
        ("floor: 3 lm_head GEMMs (all tokens)", "TRL 1.16 ChunkedLogProbFunction + loss"),
    ),
)


def _reference_of(row, sec, ref_entry):
    if row["section"] == "sweep":  # each kernel against its default launch
        return next(
            (x for x in sec if x["entry"].startswith(row["entry"][:3]) and x["entry"].endswith("(default)")), None
        )
    return next((x for x in sec if x["shape"] == row["shape"] and x["entry"] == ref_entry), None)


def to_markdown(rows, meta):
    lines = [
        f"# grpo_fix.kernels benchmark on {meta['device']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, liger-kernel {meta['liger']}, trl {meta['trl']}; "
        f"{meta['date']}; median of {meta['iters']} fwd+bwd runs after {meta['warmup']} warm-ups; "
        f"logits-free dW accumulation: {meta['dw_accumulation']}; "
        "peak extra = max allocated during the runs minus allocated before (inputs resident, gradients "
        "included); loss err = relative difference to an fp32 reference of the same loss (a status "
        "says LOSS MISMATCH above 2e-2).",
        "",
    ]
    for section, title, ref_entries in SECTIONS:
        sec = [r for r in rows if r["section"] == section]
        if not sec:
            continue
        refs = ref_entries or ("default launch",)
        ref_cols = " | ".join(f"x {e.split(' (')[0]}" for e in refs)
        lines += [
            f"## {title}",
            "",
            f"| shape | entry | median ms | {ref_cols} | peak extra GiB | loss err | status |",
            "|---|---|---|" + "---|" * len(refs) + "---|---|---|",
        ]
        for r in sec:
            ratios = []
            for e in refs:
                ref = _reference_of(r, sec, e)
                ok = ref and ref["median_ms"] and r["median_ms"] is not None
                ratios.append(f"{r['median_ms'] / ref['median_ms']:.2f}" if ok else "-")
            ms = "-" if r["median_ms"] is None else f"{r['median_ms']:.2f}"
            mem = "-" if r["peak_extra_gib"] is None else f"{r['peak_extra_gib']:.2f}"
            err = f"{r['loss_rel_err']:.1e}" if r.get("loss_rel_err") is not None else "-"
            lines.append(
                f"| {r['shape']} | {r['entry']} | {ms} | {' | '.join(ratios)} | {mem} | {err} | {r['status']} |"
            )
        lines.append("")
    return "\n".join(lines)


def _version(pkg):
    try:
        import importlib.metadata as md

        return md.version(pkg)
    except Exception:
        return "not installed"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("logits", "sweep", "linear"), default=None)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--liger-fused-iters", type=int, default=3, help="Liger's fused linear loss is ~1 s per run")
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="no torch.compile anywhere (the compiled TRL-style entry, and our math runs eagerly)",
    )
    p.add_argument("--smoke-cpu", action="store_true", help="tiny shapes on CPU (Triton interpreter); no results")
    args = p.parse_args(argv)

    if args.smoke_cpu:
        device = torch.device("cpu")
        logits_shapes, linear_shapes, iters, warmup = SMOKE_LOGITS_SHAPES, SMOKE_LINEAR_SHAPES, 1, 0
    elif not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here; this benchmark needs a GPU. Nothing measured, no results written.")
        return 0
    else:
        device = torch.device("cuda")
        logits_shapes, linear_shapes, iters, warmup = LOGITS_SHAPES, LINEAR_SHAPES, args.iters, args.warmup

    meta = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
        torch=torch.__version__,
        triton=_version("triton"),
        liger=_version("liger-kernel"),
        trl=_version("trl"),
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        iters=iters,
        warmup=warmup,
        dw_accumulation=dw_accumulation(device),
    )
    slug = "".join(c if c.isalnum() else "-" for c in meta["device"]).strip("-").lower()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = RESULTS_DIR / f"kernels_{slug}_{stamp}{'_' + args.only if args.only else ''}"
    rows: list[dict] = []

    def save():  # after every shape, so a run cut short by a time limit keeps what it measured
        if args.smoke_cpu:
            return
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        base.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
        base.with_suffix(".md").write_text(to_markdown(rows, meta) + "\n")

    if args.only in (None, "logits"):
        bench_logits(rows, device, iters, warmup, logits_shapes, not args.no_compile and not args.smoke_cpu, save)
    if args.only in (None, "sweep"):
        sweep_shape, configs = SMOKE_SWEEP if args.smoke_cpu else (SWEEP_SHAPE, SWEEP_CONFIGS)
        bench_block_sweep(rows, device, iters, warmup, sweep_shape, configs, save)
    if args.only in (None, "linear"):
        bench_linear(
            rows,
            device,
            iters,
            warmup,
            linear_shapes,
            args.liger_fused_iters if not args.smoke_cpu else 1,
            not args.no_compile and not args.smoke_cpu,
            save,
        )

    print("\n" + to_markdown(rows, meta))
    if args.smoke_cpu:
        bad = [r for r in rows if r["status"] != "ok" and not r["status"].startswith("unavailable")]
        return 1 if bad else 0
    save()
    print(f"wrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
