"""Everything grpo-fix measures on a GPU, in one time-budgeted call.

    python benchmarks/gpu_check.py --budget 480 --out "$OUT"    # on the GPU (benchmarks/gpu_session.sh)
    python benchmarks/gpu_check.py --smoke-cpu --out /tmp/gc    # every section at tiny shapes, CPU + Triton interpreter

Sections, in priority order (:data:`SECTIONS`): ``env`` (versions, device, dW accumulation mode),
``ceilings`` (device copy bandwidth, bf16 GEMM rate, the lm_head GEMM), ``correctness`` (float64
oracle of both vocabulary paths and the optimizer kernel, GEMM FLOPs skipped on zero-advantage
groups: ``gpu_oracle.py``), ``logits`` (the logits path at the goal shape (8, 2048, 151936) under
four conditions, the anchor's beta 0.04 / temperature 0.9 included: ``bench_kernels.py``),
``linear`` (the logits-free path at 16k x 4096 x 151936 against the GEMM floor and TRL 1.16's
chunked head), ``optimizer`` (``bench_optimizer.py`` at 500M parameters in 200 tensors and in 1),
``sweep`` (launch configurations of our log-prob kernels, Liger's own included), then, if time is
left, ``train_step`` (``bench_train_step.py``) and ``cuda_tests`` (the CUDA oracle tests).

Budget: a section runs only if its estimated GPU time fits what is left of ``--budget`` (minus a
reserve for writing), and gets at most twice its estimate; entries past that are recorded as
skipped.  A section that does not fit is recorded as skipped with the reason; a section that raises
is recorded with its error and the next one runs.  GPU memory is freed after every section.

Output, rewritten after every section (so a call cut short keeps what it measured):
``<out>/gpu_check_<device>.json`` (meta + one entry per section: status, seconds, rows, notes) and
``gpu_check_<device>.md`` (the summary tables).  Copy both into ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if "--smoke-cpu" in sys.argv:  # must precede any triton import
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling benchmark modules, also when loaded by path

import bench_kernels as bk  # noqa: E402
import gpu_oracle  # noqa: E402

RESERVE_S = 10.0  # kept for writing the results


@dataclass
class Context:
    """What a section needs: the device, whether this is the CPU smoke run, its deadline
    (``time.monotonic()``) and a scratch directory."""

    device: torch.device
    smoke: bool
    deadline: float
    scratch: Path

    def runner(self, iters: int = 10, warmup: int = 3) -> bk.Runner:
        if self.smoke:
            iters, warmup = 1, 0
        return bk.Runner([], self.device, iters, warmup, self.deadline)

    def left(self) -> float:
        return self.deadline - time.monotonic()


# ----------------------------------------------------------------------------- sections


def section_env(ctx: Context) -> dict:
    notes = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton_interpret=os.environ.get("TRITON_INTERPRET", "0"),
        dw_accumulation_bf16=bk.dw_accumulation(ctx.device, torch.bfloat16),
        dw_accumulation_fp16=bk.dw_accumulation(ctx.device, torch.float16),
    )
    for pkg in ("grpo-fix", "triton", "transformers", "trl", "liger-kernel", "accelerate", "datasets"):
        notes[pkg] = bk.version(pkg)
    import grpo_fix

    notes["grpo_fix_path"] = grpo_fix.__file__
    if ctx.device.type == "cuda":
        p = torch.cuda.get_device_properties(ctx.device)
        notes.update(name=p.name, sm_count=p.multi_processor_count, memory_gib=p.total_memory / 2**30)
        notes["capability"] = f"{p.major}.{p.minor}"
    if shutil.which("nvidia-smi"):
        query = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem"
        r = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
        notes["nvidia_smi"] = (r.stdout or r.stderr).strip()
    return dict(notes=notes)


def _timed(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Median milliseconds of ``fn()`` (CUDA events; one wall-clock run on CPU) after one warm-up."""

    def run() -> None:
        fn()

    return bk.measure(run, device, iters, 1)[0]


