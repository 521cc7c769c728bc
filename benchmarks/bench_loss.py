"""The GRPO loss on ``(B, T)`` log-probs, grpo-fix against TRL 1.16's own loss code, on CPU.

    python benchmarks/bench_loss.py                       # (64, 512) and (256, 1024), writes results/loss_cpu.*
    python benchmarks/bench_loss.py --shapes 8x64 --rounds 3 --no-write   # a quick look

What is timed, per call: forward and backward of the loss from log-probs that require grad, and
everything the call computes besides the loss (metrics), on identical inputs.

- **TRL 1.16**: ``trl.GRPOTrainer._compute_loss`` itself, run as a plain function on a stand-in
  ``self`` (trl/trainer/grpo_trainer.py, ``_compute_loss``, lines 3020-3309 of trl 1.16.0): the
  stand-in's ``_get_per_token_logps_and_entropies`` returns the prepared log-probs (and entropies,
  as TRL's model forward would), its accelerator is accelerate's own single-process
  ``gather`` / ``reduce``.  So the timed code is TRL's: ratio, clip, the loss-type aggregation and
  the metrics it logs in the same call, with their reductions and ``.item()`` reads (clip ratios
  low/high/region means, low min / high max over sequences, and the entropy mean, which TRL always
  logs; ours computes no entropy metric).
- **grpo-fix**: ``grpo_fix.surrogate_loss`` with the presets ``dapo`` (against TRL ``dapo``, eps
  0.2 / 0.28), ``grpo`` (against TRL ``grpo``) and ``uniform`` (against TRL's default, ``dapo`` with
  eps 0.2): with rollout-time prefix-consistent ``(B, T)`` advantages; with ``classes=`` from
  ``grpo_fix.prefix_classes`` computed at rollout time (outside the timed call; the loss then also
  reports W_agg); and with ``completion_ids`` (the prefix classes found inside every call).

Method: ``torch.set_num_threads(--threads)`` (1); each round runs every variant once, in an order
rotated every round (paired, interleaved); after ``--warmup`` rounds, the table gives each
variant's median time and the median over rounds of its time divided by its TRL baseline's time
in the same round (with the 25th-75th percentiles).  Before timing, ``dapo`` and ``grpo`` are
checked equal to TRL (loss and gradient).  Op and sync counts come from ``opcount.py``:
forward and backward eager ops, host syncs, and the forward ops inside ``run_math`` (the part of
our loss that ``torch.compile`` fuses on CUDA; the rest stays eager).  Ratios are CPU ratios; on
a GPU the op and sync counts matter more than the arithmetic.

Writes ``benchmarks/results/loss_cpu.json`` and ``.md`` (``--out`` changes the path stem).  To
measure one commit while the checkout has other changes: ``git archive <commit>`` into a folder,
``pip wheel --no-deps`` it, ``pip install --no-deps --target DIR`` the wheel, and run this script
with ``PYTHONPATH=DIR`` and ``--source "<commit>"``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import time
import types
from collections import defaultdict
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # opcount.py, also when loaded by path

from opcount import OpCounter, count_forward_backward  # noqa: E402

from grpo_fix import PRESETS, group_advantages, prefix_classes, prefix_consistent_advantages, surrogate_loss  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GROUP_SIZE = 8
VOCAB = 1000
COMPILED_REGION = "compiled math"


# ----------------------------------------------------------------------------- inputs


def make_batch(B: int, T: int, seed: int = 0) -> dict:
    """A buffered micro-batch as TRL holds it: groups of 8 completions that share prefixes of random
    length (some pairs share longer ones), 0/1 integer mask with 50-100 % of each row valid, old
    log-probs 0.2 (std) off the current ones in log space (at most 0), group-normalised advantages."""
    if B % GROUP_SIZE:
        raise ValueError(f"B must be a multiple of the group size {GROUP_SIZE}, got {B}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    for start in range(0, B, GROUP_SIZE):
        shared = int(torch.randint(0, T // 4 + 1, (1,), generator=g))
        ids[start : start + GROUP_SIZE, :shared] = ids[start, :shared]
        pair = int(torch.randint(shared, T // 2 + 1, (1,), generator=g))
        ids[start + 1, :pair] = ids[start, :pair]
    lengths = (T * (0.5 + 0.5 * torch.rand(B, generator=g))).long().clamp(1, T)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    logp = -torch.rand(B, T, generator=g) * 3
    old = (logp + 0.2 * torch.randn(B, T, generator=g)).clamp(max=0.0)
    adv = group_advantages(torch.randn(B, generator=g), GROUP_SIZE)
    entropies = torch.rand(B, T, generator=g) * 2
    return dict(
        logp=logp.requires_grad_(True),
        old=old,
        adv=adv,
        mask=mask,
        ids=ids,
        entropies=entropies,
        # rollout time, outside every timed call
        adv_tokens=prefix_consistent_advantages(ids, adv, GROUP_SIZE, mask),
        classes=prefix_classes(ids, GROUP_SIZE, mask),
        num_items=mask.sum(),
    )


# ----------------------------------------------------------------------------- TRL 1.16's own loss


class _SingleProcessAccelerator:
    """What ``accelerate.Accelerator`` does in ``gather`` / ``reduce`` on one process (its own functions)."""

    num_processes = 1

    def gather(self, tensor):
        from accelerate.utils import gather

        return gather(tensor)

    def reduce(self, tensor, reduction="sum", scale=1.0):
        from accelerate.utils import reduce

        return reduce(tensor, reduction, scale)

    gather_for_metrics = gather


def trl_loss_fn(loss_type: str, batch: dict, *, eps_low: float, eps_high: float):
    """``() -> loss``: TRL 1.16's ``GRPOTrainer._compute_loss`` on a stand-in ``self`` (beta 0, token
    ratios, no vLLM, no entropy mask or bonus, one process, no gradient accumulation)."""
    from accelerate import PartialState
    from trl.trainer.grpo_trainer import GRPOTrainer

    PartialState()  # accelerate's gather/reduce read it
    stand_in = types.SimpleNamespace(
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=0.0,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=batch["mask"].shape[1],
        accelerator=_SingleProcessAccelerator(),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
    )
    stand_in._get_per_token_logps_and_entropies = lambda *a, **k: (batch["logp"], batch["entropies"], None)
    B, T = batch["mask"].shape
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": batch["ids"],
        "completion_mask": batch["mask"],
        "advantages": batch["adv"],
        "old_per_token_logps": batch["old"],
        "num_items_in_batch": batch["num_items"],
    }

    def call():
        stand_in._metrics["train"].clear()
        return GRPOTrainer._compute_loss(stand_in, None, inputs)

    call.metrics = stand_in._metrics["train"]
    return call


# ----------------------------------------------------------------------------- ours


def ours_loss_fn(preset: str, batch: dict, prefix: str, checks: str = "eager"):
    """``() -> loss`` of ``grpo_fix.surrogate_loss``; ``prefix``: ``"none"`` ((B,) advantages, no
    groups), ``"tokens"`` (rollout-time (B, T) prefix-consistent advantages), ``"classes"``
    (rollout-time classes) or ``"inline"`` (completion_ids: classes found in the call)."""
    kwargs: dict = {}
    adv = batch["adv"]
    if prefix == "tokens":
        adv, kwargs = batch["adv_tokens"], dict(group_size=GROUP_SIZE)
    elif prefix == "classes":
        kwargs = dict(group_size=GROUP_SIZE, classes=batch["classes"])
    elif prefix == "inline":
        kwargs = dict(group_size=GROUP_SIZE, completion_ids=batch["ids"])
    else:
        kwargs = dict(group_size=None)
    cfg = PRESETS[preset]

    def call():
        return surrogate_loss(cfg, batch["logp"], batch["old"], adv, batch["mask"], checks=checks, **kwargs).loss

    return call


TRL_DAPO, TRL_GRPO, TRL_DEFAULT = "TRL 1.16 dapo (eps 0.2/0.28)", "TRL 1.16 grpo", "TRL 1.16 default (dapo, eps 0.2)"
#: name -> (TRL loss_type, eps_low, eps_high)
TRL_VARIANTS = {TRL_DAPO: ("dapo", 0.2, 0.28), TRL_GRPO: ("grpo", 0.2, 0.2), TRL_DEFAULT: ("dapo", 0.2, 0.2)}
#: name -> (preset, prefix argument of ours_loss_fn, TRL baseline)
OURS_VARIANTS = {
    "ours dapo": ("dapo", "none", TRL_DAPO),
    "ours grpo": ("grpo", "none", TRL_GRPO),
    "ours uniform, (B, T) advantages": ("uniform", "tokens", TRL_DEFAULT),
    "ours uniform, classes from rollout time": ("uniform", "classes", TRL_DEFAULT),
    "ours uniform, completion_ids (classes in the call)": ("uniform", "inline", TRL_DEFAULT),
}


def build_calls(batch: dict) -> dict[str, tuple[str | None, object]]:
    """name -> (baseline name or None, call) for every variant, TRL's first."""
    calls: dict[str, tuple[str | None, object]] = {}
    for name, (loss_type, lo, hi) in TRL_VARIANTS.items():
        calls[name] = (None, trl_loss_fn(loss_type, batch, eps_low=lo, eps_high=hi))
    for name, (preset, prefix, base) in OURS_VARIANTS.items():
        calls[name] = (base, ours_loss_fn(preset, batch, prefix))
    return calls


