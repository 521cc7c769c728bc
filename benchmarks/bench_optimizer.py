"""Step time of ClipAwareAdamW against torch.optim.AdamW, side by side in one run.

    python benchmarks/bench_optimizer.py                      # auto: CUDA if present, else CPU
    python benchmarks/bench_optimizer.py --device cpu --threads 1 --sizes 10e6,50e6 --repeats 21

Parameters are fp32, split into ``--tensors`` equal tensors (200 by default), initialised like a
transformer's weights (N(0, 0.02)); gradients are N(0, 1e-3) with a per-tensor scale, shared by
all variants.  Each variant owns its parameters and Adam state and takes ``--warmup`` untimed
steps first.  Every round times one step of every variant, in an order rotated from round to
round (paired, interleaved rounds: machine noise hits all variants alike); the table reports the
median time over ``--repeats`` rounds and the **paired ratio**: the median over rounds of the
variant's time divided by its AdamW baseline's time in the same round.

Variants: ``torch.optim.AdamW`` as the baselines (CPU: torch's default single-tensor loop,
``foreach=True``, ``fused=True``; CUDA: ``foreach`` and ``fused``) and ClipAwareAdamW on each,
without a signal (nothing observed: AdamW's update plus the non-finite check) and with a window
signal observed before every step (timed with the step): kappa = 0.7 (gate active) and an
overshoot fraction alternating above and below tau, with ``alpha_init=0.5, shrink=0.8`` so that
alpha stays below 1 (0.4 / 0.5) instead of running into its floor.  The achieved median alpha
and kappa are reported.  On CUDA ClipAwareAdamW runs its default backend (Triton) and torch's
fused kernel; the baseline of both is AdamW fused.

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/optimizer_<device>``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from grpo_fix import ClipAwareAdamW, TrustRegionSignal

#: The signal variants' controller settings: alpha alternates 0.4 / 0.5 (module docstring).
SIGNAL_KW = dict(alpha_init=0.5, shrink=0.8, grow=1.25)


def window_signal(round_index: int, device: str) -> TrustRegionSignal:
    """kappa = 0.7; overshoot 10% (> tau = 5%) on even rounds, 0 on odd ones."""
    t = lambda x: torch.tensor(float(x), dtype=torch.float64, device=device)  # noqa: E731
    over = 10 if round_index % 2 == 0 else 0
    return TrustRegionSignal(t(7), t(10), t(100), t(100), t(30), t(over), t(0.1))


def make_variants(device: str) -> dict[str, tuple[type, dict[str, Any], bool, str]]:
    """name -> (optimizer class, its keyword arguments, observes a signal, baseline name)."""
    impls = {"default": {}, "foreach": dict(foreach=True), "fused": dict(fused=True)}
    if device != "cpu":
        impls = {"foreach": dict(foreach=True), "fused": dict(fused=True)}
    v: dict[str, tuple[type, dict[str, Any], bool, str]] = {}
    for impl, kw in impls.items():
        v[f"AdamW {impl}"] = (torch.optim.AdamW, kw, False, f"AdamW {impl}")
    ours = dict(impls) if device == "cpu" else {"triton": {}, "fused": dict(backend="torch", fused=True)}
    for impl, kw in ours.items():
        base = f"AdamW {impl}" if impl in impls else "AdamW fused"
        v[f"ClipAwareAdamW {impl}, no signal"] = (ClipAwareAdamW, kw, False, base)
        v[f"ClipAwareAdamW {impl}, signal"] = (ClipAwareAdamW, {**kw, **SIGNAL_KW}, True, base)
    return v


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_size(n_params: int, n_tensors: int, device: str, repeats: int, warmup: int) -> dict[str, dict[str, Any]]:
    per = n_params // n_tensors
    gen = torch.Generator(device="cpu").manual_seed(0)
    init = [torch.randn(per, generator=gen).mul_(0.02) for _ in range(n_tensors)]
    grads = [torch.randn(per, generator=gen).mul_(1e-3 * (1 + 0.01 * i)).to(device) for i in range(n_tensors)]
    variants = {}
    for name, (cls, kw, with_signal, base) in make_variants(device).items():
        params = [torch.nn.Parameter(x.to(device)) for x in init]
        for p, g in zip(params, grads):
            p.grad = g
        variants[name] = (cls(params, lr=1e-4, weight_decay=0.01, **kw), with_signal, base)
    times: dict[str, list[float]] = {k: [] for k in variants}
    stats: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(warmup + repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotated order
            opt, with_signal, _ = variants[name]
            sync(device)
            t0 = time.perf_counter()
            if with_signal:  # a new window every step (what a trainer does), timed with the step
                opt.observe(window_signal(r, device))
            opt.step()
            sync(device)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt * 1e3)
                if isinstance(opt, ClipAwareAdamW):
                    stats[name].append((opt.alpha, float(opt.last_stats.get("kappa", 1.0))))
    out = {}
    for name, (opt, _, base) in variants.items():
        ratios = [a / b for a, b in zip(times[name], times[base])]
        row: dict[str, Any] = {
            "median_ms": statistics.median(times[name]),
            "min_ms": min(times[name]),
            "runs": len(times[name]),
            "baseline": base,
            "ratio": statistics.median(ratios),
        }
        if stats[name]:
            row["alpha"] = statistics.median(a for a, _ in stats[name])
            row["kappa"] = statistics.median(k for _, k in stats[name])
            row["skipped_steps"] = opt.skipped_steps
        out[name] = row
    return out


def device_description(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU, {os.cpu_count()} cores ({model}), torch threads {torch.get_num_threads()}"


def markdown(results: dict[int, dict[str, dict[str, Any]]], desc: str, args: argparse.Namespace) -> str:
    lines = [
        f"ClipAwareAdamW step time, {desc}; torch {torch.__version__}; fp32 parameters in {args.tensors} "
        f"tensors; {args.repeats} paired rounds (order rotated) after {args.warmup} warm-up rounds. "
        "Ratio: median over rounds of (variant / its AdamW baseline in the same round).",
        "",
        *([f"Note: {args.note}", ""] if args.note else []),
        "| params | variant | median ms | min ms | baseline | paired ratio | alpha | kappa |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, res in results.items():
        for name, r in res.items():
            a = f"{r['alpha']:.2f}" if "alpha" in r else ""
            k = f"{r['kappa']:.2f}" if "kappa" in r else ""
            lines.append(
                f"| {n / 1e6:g}M | {name} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['baseline']} | "
                f"{r['ratio']:.3f} | {a} | {k} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--sizes", default=None, help="comma list of total parameter counts (CPU 10e6; CUDA 100e6,500e6)")
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
    results = {n: bench_size(n, args.tensors, device, args.repeats, args.warmup) for n in sizes}
    desc = device_description(device)
    md = markdown(results, desc, args)
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
        "ratio": "median over rounds of variant time / baseline time in the same round",
        "results": {str(n): res for n, res in results.items()},
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