def section_ceilings(ctx: Context) -> dict:
    """Device-to-device copy bandwidth (bytes read + written), bf16 GEMM rate at 8192^3, and the
    lm_head GEMM of the logits-free section (16384 x 4096 @ 4096 x 151936)."""
    dev, iters = ctx.device, (2 if ctx.smoke else 10)
    n = (1 << 20) if ctx.smoke else (1 << 30)  # bf16 elements: 2 GiB
    x = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
    ms = _timed(lambda x=x: x.clone(), dev, iters)
    rows = [dict(what=f"copy {2 * n / 2**30:.3g} GiB bf16", median_ms=ms, rate=f"{4 * n / ms / 1e6:.0f} GB/s")]
    del x
    shapes = [("bf16 GEMM 8192^3", 8192, 8192, 8192), ("lm_head GEMM 16384x4096 @ 4096x151936", 16384, 151936, 4096)]
    for name, m, k_out, k in shapes:
        if ctx.smoke:
            m, k_out, k = 64, 96, 32
        a = torch.randn(m, k, device=dev).to(torch.bfloat16)
        b = torch.randn(k_out, k, device=dev).to(torch.bfloat16)
        ms = _timed(lambda a=a, b=b: a @ b.t(), dev, iters)
        rows.append(dict(what=name, median_ms=ms, rate=f"{2 * m * k_out * k / ms / 1e9:.0f} TFLOP/s"))
        del a, b
    return dict(rows=rows)


def section_correctness(ctx: Context) -> dict:
    """``gpu_oracle.py``: the optimizer kernel, then both vocabulary paths (cases past the deadline
    are recorded as skipped)."""
    if ctx.smoke:
        rows = gpu_oracle.optimizer(ctx.device, sizes=(4097, 3))
        rows += gpu_oracle.logits_path(ctx.device, B=4, T=6, V=128, G=2, deadline=ctx.deadline)
        rows += gpu_oracle.linear_path(ctx.device, B=4, T=8, H=16, V=128, G=2, deadline=ctx.deadline)
    else:
        rows = gpu_oracle.optimizer(ctx.device)
        rows += gpu_oracle.logits_path(ctx.device, deadline=ctx.deadline)
        rows += gpu_oracle.linear_path(ctx.device, deadline=ctx.deadline)
    failed = [r["check"] for r in rows if r["ok"] is False]
    return dict(rows=rows, notes=dict(failed=failed), status="FAILED" if failed else "ok")


def section_logits(ctx: Context) -> dict:
    run = ctx.runner()
    B, T, V = bk.SMOKE_LOGITS_SHAPES[0] if ctx.smoke else (8, 2048, 151936)
    bk.bench_logits_shape(run, B, T, V, compile_ok=not ctx.smoke, trl_compiled=False)
    return dict(rows=run.rows, kernel_section="logits")


def section_linear(ctx: Context) -> dict:
    run = ctx.runner()
    B, T, H, V = bk.SMOKE_LINEAR_SHAPES[0] if ctx.smoke else (8, 2048, 4096, 151936)
    bk.bench_linear_shape(run, B, T, H, V, liger_fused_iters=0, compile_ok=not ctx.smoke, chunks=(4096,))
    return dict(rows=run.rows, kernel_section="linear")


def section_sweep(ctx: Context) -> dict:
    run = ctx.runner()
    shape, configs = bk.SMOKE_SWEEP if ctx.smoke else (bk.SWEEP_SHAPE, bk.SHORT_SWEEP_CONFIGS)
    bk.bench_block_sweep(run, shape, configs)
    return dict(rows=run.rows, kernel_section="sweep")


def run_script(ctx: Context, script: str, runs: list[list[str]], timeout: float) -> dict:
    """Run ``benchmarks/<script>`` (its CLI) once per argument list in ``runs``, in one subprocess
    with a time limit; return its output tail.

    The subprocess starts in the scratch directory and imports grpo_fix before running the script:
    a benchmark script that puts the repository root first on ``sys.path`` would otherwise import
    the source tree's ``grpo_fix/``, which lacks ``grpo_fix.kernels`` (installed from ``kernels/``).
    """
    code = (
        "import sys, runpy, grpo_fix\n"
        f"for args in {runs!r}:\n"
        f"    sys.argv = [{script!r}, *args]\n"
        "    try:\n"
        f"        runpy.run_path({str(HERE / script)!r}, run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        if e.code:\n"
        "            raise\n"
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ctx.scratch, capture_output=True, text=True, timeout=timeout, env=env
    )
    out = (r.stdout + r.stderr)[-4000:]
    if r.returncode != 0:
        raise RuntimeError(f"{script} exited {r.returncode}:\n{out}")
    return dict(output_tail=out)


