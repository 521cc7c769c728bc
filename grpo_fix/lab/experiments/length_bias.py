"""The loss comparison and the length-bias experiment (paper Prop. 1 in training).

Presets ``grpo`` (alpha = 1/(N_seqs |o_i|): a token of a short completion weighs more),
``dapo`` (TRL 1.16's default, 1/N_tokens) and ``uniform`` (ours: 1/N_tokens + prefix-consistent
clipping), all with AdamW, on two tasks whose reward does not depend on the completion's length:

- ``toy_first``: the toy policy; reward 1 when the first character is ``a``;
- ``arith``: the pretrained policy of task 2; reward 1 when the answer before ``;`` is right,
  whatever the length of the free tail after it.

With 1/|o_i| weighting, lengthening a wrong completion dilutes its (negative) per-token
gradient and shortening a right one concentrates its (positive) one, so ``grpo`` should learn
to make incorrect completions longer than correct ones; ``dapo`` and ``uniform`` weigh every
token alike and should not.  Reported per preset over the seeds: the length gap (mean length of
incorrect minus correct completions, tokens incl. ``<eos>``) over the last third of training,
its curve, the primary metric, and on the same rollouts the share of the advantage mass on
prefixes shared by the whole group with the preset's net ``|W_agg|``; differences against
``uniform`` with paired 95 % bootstrap intervals.

The learning rate is AdamW's validated lr of the fair protocol on the same model (``--lr`` or
read from ``fair_<toy|arith>.json`` under ``--out``), mu = 4 as there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from .. import arith, toy
from .grid import run_all
from .protocol import BASELINE, protocol
from .report import markdown_table, write_results
from .stats import bootstrap_mean, mean_difference, paired_bootstrap

PRESETS = ("grpo", "dapo", "uniform")
#: task -> (protocol whose model and validated AdamW lr it shares, rollouts, seeds)
SETTINGS: dict[str, tuple[str, int, tuple[int, ...]]] = {
    "toy_first": ("toy", 40, tuple(range(2000, 2016))),
    "arith": ("arith", 30, tuple(range(2000, 2008))),
}
QUANTITIES = ("length_gap", "len_correct", "len_incorrect", "prefix_share", "w_agg_rel")


def validated_lr(out: Path, family: str) -> float:
    """AdamW's validated lr in ``fair_<family>.json`` (``SystemExit`` naming the fix if absent)."""
    path = out / f"fair_{family}.json"
    if not path.exists():
        raise SystemExit(f"{path} not found: run `grpo-fix experiment fair-optimizer --task {family}` or pass --lr")
    return float(json.loads(path.read_text())["validation"]["curves"][BASELINE]["best_lr"])