# ----------------------------------------------------------------------------- parity, counts, timing


def parity(batch: dict) -> dict:
    """Largest relative difference of loss and gradient, ours vs TRL, for dapo and grpo."""
    out = {}
    for preset, trl_name in (("dapo", TRL_DAPO), ("grpo", TRL_GRPO)):
        loss_type, lo, hi = TRL_VARIANTS[trl_name]
        losses, grads = [], []
        for call in (trl_loss_fn(loss_type, batch, eps_low=lo, eps_high=hi), ours_loss_fn(preset, batch, "none")):
            batch["logp"].grad = None
            loss = call()
            loss.backward()
            losses.append(loss.detach())
            grads.append(batch["logp"].grad.clone())
        batch["logp"].grad = None
        scale = grads[0].abs().max().clamp_min(1e-30)
        out[preset] = {
            "loss_rel_diff": float((losses[1] - losses[0]).abs() / losses[0].abs().clamp_min(1e-30)),
            "grad_max_diff_rel_to_max": float((grads[1] - grads[0]).abs().max() / scale),
        }
    return out


@contextlib.contextmanager
def compiled_region(counter: OpCounter):
    """Tag the ops of ``run_math`` (what ``compile_math`` compiles on CUDA) as the compiled region."""
    import grpo_fix.loss.surrogate as surrogate_mod

    original = getattr(surrogate_mod, "run_math", None)
    if original is None:  # the loss no longer routes its math through run_math: no region to report
        yield
        return

    def tagged(*args, **kwargs):
        with counter.region(COMPILED_REGION):
            return original(*args, **kwargs)

    with mock.patch.object(surrogate_mod, "run_math", tagged):
        yield