def section_optimizer(ctx: Context) -> dict:
    """``bench_optimizer.py`` at 500M fp32 parameters, in 200 tensors and in 1 (one subprocess)."""
    if ctx.smoke:
        common = ["--device", "cpu", "--sizes", "2e4", "--repeats", "1", "--warmup", "0"]
    else:
        common = ["--device", "cuda", "--sizes", "500e6", "--repeats", "10", "--warmup", "3"]
    layouts = {200: 4 if ctx.smoke else 200, 1: 1}
    stems = {n: ctx.scratch / f"optimizer_{n}" for n in layouts}
    runs = [[*common, "--tensors", str(layouts[n]), "--out", str(stems[n])] for n in layouts]
    notes = run_script(ctx, "bench_optimizer.py", runs, ctx.left())
    rows = []
    for n, stem in stems.items():
        payload = json.loads(stem.with_suffix(".json").read_text())
        notes[f"{n} tensors"] = payload
        for size, variants in payload.get("results", {}).items():
            rows += [dict(tensors=n, params=size, variant=name, **r) for name, r in variants.items()]
    return dict(rows=rows, notes=notes)


def section_train_step(ctx: Context) -> dict:
    stem = ctx.scratch / "train_step"
    args = ["--smoke-cpu"] if ctx.smoke else ["--steps", "5", "--warmup", "2", "--out", str(stem)]
    notes = run_script(ctx, "bench_train_step.py", [args], ctx.left())
    rows = [] if ctx.smoke else json.loads(stem.with_suffix(".json").read_text())["rows"]
    return dict(rows=rows, notes=notes)


def section_cuda_tests(ctx: Context) -> dict:
    """The CUDA runs of the kernel and optimizer oracle tests (``-k "gpu or cuda"``)."""
    if ctx.device.type != "cuda":
        return dict(status="skipped", reason="needs CUDA")
    repo = HERE.parent
    # -P: the repository root must not shadow the installed grpo_fix (see run_script)
    flags = ["-P"] if sys.version_info >= (3, 11) else []
    cmd = [sys.executable, *flags, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "gpu or cuda"]
    cmd += [str(repo / "tests" / "test_kernels.py"), str(repo / "tests" / "test_clip_aware_adamw.py")]
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run(cmd, cwd=ctx.scratch, capture_output=True, text=True, timeout=ctx.left(), env=env)
    tail = (r.stdout + r.stderr)[-4000:]
    return dict(notes=dict(returncode=r.returncode, output_tail=tail), status="ok" if r.returncode == 0 else "FAILED")


@dataclass(frozen=True)
class Section:
    name: str
    estimate_s: float  # on an H200, compiles included
    run: Callable[[Context], dict]


SECTIONS = (
    Section("env", 10, section_env),
    Section("ceilings", 15, section_ceilings),
    Section("correctness", 90, section_correctness),
    Section("logits", 120, section_logits),
    Section("linear", 80, section_linear),
    Section("optimizer", 60, section_optimizer),
    Section("sweep", 45, section_sweep),
    Section("train_step", 150, section_train_step),
    Section("cuda_tests", 240, section_cuda_tests),
)


# ----------------------------------------------------------------------------- report


def _table(rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "/").replace("\n", " ")

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return lines


def to_markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"# GPU check on {m['device']}",
        "",
        f"{m['started']}; budget {m['budget_s']:.0f} s, used {m['elapsed_s']:.0f} s; torch {m['torch']}; "
        f"command `{m['command']}`.",
        "",
        "| section | status | seconds | estimate s | reason |",
        "|---|---|---|---|---|",
    ]
    for s in result["sections"]:
        secs = "-" if s.get("seconds") is None else f"{s['seconds']:.1f}"
        lines.append(f"| {s['name']} | {s['status']} | {secs} | {s['estimate_s']:.0f} | {s.get('reason', '')} |")
    for s in result["sections"]:
        rows = s.get("rows") or []
        if not rows and not s.get("error"):
            continue
        lines += ["", f"## {s['name']}: {s['status']}" + (f" ({s['reason']})" if s.get("reason") else ""), ""]
        if s.get("error"):
            lines += ["```", s["error"][-2000:], "```", ""]
        refs = {sec: refs for sec, _, refs in bk.SECTIONS}
        if s.get("kernel_section") in refs:
            lines += bk.section_markdown(rows, s["kernel_section"], None, refs[s["kernel_section"]])
        elif rows:
            lines += _table(rows)
    return "\n".join(lines) + "\n"


