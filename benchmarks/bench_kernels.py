"""GPU benchmark of the vocabulary paths vs TRL-style eager / compiled losses, Liger-Kernel and TRL's chunked head.

Usage (on a CUDA machine)::

    python benchmarks/bench_kernels.py                 # every section, writes benchmarks/results/
    python benchmarks/bench_kernels.py --only logits   # or --only sweep / --only linear
    python benchmarks/bench_kernels.py --smoke-cpu     # tiny shapes on CPU (Triton interpreter), no results

``benchmarks/gpu_check.py`` runs the same sections (at the goal shapes only) inside its one
time-budgeted GPU call.  Every entry runs forward + backward (gradients w.r.t. the logits, or
hidden and lm_head weight) and is measured the same way: median of ``--iters`` CUDA-event
timings after ``--warmup`` runs, and peak extra memory = ``max_memory_allocated`` during the timed
runs minus the memory allocated before them (inputs resident; gradients and every temporary
included; gradients are freed at the end of each run).  Loss: DAPO-style token-level PPO clip
(eps 0.2 / 0.28), token mean over the 20 % masked batch, the same math in every entry; every
entry's loss is checked against an fp32 reference of that math (status ``LOSS MISMATCH`` above
2e-2 relative).

Sections:

- logits path, bf16 logits ``(B, T + 1, V)``: (8, 1024, 32000), (8, 2048, 151936), (8, 4096, 151936),
  under four conditions (:data:`LOGITS_CONDITIONS`): old log-probs far from the policy (about half
  the tokens clipped), near on-policy (nothing clipped), near on-policy with 3 of 8 rows at zero
  advantage, and the anchor configuration (Liger's wrapper defaults: beta 0.04 with reference
  log-probs, temperature 0.9).  Entries: a logits copy (one read + one write, the bandwidth
  reference), TRL-style eager (``log_softmax(logits.float() / T).gather``), ``torch.compile`` of it,
  Liger 0.8.5 ``triton_grpo_loss`` (when importable), ours (``grpo_fix.logits_surrogate_loss``,
  Triton backend, in-place backward; the per-token math compiled as shipped, and eager).
- launch sweep of our log-prob kernels alone over (BLOCK_V, num_warps, num_stages), Liger 0.8.5's
  own launch configurations of its GRPO kernels included (:data:`LIGER_CONFIGS`).
- logits-free path, 16k tokens (B = 8, T = 2048), H = 4096 and 2048, V = 151936, bf16: the three
  lm_head GEMMs alone (the floor; also on the valid tokens only), materialised logits + ours,
  materialised logits + Liger ``triton_grpo_loss``, Liger ``LigerFusedLinearGRPOLoss``, TRL 1.16
  ``ChunkedLogProbFunction`` + TRL's loss, ours (``grpo_fix.linear_surrogate_loss``, chunks of 4096
  and 8192 tokens, and 4096 with eager math), and ours with 3 of 8 rows at zero advantage (their
  GEMMs are skipped).

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
from dataclasses import dataclass
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
SMOKE_LOGITS_SHAPES = [(8, 4, 512)]
SMOKE_LINEAR_SHAPES = [(8, 4, 32, 512)]
ZERO_ADV_ROWS = 3  # of 8: rows whose advantage is 0 (all rewards of their group equal)


@dataclass(frozen=True)
class Condition:
    """How the inputs of a logits-path entry are drawn: ``old`` = ``"far"`` (old log-probs drawn
    far from the policy: about half the tokens clipped) or ``"near"`` (the policy's own log-probs
    plus 0.01 noise: nothing clipped); the first ``zero_adv_rows`` rows get advantage 0; ``beta``
    > 0 adds TRL's k3 KL against reference log-probs near the policy (without the ratio factor,
    Liger's ``use_bias_correction_kl=False``); ``temperature`` divides the logits."""

    name: str
    old: str = "near"
    zero_adv_rows: int = 0
    beta: float = 0.0
    temperature: float = 1.0


LOGITS_CONDITIONS = (
    Condition("old far: about half clipped", old="far"),
    Condition("near on-policy"),
    Condition(f"near on-policy, {ZERO_ADV_ROWS} of 8 rows zero advantage", zero_adv_rows=ZERO_ADV_ROWS),
    Condition("anchor: beta 0.04, temperature 0.9", beta=0.04, temperature=0.9),
)