def analyse(records: list[dict[str, Any]], metric: str, seeds: list[int]) -> dict[str, Any]:
    """Per preset: means with intervals of every quantity and the metric; differences against uniform."""
    by = {(r["config"]["preset"], r["config"]["seed"]): r for r in records}

    def value(rec: dict[str, Any], q: str) -> float:
        s = rec["summary"]
        return float(s["len_incorrect"] - s["len_correct"] if q == "length_gap" else s[q])

    rows, diffs, curves = [], [], {}
    for preset in PRESETS:
        recs = [by[(preset, s)] for s in seeds if (preset, s) in by]
        row: dict[str, Any] = {"preset": preset, "seeds": len(recs)}
        for q in (*QUANTITIES, metric):
            vals = [value(r, q) for r in recs]
            vals = [v for v in vals if v == v]
            row[q], row[f"{q}_lo"], row[f"{q}_hi"] = bootstrap_mean(vals) if vals else (float("nan"),) * 3
        rows.append(row)
        gap = np.array([np.array(r["curves"]["len_incorrect"]) - np.array(r["curves"]["len_correct"]) for r in recs])
        curves[preset] = np.nanmean(gap, 0).tolist() if len(recs) else []
    for preset in ("grpo", "dapo"):
        for q in ("length_gap", metric):
            pairs = [
                (value(by[(preset, s)], q), value(by[("uniform", s)], q))
                for s in seeds
                if (preset, s) in by and ("uniform", s) in by
            ]
            pairs = [(a, b) for a, b in pairs if a == a and b == b]
            if pairs:
                est, lo, hi = paired_bootstrap([a for a, _ in pairs], [b for _, b in pairs], mean_difference)
                diffs.append(
                    {
                        "comparison": f"{preset} - uniform",
                        "quantity": q,
                        "seeds": len(pairs),
                        "diff": est,
                        "lo": lo,
                        "hi": hi,
                    }
                )
    return {"rows": rows, "differences": diffs, "gap_curves": curves}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="grpo-fix experiment length-bias", description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=tuple(SETTINGS), default="toy_first")
    ap.add_argument("--lr", type=float, help="default: AdamW's validated lr in fair_<toy|arith>.json under --out")
    ap.add_argument("--seeds", type=int, nargs="+", help="seed list (default: the registered ones)")
    ap.add_argument("--rollouts", type=int)
    ap.add_argument("--smoke", action="store_true", help="the test suite's reduced sizes")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--runs", help="JSON-lines file of finished runs (resumable)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", help="basename of the result files (default: length_bias_<task>)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    toy.offline_environment()
    family, rollouts, seeds = SETTINGS[args.task]
    proto = protocol(family, smoke=args.smoke)
    seeds = tuple(args.seeds or (proto.test_seeds if args.smoke else seeds))
    rollouts = args.rollouts or (proto.rollouts if args.smoke else rollouts)
    lr = args.lr or validated_lr(Path(args.out), family)
    suffix = "_smoke" if args.smoke else ""
    runs = Path(args.runs or arith.cache_dir() / "runs" / f"length_bias_{args.task}{suffix}.jsonl")
    configs = [
        proto.config(BASELINE, lr, s, task=args.task, preset=p, rollouts=rollouts) for p in PRESETS for s in seeds
    ]
    records = run_all(configs, runs, jobs=args.jobs, progress=None if args.quiet else print)
    res = analyse(records, proto.metric, list(seeds))
    table = markdown_table(
        res["rows"],
        ["preset", "seeds", *(f"{q}{s}" for q in (*QUANTITIES, proto.metric) for s in ("", "_lo", "_hi"))],
        floatfmt=".4g",
    )
    table += "\n\n### Differences against uniform (paired, 95 % bootstrap)\n\n"
    table += markdown_table(res["differences"], ["comparison", "quantity", "seeds", "diff", "lo", "hi"], floatfmt=".4g")

    def plot(fig: Any) -> None:
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for preset, curve in res["gap_curves"].items():
            ax1.plot(curve, label=preset)
        for row in res["rows"]:
            ax2.bar(
                row["preset"],
                row["prefix_share"],
                yerr=[[row["prefix_share"] - row["prefix_share_lo"]], [row["prefix_share_hi"] - row["prefix_share"]]],
                capsize=4,
            )
        ax1.axhline(0, color="k", lw=0.5)
        ax1.set(xlabel="rollout", ylabel="length(incorrect) - length(correct), tokens")
        ax2.set(ylabel="advantage mass share on whole-group prefixes")
        ax1.legend(fontsize=8)

    write_results(
        args.out,
        args.name or f"length_bias_{args.task}{suffix}",
        title=f"Length bias in training (paper Prop. 1), task {args.task}: grpo vs dapo vs uniform",
        table=table,
        payload={
            "args": {**vars(args), "lr": lr, "seeds": list(seeds), "rollouts": rollouts},
            **res,
            "runs": [{**r["config"], **r["summary"]} for r in records],
        },
        plot=plot,
        notes=f"AdamW, lr {lr:g}, mu = {proto.inner_steps}, {rollouts} rollouts; "
        "length gap over the last third of training.",
    )
    if not args.quiet:
        print(table)
    return res


if __name__ == "__main__":
    main()