def _write(out: Path, stem: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=1, default=str) + "\n"), (".md", to_markdown(result))):
        tmp = out / f".{stem}{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(out / f"{stem}{suffix}")


def _free(device: torch.device) -> float | None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated() / 2**30
    return None


class BudgetExceeded(Exception):
    pass


def run_section(sec: Section, entry: dict, ctx: Context) -> None:
    """Run one section into ``entry``: its result, or its error (never raised: the next section
    runs), its time and the GPU memory still allocated after it."""
    t0 = time.monotonic()
    try:
        entry.update(status="ok")
        entry.update(sec.run(ctx))
    except BudgetExceeded:  # the later sections are skipped: no time is left
        entry.update(status="error", error="stopped: the whole call ran past its budget")
    except Exception as e:
        entry.update(status="error", error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        entry["seconds"] = time.monotonic() - t0
        entry["memory_allocated_after_gib"] = _free(ctx.device)
        skipped = sum(str(r.get("status", "")).startswith("skipped") for r in entry.get("rows") or [])
        if skipped and entry["status"] == "ok":
            entry.update(status="partial", reason=f"{skipped} entries skipped: time budget")
        print(f"=== {sec.name}: {entry['status']} in {entry['seconds']:.1f} s", flush=True)


def _alarm(signum, frame):
    raise BudgetExceeded("the whole call ran past its budget")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole call (default 480)")
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for gpu_check_<device>.{json,md}")
    ap.add_argument("--only", default=None, help="comma list of sections to run (default: all, in priority order)")
    ap.add_argument("--smoke-cpu", action="store_true", help="every section at tiny shapes on CPU (interpreter)")
    args = ap.parse_args(argv)
    start = time.monotonic()
    only = None if args.only is None else set(args.only.split(","))
    unknown = (only or set()) - {s.name for s in SECTIONS}
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {[s.name for s in SECTIONS]}")
    if args.smoke_cpu:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("gpu_check: no CUDA device here (use --smoke-cpu to check the script). Nothing measured.")
        return 0
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu-smoke"
    stem = "gpu_check_" + "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()
    result = dict(
        meta=dict(
            device=name,
            torch=torch.__version__,
            started=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            budget_s=args.budget,
            elapsed_s=0.0,
            command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        ),
        sections=[],
    )
    out = Path(args.out)
    alarm = hasattr(signal, "SIGALRM") and args.budget > 0  # a backstop: sections also watch their deadline
    if alarm:
        previous_handler = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(int(args.budget + RESERVE_S))
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for sec in SECTIONS:
                if only is not None and sec.name not in only:
                    continue
                entry = dict(name=sec.name, estimate_s=sec.estimate_s, status="running")
                result["sections"].append(entry)
                left = args.budget - (time.monotonic() - start) - RESERVE_S
                need = 0.0 if args.smoke_cpu else sec.estimate_s
                if need > left:
                    entry.update(status="skipped", reason=f"estimated {need:.0f} s, {max(left, 0):.0f} s left")
                else:
                    cap = left if args.smoke_cpu else min(left, 2 * sec.estimate_s)
                    print(f"\n=== {sec.name} (estimate {sec.estimate_s:.0f} s, {left:.0f} s left)", flush=True)
                    run_section(sec, entry, Context(device, args.smoke_cpu, time.monotonic() + cap, Path(scratch)))
                result["meta"]["elapsed_s"] = time.monotonic() - start
                _write(out, stem, result)
    except BudgetExceeded:  # raised between sections: what ran is written below
        pass
    finally:
        if alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous_handler)
    result["meta"]["elapsed_s"] = time.monotonic() - start
    _write(out, stem, result)
    print(to_markdown(result))
    print(f"wrote {out / stem}.json and .md")
    bad = [s["name"] for s in result["sections"] if s["status"] in ("error", "FAILED")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