# ----------------------------------------------------------------------------- reference loss (TRL style)


def dapo_loss_from_logp(logp, old_logp, advantages, mask, beta=0.0, ref_logp=None):
    """TRL 1.16 ``loss_type="dapo"`` token PPO clip, token mean over the batch, plus ``beta`` times
    TRL's k3 KL (``use_bias_correction_kl=False``)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH) * adv)
    if beta:
        d = ref_logp - logp
        per_token = per_token + beta * (torch.exp(d) - d - 1)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def trl_eager_loss(logits, ids, old_logp, advantages, mask, temperature=1.0, beta=0.0, ref_logp=None):
    """Materialised fp32 log_softmax + gather (TRL <= 1.x eager path), then the loss."""
    z = logits[:, :-1].float()
    if temperature != 1.0:
        z = z / temperature
    logp = torch.log_softmax(z, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    return dapo_loss_from_logp(logp, old_logp, advantages, mask, beta, ref_logp)


@torch.no_grad()
def reference_logp(logits_rows, ids, temperature=1.0):
    """fp32 ``log_softmax(logits / T)[ids]`` from ``logits_rows(b)`` (the ``(T, V)`` logits of row b),
    one row at a time so that the largest shapes fit."""
    rows = []
    for b in range(ids.shape[0]):
        z = logits_rows(b).float()
        if temperature != 1.0:
            z = z / temperature
        rows.append(torch.log_softmax(z, -1).gather(-1, ids[b, :, None])[:, 0])
    return torch.stack(rows)


def reference_loss(logits_rows, ids, old, adv, mask, temperature=1.0, beta=0.0, ref=None):
    """The benchmark loss in fp32 (:func:`reference_logp`): the value every entry is checked against."""
    return float(dapo_loss_from_logp(reference_logp(logits_rows, ids, temperature), old, adv, mask, beta, ref))


def check_losses(rows, section, shape, ref, rtol=2e-2, condition=None):
    """Flag entries of (section, shape, condition) whose loss differs from the fp32 reference (bf16
    inputs: a few 1e-3 relative is rounding; a wrong argument order is far off)."""
    for r in rows:
        if (
            r["section"] == section
            and r["shape"] == shape
            and r.get("condition") == condition
            and r["loss"] is not None
            and r["status"] == "ok"
            and "loss_rel_err" not in r
        ):
            r["loss_rel_err"] = abs(r["loss"] - ref) / max(abs(ref), 1e-12)
            if r["loss_rel_err"] > rtol:
                r["status"] = f"LOSS MISMATCH: {r['loss']:.6g} vs fp32 reference {ref:.6g}"


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


@dataclass
class Runner:
    """Measures entries into ``rows`` with one protocol; past ``deadline`` (``time.monotonic()``)
    entries are recorded as skipped instead of run."""

    rows: list
    device: torch.device
    iters: int
    warmup: int
    deadline: float | None = None

    def entry(self, section, shape, name, make_fn, *, condition=None, note="", setup=None, iters=None, warmup=None):
        """Build and measure one entry; OOM / missing packages / errors become a row with a status."""
        row = dict(
            section=section,
            shape=shape,
            condition=condition,
            entry=name,
            median_ms=None,
            peak_extra_gib=None,
            loss=None,
            status="ok",
            note=note,
        )
        fn = None
        try:
            if self.deadline is not None and time.monotonic() > self.deadline:
                row["status"] = "skipped: time budget spent"
            else:
                fn = make_fn()
                if fn is None:
                    row["status"] = "unavailable (not importable, or disabled)"
                else:
                    row["median_ms"], row["peak_extra_gib"], row["loss"] = measure(
                        fn,
                        self.device,
                        self.iters if iters is None else iters,
                        self.warmup if warmup is None else warmup,
                        setup,
                    )
        except torch.OutOfMemoryError:
            row["status"] = "OOM"
        except Exception as e:  # keep the other entries running; record why this one did not
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        finally:
            fn = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.rows.append(row)
        ms = "-" if row["median_ms"] is None else f"{row['median_ms']:.2f} ms"
        mem = "-" if row["peak_extra_gib"] is None else f"{row['peak_extra_gib']:.2f} GiB"
        label = name if condition is None else f"{name} [{condition}]"
        print(f"  {label:<78s} {ms:>12s} {mem:>12s}  {row['status']}", flush=True)
        return row


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


def _math_variants(device, compile_ok):
    """(entry-name suffix, compile_math) of our entries: as shipped ("auto": compiled on CUDA), plus
    the eager math on CUDA (what compiling buys: kernel launches of 130-200 small ops)."""
    if not compile_ok:
        return [("", "never")]
    return [("", "auto")] + ([(", eager math", "never")] if device.type == "cuda" else [])


def liger_loss(triton_grpo_loss, logits, old, ref, ids, adv, mask, temperature=1.0, beta=0.0):
    """Liger 0.8.5's ``triton_grpo_loss`` on the benchmark's loss (dapo, in-place backward, reduced)."""
    return triton_grpo_loss(
        logits,
        old,
        ref,
        ids,
        adv,
        mask,
        temperature=temperature,
        beta=beta,
        eps_low=EPS_LOW,
        eps_high=EPS_HIGH,
        inplace=True,
        loss_type="dapo",
        reduce=True,
    )[0]


def _liger_grpo_loss():
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except Exception:
        return None
    return triton_grpo_loss


# ----------------------------------------------------------------------------- logits path


@dataclass
class LogitsCase:
    """The inputs of one logits-path shape: ``logits`` (trainable, restored from ``logits0`` before
    every run because in-place backwards overwrite it) and the per-condition inputs."""

    logits0: torch.Tensor
    logits: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    T: int

    @classmethod
    def make(cls, B, T, V, device):
        gen = torch.Generator(device=device).manual_seed(0)
        logits0 = (torch.randn(B, T + 1, V, generator=gen, device=device) * 2).to(torch.bfloat16)
        ids = torch.randint(0, V, (B, T), generator=gen, device=device)
        return cls(logits0, logits0.clone().requires_grad_(True), ids, _mask(B, T, device, gen), T)

    def restore(self):
        with torch.no_grad():
            self.logits.copy_(self.logits0)

    def inputs(self, cond: Condition) -> dict:
        """old, adv, ref for ``cond`` (seeded per condition), and the clipped fraction of valid tokens."""
        from grpo_fix.kernels import selective_logprob_nograd

        B, T = self.ids.shape
        dev = self.ids.device
        gen = torch.Generator(device=dev).manual_seed(1)
        policy = selective_logprob_nograd(self.logits0, self.ids, self.mask, cond.temperature)
        if cond.old == "far":
            old = -torch.rand(B, T, generator=gen, device=dev) * 12 - 2
        else:
            old = (policy + 0.01 * torch.randn(B, T, generator=gen, device=dev)).clamp(max=0.0)
        adv = torch.randn(B, generator=gen, device=dev)
        adv[: cond.zero_adv_rows] = 0
        ref = (policy + 0.02 * torch.randn(B, T, generator=gen, device=dev)).clamp(max=0.0) if cond.beta else None
        ratio = torch.exp(policy - old)
        a = adv[:, None]
        clipped = ((ratio < 1 - EPS_LOW) & (a < 0)) | ((ratio > 1 + EPS_HIGH) & (a > 0))
        frac = float((clipped & self.mask).sum() / self.mask.sum().clamp_min(1))
        return dict(old=old, adv=adv, ref=ref, clipped_fraction=frac)


def bench_logits_shape(run: Runner, B, T, V, compile_ok, conditions=LOGITS_CONDITIONS, trl_compiled=True):
    """Every logits-path entry at one shape, under each condition."""
    from grpo_fix import PRESETS, logits_surrogate_loss

    shape = f"B={B} T={T} V={V}"
    print(f"\nlogits path {shape} bf16 (logits {B * (T + 1) * V * 2 / 2**30:.2f} GiB)", flush=True)
    case = LogitsCase.make(B, T, V, run.device)
    compiled_loss = torch.compile(trl_eager_loss, dynamic=False) if compile_ok and trl_compiled else None

    def copy_fn():
        def fn():
            with torch.no_grad():
                case.logits.detach().clone()

        return fn

    run.entry("logits", shape, "logits copy (1 read + 1 write)", copy_fn, setup=case.restore)
    for i, cond in enumerate(conditions):
        with_trl = i == 0 or bool(cond.beta) or cond.temperature != 1.0  # TRL-style time ignores clipping
        bench_logits_condition(run, shape, case, cond, compile_ok, compiled_loss if with_trl else False)
    # a different loss (uniform preset: prefix-consistent advantages, W_agg): timed, not compared
    x = case.inputs(conditions[0])
    run.entry(
        "logits",
        shape,
        "ours, uniform preset (prefix-consistent, G=8)",
        lambda: train_step(
            lambda: (
                logits_surrogate_loss(
                    PRESETS["uniform"],
                    case.logits,
                    case.ids,
                    x["old"],
                    x["adv"],
                    case.mask,
                    group_size=B,
                    backend="triton",
                ).loss
            ),
            case.logits,
        ),
        condition=conditions[0].name,
        note="includes prefix classes and W_agg; another loss, not compared",
        setup=case.restore,
    )


def bench_logits_condition(run: Runner, shape, case: LogitsCase, cond: Condition, compile_ok, compiled_loss):
    """The entries of one condition; ``compiled_loss`` (``torch.compile`` of :func:`trl_eager_loss`)
    False leaves out the TRL-style entries, None only the compiled one; each loss is checked against
    the fp32 reference."""
    from grpo_fix import PRESETS, logits_surrogate_loss

    triton_grpo_loss = _liger_grpo_loss()
    logits, ids, mask, T = case.logits, case.ids, case.mask, case.T
    x = case.inputs(cond)
    old, adv, ref, temp, beta = x["old"], x["adv"], x["ref"], cond.temperature, cond.beta
    cfg = PRESETS["dapo"].replace(beta=beta, kl_times_ratio=False)
    note = f"clipped {x['clipped_fraction']:.0%} of valid tokens"

    def entry(name, make_fn):
        run.entry("logits", shape, name, make_fn, condition=cond.name, note=note, setup=case.restore)

    def step(loss_fn):
        return train_step(loss_fn, logits)

    def liger():
        return liger_loss(triton_grpo_loss, logits, old, ref, ids, adv, mask, temp, beta)

    def ours(compile_math):
        return logits_surrogate_loss(
            cfg,
            logits,
            ids,
            old,
            adv,
            mask,
            group_size=None,
            temperature=temp,
            ref_logp=ref,
            inplace_backward=True,
            compile_math=compile_math,
            backend="triton",
        ).loss

    if compiled_loss is not False:
        entry(
            "TRL-style eager (fp32 log_softmax)",
            lambda: step(lambda: trl_eager_loss(logits, ids, old, adv, mask, temp, beta, ref)),
        )
        if compiled_loss is not None:
            entry(
                "torch.compile of the same",
                lambda: step(lambda: compiled_loss(logits, ids, old, adv, mask, temp, beta, ref)),
            )
    entry("Liger 0.8.5 triton_grpo_loss (inplace)", lambda: step(liger) if triton_grpo_loss else None)
    for suffix, compile_math in _math_variants(run.device, compile_ok):
        entry("ours logits_surrogate_loss (dapo, inplace)" + suffix, lambda cm=compile_math: step(lambda: ours(cm)))
    ref_value = reference_loss(lambda b: case.logits0[b, :T], ids, old, adv, mask, temp, beta, ref)
    check_losses(run.rows, "logits", shape, ref_value, condition=cond.name)


def bench_logits(run: Runner, shapes, compile_ok, save=lambda: None, conditions=LOGITS_CONDITIONS, trl_compiled=True):
    for B, T, V in shapes:
        bench_logits_shape(run, B, T, V, compile_ok, conditions, trl_compiled)
        save()


# ----------------------------------------------------------------------------- launch sweep


SWEEP_SHAPE = (8, 2048, 151936)
#: Liger 0.8.5's own launches of its GRPO kernels (liger_kernel/ops/grpo_loss.py: the forward
#: ``_grpo_loss_fwd_kernel`` with BLOCK_N 2048, num_warps 1, num_stages 2; the backward
#: ``_grpo_loss_bwd_kernel`` with BLOCK_N 4096, num_warps 16, num_stages 1), as
#: (BLOCK_V, num_warps, num_stages, tag).
LIGER_CONFIGS = [(2048, 1, 2, "Liger fwd"), (4096, 16, 1, "Liger bwd")]
SWEEP_CONFIGS = [
    (b, w, None, "")
    for b in (1024, 2048, 4096, 8192, 16384)
    for w in (4, 8, 16)
    if b // (32 * w) >= 4  # at least 4 elements per thread (64-bit bf16 access)
] + LIGER_CONFIGS
SHORT_SWEEP_CONFIGS = [(2048, 4, None, ""), (4096, 8, None, ""), (8192, 8, None, ""), (8192, 16, None, "")]
SHORT_SWEEP_CONFIGS += LIGER_CONFIGS
SMOKE_SWEEP = ((2, 4, 512), [(1024, 4, None, ""), (4096, 8, None, "")] + LIGER_CONFIGS)


class _Staged:
    """A Triton kernel launched with ``num_stages`` added to its launch options."""

    def __init__(self, kernel, num_stages):
        self.kernel, self.num_stages = kernel, num_stages

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kwargs: launch(*args, **kwargs, num_stages=self.num_stages)


def bench_block_sweep(run: Runner, shape, configs):
    """Time our forward and backward log-prob kernels alone over (BLOCK_V, num_warps, num_stages)
    at one logits shape (bf16, 20 % masked, every unmasked row with a nonzero upstream gradient):
    the data for choosing ``grpo_fix.kernels.logprob``'s launch heuristic.  ``num_stages`` None is
    Triton's default."""
    from grpo_fix.kernels import logprob as lp

    B, T, V = shape
    label = f"B={B} T={T} V={V}"
    gen = torch.Generator(device=run.device).manual_seed(0)
    logits = (torch.randn(B, T + 1, V, generator=gen, device=run.device) * 2).to(torch.bfloat16)
    ids = torch.randint(0, V, (B, T), generator=gen, device=run.device)
    mask = _mask(B, T, run.device, gen)
    dlogp = torch.randn(B, T, generator=gen, device=run.device)
    block0 = lp._block_v(V, lp._interpret())
    default = (block0, lp._num_warps(block0), None)
    originals = lp._block_v, lp._num_warps, lp._kernels
    print(f"\nlaunch sweep {label} bf16 (default BLOCK_V={default[0]}, num_warps={default[1]})", flush=True)
    kernels = lp._kernels()
    state = {}

    def fwd():
        lp.logprob_forward(logits, ids, mask)

    def bwd():
        lp.logprob_backward(logits, ids, mask, state["lse"], dlogp)

    if default not in [c[:3] for c in configs]:
        configs = [(*default, "")] + list(configs)
    try:
        for block, warps, stages, tag in configs:
            lp._block_v, lp._num_warps = (lambda *_a, _b=block: _b), (lambda *_a, _w=warps: _w)
            lp._kernels = (
                (lambda: kernels) if stages is None else (lambda _s=stages: tuple(_Staged(k, _s) for k in kernels))
            )
            name = f"BLOCK_V={block} warps={warps}" + ("" if stages is None else f" stages={stages}")
            name += (" (default)" if (block, warps, stages) == default else "") + (f" ({tag})" if tag else "")
            try:
                state["lse"] = lp.logprob_forward(logits, ids, mask)[1]
            except Exception as e:
                state["lse"] = None
                print(f"  {name}: forward failed ({type(e).__name__}: {e})", flush=True)
            run.entry("sweep", label, f"fwd {name}", lambda: fwd)
            run.entry("sweep", label, f"bwd {name}", lambda: bwd if state["lse"] is not None else None)
    finally:
        lp._block_v, lp._num_warps, lp._kernels = originals


