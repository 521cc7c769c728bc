"""Step time of ClipAwareAdamW against torch.optim.AdamW, side by side in one run.

    python benchmarks/bench_optimizer.py                      # auto: CUDA if present, else CPU
    python benchmarks/bench_optimizer.py --sizes 10e6 --repeats 15 --out benchmarks/results/optimizer_cpu

Parameters are fp32, split into ``--tensors`` equal tensors (200 by default).  Each round times one
``step()`` of every variant in turn (interleaved, so machine noise hits all variants alike); the
table reports medians over ``--repeats`` rounds after ``--warmup`` rounds, and the ratio against
the baseline: ``torch.optim.AdamW(foreach=True)`` on CPU, ``torch.optim.AdamW(fused=True)`` on
CUDA (where ``foreach=True`` is also shown).  ClipAwareAdamW is timed without a signal (the
identity path) and with a window signal observed (kappa = 0.7 and alpha = 0.5: gate and
controller active, including the non-finite gradient check every step does).

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/optimizer_<device>``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo_fix import ClipAwareAdamW  # noqa: E402
from grpo_fix.signal import TrustRegionSignal  # noqa: E402


def clipped_signal(device):
    t = lambda x: torch.tensor(float(x), dtype=torch.float64, device=device)  # noqa: E731
    # kappa = 0.7, overshoot 5% > tau: the controller shrinks alpha to 0.5
    return TrustRegionSignal(t(7), t(10), t(100), t(100), t(30), t(5), t(0.1))


def make_variants(device: str):
    cpu = device == "cpu"
    v = {
        "AdamW foreach": (torch.optim.AdamW, dict(foreach=True), False),
        "AdamW fused": (torch.optim.AdamW, dict(fused=True), False),
    }
    if cpu:
        v.update(
            {
                "ClipAwareAdamW foreach, no signal": (ClipAwareAdamW, dict(foreach=True), False),
                "ClipAwareAdamW foreach, kappa=0.7 alpha=0.5": (ClipAwareAdamW, dict(foreach=True), True),
                "ClipAwareAdamW fused, no signal": (ClipAwareAdamW, dict(fused=True), False),
                "ClipAwareAdamW fused, kappa=0.7 alpha=0.5": (ClipAwareAdamW, dict(fused=True), True),
            }
        )
    else:
        v.update(
            {
                "ClipAwareAdamW triton, no signal": (ClipAwareAdamW, dict(backend="triton"), False),
                "ClipAwareAdamW triton, kappa=0.7 alpha=0.5": (ClipAwareAdamW, dict(backend="triton"), True),
                "ClipAwareAdamW torch fused, kappa=0.7 alpha=0.5": (
                    ClipAwareAdamW,
                    dict(backend="torch", fused=True),
                    True,
                ),
            }
        )
    return v


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def bench_size(n_params: int, n_tensors: int, device: str, repeats: int, warmup: int):
    per = n_params // n_tensors
    gen = torch.Generator(device="cpu").manual_seed(0)
    base = torch.randn(per, generator=gen)
    grads = [(base * (1 + 0.01 * i)).to(device) for i in range(n_tensors)]  # shared by all variants
    variants = {}
    for name, (cls, kw, with_signal) in make_variants(device).items():
        params = [torch.nn.Parameter(torch.zeros(per, device=device)) for _ in range(n_tensors)]
        for p, g in zip(params, grads):
            p.grad = g
        opt = cls(params, lr=1e-4, weight_decay=0.01, **kw)
        if with_signal:
            opt.observe(clipped_signal(device))
        variants[name] = (opt, with_signal)
    times = {k: [] for k in variants}
    for r in range(warmup + repeats):
        for name, (opt, with_signal) in variants.items():
            if with_signal:  # a new window every step (what a trainer does); alpha stays < 1
                opt.observe(clipped_signal(device))
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt * 1e3)
    del variants
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "runs": len(v)} for k, v in times.items()}


def device_description(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU, {os.cpu_count()} cores ({model}), torch threads {torch.get_num_threads()}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument(
        "--sizes", default=None, help="comma list of total parameter counts (default CPU 10e6; CUDA 100e6,500e6)"
    )
    ap.add_argument("--tensors", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=None, help="output path without suffix")
    ap.add_argument("--note", default="", help="free text recorded with the results (e.g. machine load)")
    args = ap.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(float(s)) for s in (args.sizes or ("10e6" if device == "cpu" else "100e6,500e6")).split(",")]
    baseline = "AdamW foreach" if device == "cpu" else "AdamW fused"
    results = {}
    for n in sizes:
        results[n] = bench_size(n, args.tensors, device, args.repeats, args.warmup)
    desc = device_description(device)
    lines = [
        f"ClipAwareAdamW step time, {desc}; torch {torch.__version__}; fp32 params in {args.tensors} tensors; "
        f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up rounds; ratio vs `{baseline}`.",
        "",
        *([f"Note: {args.note}", ""] if args.note else []),
        "| params | variant | median ms | min ms | ratio |",
        "|---|---|---|---|---|",
    ]
    for n, res in results.items():
        ref = res[baseline]["median_ms"]
        for name, r in res.items():
            lines.append(
                f"| {n / 1e6:g}M | {name} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['median_ms'] / ref:.3f} |"
            )
    md = "\n".join(lines)
    print(md)
    out = Path(args.out or Path(__file__).parent / "results" / f"optimizer_{device}")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "device": desc,
        "note": args.note,
        "torch": torch.__version__,
        "tensors": args.tensors,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "baseline": baseline,
        "results": {
            str(n): {k: dict(v, ratio=v["median_ms"] / res[baseline]["median_ms"]) for k, v in res.items()}
            for n, res in results.items()
        },
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
