"""The fair optimizer protocol (issue-level spec in ``benchmarks/README.md``): AdamW against
ClipAwareAdamW with every arm at its own validated learning rate, reported on held-out seeds.

Stages (``--stage``; ``all`` runs them in order, each resumable from the runs file):

1. ``validate``: AdamW and every ClipAwareAdamW setting of the round's candidates on the whole lr
   grid, validation seeds; the validation rule selects a candidate.
2. ``test``: AdamW, the defaults and the selected candidate on the whole grid, test seeds.
3. ``controls``: the matched-effective-lr AdamW and the on-policy (mu = 1) pair, test seeds
   (design round 1 only).
4. ``report``: JSON, markdown and PNG under ``--out`` (``fair_<task>.*``, ``fair_<task>_round2.*``).

``--round 2`` is design round 2 (:data:`.protocol.ROUND2_CANDIDATES` on fresh test seeds): its
candidate is selected over both tasks at once (:func:`.fair_analysis.select_joint`), so the test
stage of either task needs the validation stage of both.  Runs are appended to ``--runs``
(default: ``<cache>/runs/fair_<task>.jsonl``, shared by the rounds, so no run is repeated) as they
finish.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import arith, toy
from .fair_analysis import select_joint
from .fair_report import build_report, markdown, onpolicy_lrs, plot, validation
from .grid import load_records, run_all
from .loop import RunConfig
from .protocol import BASELINE, DEFAULT, PROTOCOLS, Protocol, protocol
from .report import write_results

STAGES = ("validate", "test", "controls", "report")


def validate_configs(proto: Protocol) -> list[RunConfig]:
    return [proto.config(a, lr, s) for a in (BASELINE, *proto.candidates) for lr in proto.lrs for s in proto.val_seeds]


def test_configs(proto: Protocol, selected: str | None) -> list[RunConfig]:
    arms = list(dict.fromkeys([BASELINE, DEFAULT, selected or DEFAULT]))
    return [proto.config(a, lr, s) for a in arms for lr in proto.lrs for s in proto.test_seeds]


def control_configs(proto: Protocol, val: dict[str, Any]) -> list[RunConfig]:
    """AdamW at the matched effective lr, and the mu = 1 pair (dapo + AdamW, uniform + the defaults)."""
    curve = val["curves"][DEFAULT]
    matched = float(f"{curve['best_lr'] * curve['alpha_mean_at_best']:.6g}")
    out = [proto.config(BASELINE, matched, s) for s in proto.test_seeds]
    for lr in onpolicy_lrs(proto, val):
        mu1 = {"inner_steps": 1, "rollouts": proto.onpolicy_rollouts}
        out += [proto.config(BASELINE, lr, s, preset="dapo", **mu1) for s in proto.test_seeds]
        out += [proto.config(DEFAULT, lr, s, **mu1) for s in proto.test_seeds]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="grpo-fix experiment fair-optimizer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=("toy", "arith"), default="toy")
    ap.add_argument("--stage", choices=(*STAGES, "all"), default="all")
    ap.add_argument("--smoke", action="store_true", help="the test suite's reduced sizes (seconds)")
    ap.add_argument("--round", type=int, choices=(1, 2), default=1, help="design round (2: the guard candidates)")
    ap.add_argument("--val-seeds", type=int, nargs="+", help="validation seeds (default: the registered ones)")
    ap.add_argument("--test-seeds", type=int, nargs="+", help="test seeds (default: the registered ones)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (one torch thread each)")
    ap.add_argument("--runs", help="JSON-lines file of finished runs (resumable)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    toy.offline_environment()
    proto = protocol(args.task, smoke=args.smoke, design_round=args.round)
    if args.val_seeds or args.test_seeds:
        proto = replace(
            proto,
            val_seeds=tuple(args.val_seeds or proto.val_seeds),
            test_seeds=tuple(args.test_seeds or proto.test_seeds),
        )
    runs = Path(args.runs) if args.runs else runs_path(args.task, args.smoke)
    log = None if args.quiet else lambda msg: print(msg, flush=True)
    stages: tuple[str, ...] = STAGES if args.stage == "all" else (args.stage,)
    if proto.design_round == 2:
        stages = tuple(s for s in stages if s != "controls")
    if "validate" in stages:
        run_all(validate_configs(proto), runs, jobs=args.jobs, progress=log)
    val = validation(list(load_records(runs).values()), proto)
    joint = None
    if proto.design_round == 2 and {"test", "report"} & set(stages):
        joint = joint_selection(proto, runs, smoke=args.smoke)
    selected = joint["selected"] if joint is not None else val["selected"]
    if "test" in stages:
        run_all(test_configs(proto, selected), runs, jobs=args.jobs, progress=log)
    if "controls" in stages:
        run_all(control_configs(proto, val), runs, jobs=args.jobs, progress=log)
    if "report" not in stages:
        return {"validation": val, "joint": joint}
    records = [r for r in load_records(runs).values() if in_round(r["config"], proto)]
    rep = build_report(records, proto, joint=joint)
    rep["task_info"] = _task_info(proto)
    rep["runs"] = [_compact(r) for r in records]
    text = markdown(rep)
    name = f"fair_{args.task}" + ("_round2" if proto.design_round == 2 else "") + ("_smoke" if args.smoke else "")
    title = f"Fair optimizer protocol, task {args.task}" + (", design round 2" if proto.design_round == 2 else "")
    write_results(
        args.out,
        name,
        title=f"{title}: AdamW vs ClipAwareAdamW at their own validated lr",
        table=text,
        payload=rep,
        plot=lambda fig: plot(rep, fig),
        notes=f"Runs: {len(records)}; CPU seconds: {sum(r['cpu_seconds'] for r in records):.0f}.",
    )
    if log:
        log(text)
    return rep


def in_round(config: dict[str, Any], proto: Protocol) -> bool:
    """Whether a run of the (shared) runs file belongs to this round: one of its arms (the on-policy
    control's ``adamw + dapo`` included) on one of its seeds."""
    seeds = set(proto.val_seeds) | set(proto.test_seeds)
    return config["optimizer"] in (BASELINE, *proto.candidates) and config["seed"] in seeds


def runs_path(task: str, smoke: bool = False) -> Path:
    """The default runs file of ``task`` (shared by the design rounds)."""
    return arith.cache_dir() / "runs" / f"fair_{task}{'_smoke' if smoke else ''}.jsonl"


def joint_selection(proto: Protocol, runs: Path, *, smoke: bool) -> dict[str, Any]:
    """Design round 2's selection over both tasks, from each task's validation runs (``runs`` for
    ``proto.task``, the default runs file for the other); ``RuntimeError`` naming the missing stage when a
    task has no validation runs of every candidate."""
    validations = {}
    for other in PROTOCOLS:
        p = proto if other == proto.task else protocol(other, smoke=smoke, design_round=2)
        path = runs if other == proto.task else runs_path(other, smoke)
        val = validation(list(load_records(path).values()) if path.exists() else [], p)
        missing = [c for c in (BASELINE, *p.candidates) if c not in val["curves"]]
        if missing:
            raise RuntimeError(
                f"design round 2 selects over both tasks, but task {other!r} has no validation runs of {missing} in "
                f"{path}: run `grpo-fix experiment fair-optimizer --round 2 --task {other} --stage validate` first"
            )
        validations[other] = val
    return select_joint(validations, proto.candidates)


def _task_info(proto: Protocol) -> dict[str, Any]:
    from .tasks import get_task

    return get_task(proto.task, proto.task_options).info


def _compact(rec: dict[str, Any]) -> dict[str, Any]:
    """A run as the JSON keeps it: its identity and summary (the curves stay in the runs file)."""
    c = rec["config"]
    keep = ("optimizer", "preset", "inner_steps", "rollouts", "lr", "seed")
    return {**{k: c[k] for k in keep}, **rec["summary"], "cpu_seconds": rec["cpu_seconds"]}


if __name__ == "__main__":
    main()