# ----------------------------------------------------------------------------- logits-free path


def gemm_floor(hidden, weight, rows=None):
    """``() -> None``: the three lm_head GEMMs of a forward + backward (logits, dX, dW) on
    ``hidden``'s tokens (``rows``: the token rows to use; default all)."""
    H = hidden.shape[-1]
    X = hidden.detach().reshape(-1, H)
    if rows is not None:
        X = X[rows]
    W = weight.detach()

    def fn():
        logits = X @ W.t()
        logits @ W  # dX
        logits.t() @ X  # dW

    return fn


def bench_linear_shape(run: Runner, B, T, H, V, liger_fused_iters, compile_ok, chunks=(4096, 8192)):
    from grpo_fix import PRESETS, linear_surrogate_loss, logits_surrogate_loss

    triton_grpo_loss = _liger_grpo_loss()
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except Exception:
        LigerFusedLinearGRPOLoss = None
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as trl_chunk
    except Exception:
        ChunkedLogProbFunction, trl_chunk = None, 32768

    device = run.device
    shape = f"N={B * T} (B={B} T={T}) H={H} V={V}"
    print(f"\nlogits-free {shape} bf16 (dW accumulation: {dw_accumulation(device)})", flush=True)
    gen = torch.Generator(device=device).manual_seed(0)
    dt = torch.bfloat16
    hidden = torch.randn(B, T + 1, H, generator=gen, device=device).to(dt).requires_grad_(True)
    weight = (torch.randn(V, H, generator=gen, device=device) / H**0.5).to(dt).requires_grad_(True)
    ids = torch.randint(0, V, (B, T), generator=gen, device=device)
    mask = _mask(B, T, device, gen)
    old = -torch.rand(B, T, generator=gen, device=device) * 12 - 2
    adv = torch.randn(B, generator=gen, device=device)
    adv_zero = adv.clone()
    adv_zero[:ZERO_ADV_ROWS] = 0
    n_valid = int(mask.sum())

    def h_view():
        return hidden[:, :T]

    def step(loss_fn):
        return train_step(loss_fn, hidden, weight)

    def liger_fused():
        if LigerFusedLinearGRPOLoss is None or not liger_fused_iters:
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
            lp_valid = ChunkedLogProbFunction.apply(h[mask], weight, None, ids[mask], 1.0, trl_chunk, None, 1.0, ())[0]
            logp = lp_valid.new_zeros(mask.shape).masked_scatter(mask, lp_valid)
            return dapo_loss_from_logp(logp, old, adv, mask)

        return step(loss)

    def ours(chunk, compile_math, advantages):
        return step(
            lambda: (
                linear_surrogate_loss(
                    PRESETS["dapo"],
                    h_view(),
                    weight,
                    ids,
                    old,
                    advantages,
                    mask,
                    group_size=None,
                    chunk_tokens=chunk,
                    compile_math=compile_math,
                    backend="triton",
                ).loss
            )
        )

    def entry(name, make_fn, iters=None, warmup=None, condition=None, note=""):
        run.entry("linear", shape, name, make_fn, iters=iters, warmup=warmup, condition=condition, note=note)

    entry("floor: 3 lm_head GEMMs (all tokens)", lambda: gemm_floor(hidden[:, :T], weight))
    entry(f"floor: 3 lm_head GEMMs (valid {n_valid})", lambda: gemm_floor(hidden[:, :T], weight, mask.reshape(-1)))
    entry(
        "materialised logits + ours (inplace)",
        lambda: step(
            lambda: (
                logits_surrogate_loss(
                    PRESETS["dapo"], hidden @ weight.t(), ids, old, adv, mask, group_size=None, backend="triton"
                ).loss
            )
        ),
    )
    entry(
        "materialised logits + Liger triton_grpo_loss",
        lambda: (
            step(lambda: liger_loss(triton_grpo_loss, hidden @ weight.t(), old, None, ids, adv, mask))
            if triton_grpo_loss
            else None
        ),
    )
    entry("Liger LigerFusedLinearGRPOLoss", liger_fused, liger_fused_iters, 1)
    entry("TRL 1.16 ChunkedLogProbFunction + loss", trl_head)
    (_, default), *eager = _math_variants(device, compile_ok)
    variants = [(c, "", default) for c in chunks] + [(chunks[0], suffix, cm) for suffix, cm in eager]
    for chunk, suffix, compile_math in variants:
        entry(f"ours linear_surrogate_loss (chunk {chunk})" + suffix, lambda c=chunk, cm=compile_math: ours(c, cm, adv))
    with torch.no_grad():
        logp = reference_logp(lambda b: hidden[b, :T] @ weight.t(), ids)
    check_losses(run.rows, "linear", shape, float(dapo_loss_from_logp(logp, old, adv, mask)))
    zero = f"{ZERO_ADV_ROWS} of 8 rows zero advantage"
    live = (mask & (adv_zero != 0)[:, None]).reshape(-1)
    entry(
        "floor: 3 lm_head GEMMs (valid, advantage != 0)",
        lambda: gemm_floor(hidden[:, :T], weight, live),
        condition=zero,
    )
    entry(f"ours linear_surrogate_loss (chunk {chunks[0]})", lambda: ours(chunks[0], default, adv_zero), condition=zero)
    check_losses(run.rows, "linear", shape, float(dapo_loss_from_logp(logp, old, adv_zero, mask)), condition=zero)


