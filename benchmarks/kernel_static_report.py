"""Compile every grpo_fix Triton kernel for a CUDA architecture on any machine (no GPU needed) and
report what the GPU would run: registers, spills, shared memory, and the width of the global
loads and stores in the SASS.

Why: the CPU tests run the kernels under the Triton interpreter, which checks their arithmetic but
neither compiles them nor says anything about speed.  This script drives the real launch code of
``grpo_fix.kernels`` (``logprob_forward`` / ``logprob_backward`` / ``adamw_step_``) with small CPU
tensors that have the strides, dtypes and alignment of the benchmark shapes, records each launch
instead of running it, specialises its arguments exactly as Triton's JIT would (Triton's own
``native_specialize_impl``: 16-divisible pointers and integers, integers equal to 1 as constants),
compiles it to a cubin for ``--arch`` (default 90: H100 / H200) with the ptxas that ships in the
triton wheel, and reads the resource usage (``cuobjdump -res-usage``) and the SASS.

Checks (``--check`` exits 1 if one fails): every kernel compiles; no register spills (LOCAL and
STACK are 0); the vocabulary-row loads of the log-prob kernels and all loads of the AdamW kernel
are 128-bit (``LDG.E.128``: 8 bf16 or 4 fp32 per instruction), and so are the gradient / state
stores of the backward and AdamW kernels (``STG.E.128``).  Vectorised, spill-free memory access is
a precondition for these bandwidth-bound kernels to run near the HBM roofline; the times
themselves come only from ``bench_kernels.py`` on a GPU.

Usage::

    python benchmarks/kernel_static_report.py            # print the table
    python benchmarks/kernel_static_report.py --check    # and exit 1 on a failed check
    python benchmarks/kernel_static_report.py --write    # and write results/kernels_static_sm90_v151936.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from unittest.mock import patch

os.environ["TRITON_INTERPRET"] = "0"  # compile, do not interpret (must precede the kernels' definition)

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
V_BENCH = 151936  # Qwen2 vocabulary: the benchmark's rows (16-divisible, like every common vocab)


class _Recorder:
    """Stands in for a ``@triton.jit`` function: ``rec[grid](*args, **kw)`` records the launch."""

    def __init__(self, fn):
        self.fn, self.launches = fn, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((args, dict(kwargs)))

        return launch


def _record_launches(vocab: int) -> list[tuple[str, object, tuple, dict, dict]]:
    """Run the production launch code on CPU tensors with the benchmark's layouts; return
    (variant name, jit function, args, kwargs, expectations) per recorded launch."""
    from grpo_fix.kernels import adamw_step as adamw_mod
    from grpo_fix.kernels import logprob as lp

    fwd_fn, bwd_fn = lp._kernels()
    kernel_fn, triton_mod = adamw_mod._kernel()
    fwd, bwd, adam = _Recorder(fwd_fn), _Recorder(bwd_fn), _Recorder(kernel_fn)
    check = _Recorder(adamw_mod._check_kernel())
    with ExitStack() as stack:  # the modules are patched only while recording
        stack.enter_context(patch.object(lp, "_kernels", lambda: (fwd, bwd)))
        # CPU stand-ins for CUDA tensors: nothing runs
        stack.enter_context(patch.object(lp, "check_device", lambda t, what="input": None))
        stack.enter_context(patch.object(adamw_mod, "_kernel", lambda: (adam, triton_mod)))
        stack.enter_context(patch.object(adamw_mod, "_check_kernel", lambda: check))
        return _launch_variants(vocab, lp, adamw_mod, fwd, bwd, adam, check)


def _launch_variants(vocab, lp, adamw_mod, fwd, bwd, adam, check):
    """Call the launch code once per variant (kernels recorded, not run)."""
    out = []

    def take(rec, name, expect):
        args, kwargs = rec.launches.pop()
        out.append((name, rec.fn, args, kwargs, expect))

    B, T = 2, 16
    row_loads = dict(ldg128=True)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        tag = str(dtype).removeprefix("torch.")
        # logits path: model output (B, T + 1, V) with a mask; backward in place
        z = torch.zeros(B, T + 1, vocab, dtype=dtype)
        ids = torch.zeros(B, T, dtype=torch.int64)
        mask = torch.ones(B, T, dtype=torch.bool)
        _, lse = lp.logprob_forward(z, ids, mask, save_lse=True)
        take(fwd, f"logprob fwd {tag} (B,T+1,V) masked", row_loads)
        lp.logprob_backward(z, ids, mask, lse, torch.ones(B, T), inplace=True)
        take(bwd, f"logprob bwd {tag} (B,T+1,V) in place", dict(row_loads, stg128=True))
    # logits-free chunk buffer / no-grad old-policy pass: packed (n, V), no mask, no lse
    zc = torch.zeros(B * T, vocab, dtype=torch.bfloat16)
    lp.logprob_forward(zc, torch.zeros(B * T, dtype=torch.int64), None, save_lse=False)
    take(fwd, "logprob fwd bf16 packed (N,V) no-grad", row_loads)

    for pdtype in (torch.float32, torch.bfloat16):
        n = 1 << 20
        p = torch.zeros(n, dtype=pdtype)
        g = torch.zeros(n, dtype=pdtype)
        m, v = torch.zeros(n), torch.zeros(n)
        tag = str(pdtype).removeprefix("torch.")
        # without and with the device-side non-finite flag (the CUDA default: no host sync per step)
        for ok, how in ((None, "no flag"), (torch.ones(()), "device flag")):
            adamw_mod.adamw_step_(
                [p],
                [g],
                [m],
                [v],
                [torch.zeros(())],
                lr=1e-3,
                alpha=1.0,
                beta1=0.9,
                beta2=0.999,
                eps=1e-8,
                weight_decay=0.01,
                m_scales=[1.0],
                ok=ok,
            )
            take(adam, f"adamw step param {tag}, fp32 state, {how}", dict(ldg128=True, stg128=True))
        adamw_mod.nonfinite_check_([g], torch.ones(()))
        take(check, f"non-finite check, gradient {tag}", dict(ldg128=True))
    return out


def _compile(fn, args, kwargs, arch):
    """Compile one recorded launch with the specialisation Triton's JIT gives those arguments."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = dict(zip(fn.arg_names, args))
    bound.update(kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[(i,)] = "constexpr", value
            continue
        ty, key = native_specialize_impl(BaseBackend, value, False, True, True)
        if ty == "constexpr":  # an integer equal to 1
            signature[param.name], constexprs[(i,)] = "constexpr", key
        else:
            signature[param.name] = ty
            if isinstance(key, str) and key:
                attrs[(i,)] = BaseBackend.parse_attr(key)
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts), opts, kwargs