def op_counts(name: str, call, batch: dict) -> dict:
    batch["logp"].grad = None
    fwd, bwd = count_forward_backward(call, setup=compiled_region)
    batch["logp"].grad = None
    row = {
        "fwd_ops": fwd.ops,
        "bwd_ops": bwd.ops,
        "fwd_launches": fwd.launches,
        "bwd_launches": bwd.launches,
        "fwd_syncs": fwd.syncs,
        "bwd_syncs": bwd.syncs,
        "fwd_sync_ops": [fwd.names[i] for i in fwd.sync_positions],
        "fwd_ops_in_compiled_region": fwd.in_region.get(COMPILED_REGION, 0) if name.startswith("ours") else None,
        "fwd_histogram": dict(sorted(fwd.histogram().items())),
        "bwd_histogram": dict(sorted(bwd.histogram().items())),
    }
    if name in OURS_VARIANTS:
        preset, prefix, _ = OURS_VARIANTS[name]
        deferred, _ = count_forward_backward(ours_loss_fn(preset, batch, prefix, checks="deferred"))
        batch["logp"].grad = None
        row["fwd_syncs_checks_deferred"] = deferred.syncs
    return row


def time_rounds(calls: dict, batch: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Per variant, the seconds of each timed round (forward + backward), variants interleaved in an
    order rotated every round."""
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    logp = batch["logp"]
    for r in range(warmup + rounds):
        k = r % len(names)
        gc.collect()
        gc.disable()  # no collection inside a timed call
        try:
            for name in names[k:] + names[:k]:
                logp.grad = None
                t0 = time.perf_counter()
                loss = calls[name]()
                loss.backward()
                dt = time.perf_counter() - t0
                if r >= warmup:
                    times[name].append(dt)
        finally:
            gc.enable()
    logp.grad = None
    return times


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def machine() -> str:
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def source_state() -> str:
    """Which grpo-fix ran: the commit of the checkout it was imported from (and whether its library
    files differ from that commit), or where it is installed."""
    import subprocess

    import grpo_fix

    root = Path(grpo_fix.__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "grpo_fix", "kernels", "integration"], capture_output=True, text=True
        )
    except OSError:
        head = None
    if head is None or head.returncode or not (root / "kernels").is_dir():
        return f"grpo_fix {grpo_fix.__version__} installed at {root}"
    return head.stdout.strip() + (" + uncommitted library changes" if dirty.stdout.strip() else "")


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def run(shapes: list[tuple[int, int]], rounds: int, warmup: int) -> dict:
    meta = dict(
        machine=machine(),
        source=source_state(),
        torch=torch.__version__,
        trl=_version("trl"),
        accelerate=_version("accelerate"),
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        rounds=rounds,
        warmup=warmup,
        group_size=GROUP_SIZE,
        load_average_before=_load(),
    )
    rows, parities = [], {}
    for B, T in shapes:
        shape = f"({B}, {T})"
        batch = make_batch(B, T)
        parities[shape] = parity(batch)
        built = build_calls(batch)
        calls = {name: call for name, (_, call) in built.items()}
        print(f"\n{shape}: parity with TRL {parities[shape]}", flush=True)
        times = time_rounds(calls, batch, rounds, warmup)
        for name, (base, call) in built.items():
            row = dict(shape=shape, variant=name, baseline=base, median_ms=1e3 * statistics.median(times[name]))
            if base is not None:
                ratios = [a / b for a, b in zip(times[name], times[base])]
                row.update(
                    ratio_median=statistics.median(ratios),
                    ratio_p25=_quantile(ratios, 0.25),
                    ratio_p75=_quantile(ratios, 0.75),
                )
            row.update(op_counts(name, call, batch))
            rows.append(row)
            print(f"  {name:<52s} {row['median_ms']:8.3f} ms  {row.get('ratio_median', 1.0):5.2f}x", flush=True)
    meta["load_average_after"] = _load()
    return dict(meta=meta, parity=parities, rows=rows)


def _version(pkg: str) -> str:
    try:
        import importlib.metadata as md

        return md.version(pkg)
    except Exception:
        return "not installed"


def to_markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"# GRPO loss forward+backward on (B, T) log-probs: grpo-fix vs TRL {m['trl']}'s `_compute_loss`",
        "",
        f"{m['machine']}; grpo-fix at {m['source']}; torch {m['torch']}, accelerate {m['accelerate']}; {m['date']}; "
        f"load average {m['load_average_before']} before, {m['load_average_after']} after; "
        f"median of {m['rounds']} paired, interleaved rounds after {m['warmup']} warm-up rounds; "
        f"groups of {m['group_size']}; fp32.",
        "",
        "x TRL: median over rounds of (variant time / its TRL baseline's time in the same round), "
        "[25th-75th percentile]. Ops: eager ops dispatched, forward / backward (in brackets: those that "
        "launch work on a GPU, i.e. without views and metadata); syncs: host syncs "
        "(forward / backward; with `checks='deferred'` in brackets); compiled: forward ops inside "
        "`run_math` (fused by `torch.compile` on CUDA). TRL's call includes its entropy-mean metric.",
        "",
        "| shape | variant | median ms | x TRL | ops fwd (launches) | ops bwd (launches) | syncs | compiled |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ratio = f"{r['ratio_median']:.2f} [{r['ratio_p25']:.2f}-{r['ratio_p75']:.2f}]" if r["baseline"] else "1"
        syncs = f"{r['fwd_syncs']} / {r['bwd_syncs']}"
        if "fwd_syncs_checks_deferred" in r:
            syncs += f" ({r['fwd_syncs_checks_deferred']})"
        compiled = "-" if r["fwd_ops_in_compiled_region"] is None else str(r["fwd_ops_in_compiled_region"])
        lines.append(
            f"| {r['shape']} | {r['variant']} | {r['median_ms']:.3f} | {ratio} | {r['fwd_ops']} ({r['fwd_launches']}) "
            f"| {r['bwd_ops']} ({r['bwd_launches']}) | {syncs} | {compiled} |"
        )
    lines += ["", "Parity before timing (ours vs TRL, relative): " + json.dumps(result["parity"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="64x512,256x1024", help="comma list of BxT (B a multiple of 8)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS_DIR / "loss_cpu"), help="output path without suffix")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--source", default=None, help="what to record as the grpo-fix that ran (default: detected)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",")]
    result = run(shapes, args.rounds, args.warmup)
    if args.source:
        result["meta"]["source"] = args.source
    md = to_markdown(result)
    print("\n" + md)
    if not args.no_write:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(md + "\n")
        print(f"wrote {out}.json and {out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