def bench_linear(run: Runner, shapes, liger_fused_iters, compile_ok, save=lambda: None):
    for B, T, H, V in shapes:
        bench_linear_shape(run, B, T, H, V, liger_fused_iters, compile_ok)
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
    """The row ``row``'s time is divided by: the default launch of the same kernel (sweep), else
    ``ref_entry`` at the same shape, under the same condition when it has one."""
    if row["section"] == "sweep":
        kernel = row["entry"][:3]
        return next((x for x in sec if x["entry"].startswith(kernel) and "(default)" in x["entry"]), None)
    same = [x for x in sec if x["shape"] == row["shape"] and x["entry"] == ref_entry]
    return next((x for x in same if x.get("condition") == row.get("condition")), same[0] if same else None)


def section_markdown(rows, section, title, ref_entries) -> list[str]:
    """The markdown table of one section's rows (empty when it has none; no heading when ``title`` is None)."""
    sec = [r for r in rows if r["section"] == section]
    if not sec:
        return []
    refs = ref_entries or ("default launch",)
    ref_cols = " | ".join(f"x {e.split(' (')[0]}" for e in refs)
    lines = ([f"## {title}", ""] if title else []) + [
        f"| shape | condition | entry | median ms | {ref_cols} | peak extra GiB | loss err | status | note |",
        "|---|---|---|---|" + "---|" * len(refs) + "---|---|---|---|",
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
            f"| {r['shape']} | {r.get('condition') or '-'} | {r['entry']} | {ms} | {' | '.join(ratios)} | {mem} | "
            f"{err} | {r['status']} | {r.get('note', '')} |"
        )
    return lines + [""]