def _tool(name: str) -> str:
    import triton

    local = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found (neither in triton's nvidia backend nor on PATH)")
    return found


def _inspect(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True, check=True
        ).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res))
    return dict(
        regs=int(usage.get("REG", -1)),
        stack=int(usage.get("STACK", -1)),
        local=int(usage.get("LOCAL", -1)),
        shared=int(usage.get("SHARED", -1)),
        loads=sorted(set(re.findall(r"\bLDG\.E(?:\.[A-Z0-9]+)*", sass))),
        stores=sorted(set(re.findall(r"\bSTG\.E(?:\.[A-Z0-9]+)*", sass))),
        sass_lines=len(sass.splitlines()),
    )


def build_report(arch: int, vocab: int = V_BENCH) -> list[dict]:
    rows = []
    for name, fn, args, kwargs, expect in _record_launches(vocab):
        row = dict(variant=name, kernel=fn.__name__, arch=f"sm_{arch}", failures=[])
        try:
            k, opts, consts = _compile(fn, args, kwargs, arch)
            row.update(
                _inspect(k.asm["cubin"]),
                num_warps=opts.get("num_warps", 4),
                constexprs={c: v for c, v in consts.items() if c.isupper()},
            )
        except Exception as e:  # report every variant, then fail the check
            row["failures"].append(f"compile: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            rows.append(row)
            continue
        if row["local"] != 0 or row["stack"] != 0:
            row["failures"].append(f"register spills (LOCAL {row['local']}, STACK {row['stack']})")
        if expect.get("ldg128") and not any(x.endswith(".128") for x in row["loads"]):
            row["failures"].append(f"no 128-bit global load ({row['loads']})")
        if expect.get("stg128") and not any(x.endswith(".128") for x in row["stores"]):
            row["failures"].append(f"no 128-bit global store ({row['stores']})")
        rows.append(row)
    return rows


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# grpo_fix Triton kernels compiled for {rows[0]['arch'] if rows else '?'} (static, no GPU)",
        "",
        f"triton {meta['triton']}, torch {meta['torch']}; compiled on {meta['host']} with the ptxas of the triton "
        "wheel; arguments specialised as Triton's JIT does for the benchmark layouts (V = "
        f"{meta['vocab']}).  Not a timing: see bench_kernels.py for those.",
        "",
        "| variant | constexprs | warps | regs | spill (local/stack B) | smem B | global loads | global stores "
        "| check |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        consts = ", ".join(f"{k}={v}" for k, v in r.get("constexprs", {}).items())
        lines.append(
            f"| {r['variant']} | {consts} | {r.get('num_warps', '-')} | {r.get('regs', '-')} | "
            f"{r.get('local', '-')}/{r.get('stack', '-')} | {r.get('shared', '-')} | "
            f"{' '.join(r.get('loads', []))} | {' '.join(r.get('stores', []))} | "
            f"{'ok' if not r['failures'] else '; '.join(r['failures'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100/H200, 80: A100)")
    p.add_argument(
        "--vocab",
        type=int,
        default=V_BENCH,
        help="vocabulary size of the logits rows (not a multiple of 8: rows lose 128-bit alignment)",
    )
    p.add_argument("--check", action="store_true", help="exit 1 if a kernel fails a check")
    p.add_argument("--write", action="store_true", help="write results/kernels_static_sm<arch>_v<vocab>.{json,md}")
    args = p.parse_args(argv)

    import platform

    import triton

    rows = build_report(args.arch, args.vocab)
    meta = dict(
        vocab=args.vocab,
        triton=triton.__version__,
        torch=torch.__version__,
        host=f"{platform.machine()} {platform.system()}",
    )
    md = to_markdown(rows, meta)
    print(md)
    if args.write:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        base = RESULTS_DIR / f"kernels_static_sm{args.arch}_v{args.vocab}"
        base.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
        base.with_suffix(".md").write_text(md)
        print(f"wrote {base}.json and {base}.md")
    failed = [r["variant"] for r in rows if r["failures"]]
    if failed:
        print(f"FAILED checks: {failed}", file=sys.stderr)
    return 1 if (args.check and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