def to_markdown(rows, meta):
    lines = [
        f"# grpo-fix vocabulary paths benchmark on {meta['device']}",
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
        lines += section_markdown(rows, section, title, ref_entries)
    return "\n".join(lines)


def version(pkg):
    try:
        import importlib.metadata as md

        return md.version(pkg)
    except Exception:
        return "not installed"


def meta_for(device, iters, warmup):
    """What every result file records about the run."""
    return dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
        torch=torch.__version__,
        triton=version("triton"),
        liger=version("liger-kernel"),
        trl=version("trl"),
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        iters=iters,
        warmup=warmup,
        dw_accumulation=dw_accumulation(device),
    )


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

    meta = meta_for(device, iters, warmup)
    slug = "".join(c if c.isalnum() else "-" for c in meta["device"]).strip("-").lower()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = RESULTS_DIR / f"kernels_{slug}_{stamp}{'_' + args.only if args.only else ''}"
    run = Runner([], device, iters, warmup)
    compile_ok = not args.no_compile and not args.smoke_cpu

    def save():  # after every shape, so a run cut short by a time limit keeps what it measured
        if args.smoke_cpu:
            return
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        base.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=run.rows), indent=2))
        base.with_suffix(".md").write_text(to_markdown(run.rows, meta) + "\n")

    if args.only in (None, "logits"):
        bench_logits(run, logits_shapes, compile_ok, save)
    if args.only in (None, "sweep"):
        sweep_shape, configs = SMOKE_SWEEP if args.smoke_cpu else (SWEEP_SHAPE, SWEEP_CONFIGS)
        bench_block_sweep(run, sweep_shape, configs)
        save()
    if args.only in (None, "linear"):
        bench_linear(run, linear_shapes, args.liger_fused_iters if not args.smoke_cpu else 1, compile_ok, save)

    print("\n" + to_markdown(run.rows, meta))
    if args.smoke_cpu:
        bad = [r for r in run.rows if r["status"] != "ok" and not r["status"].startswith("unavailable")]
        return 1 if bad else 0
    save()
    print(f"wrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
