"""Run many :class:`~.loop.RunConfig` s, resumably: one JSON line per finished run.

A full-size protocol is hundreds of short runs on shared CPUs.  :func:`run_all` appends each
finished run's record (:func:`record_of`) to a JSON-lines file as soon as it ends and skips the
runs that file already holds, so a crash or a kill loses at most the runs in flight, and rerunning
the same command resumes.  ``jobs > 1`` runs that many worker processes (one torch thread each).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .loop import RunConfig, train

#: Per-rollout curves kept in a run's record (the rest of the per-rollout data is summarised).
CURVES = ("reward", "len_correct", "len_incorrect", "prefix_share", "end_overshoot", "end_outside")


def run_key(cfg: RunConfig) -> str:
    """A stable identity of a configuration (the JSON of its fields, sorted)."""
    return json.dumps(asdict(cfg), sort_keys=True)


def record_of(cfg: RunConfig) -> dict[str, Any]:
    """Train ``cfg`` and return its record: ``key``, ``config``, ``summary``, per-rollout ``curves``,
    the mean overshoot before each inner step (``overshoot_by_inner``) and the CPU seconds."""
    cpu = time.process_time()
    result = train(cfg)
    curves = {c: [r.get(c, float("nan")) for r in result.rollouts] for c in CURVES}
    by_inner = [[s["overshoot_fraction"] for s in result.steps if s["inner"] == k] for k in range(cfg.inner_steps)]
    return {
        "key": run_key(cfg),
        "config": asdict(cfg),
        "summary": result.summary(),
        "curves": curves,
        "overshoot_by_inner": [sum(v) / len(v) if v else 0.0 for v in by_inner],
        "cpu_seconds": time.process_time() - cpu,
    }


def load_records(path: Path) -> dict[str, dict[str, Any]]:
    """The records a JSON-lines file holds, by key (a torn last line is ignored)."""
    out: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[rec["key"]] = rec
    return out


def _worker(cfg: RunConfig) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    return record_of(cfg)


def run_all(
    configs: Iterable[RunConfig],
    path: Path,
    *,
    jobs: int = 1,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Records of ``configs`` (in order), training only those ``path`` does not hold yet."""
    configs = list(configs)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = load_records(path)
    unique = {run_key(c): c for c in configs}
    todo = [c for k, c in unique.items() if k not in done]
    if progress and todo:
        progress(f"{len(todo)} runs to do, {len(configs) - len(todo)} already in {path}")

    def keep(rec: dict[str, Any], i: int) -> None:
        done[rec["key"]] = rec
        with path.open("a") as f:
            f.write(json.dumps(rec, default=float) + "\n")
        if progress:
            c, s = rec["config"], rec["summary"]
            progress(
                f"[{i}/{len(todo)}] {c['task']} {c['optimizer']} {c['preset']} mu={c['inner_steps']} "
                f"lr={c['lr']:g} seed={c['seed']}: reward {s['reward_mean']:.3f}, eval {s['eval_accuracy']:.3f}, "
                f"{rec['cpu_seconds']:.1f} cpu-s"
            )

    if jobs <= 1:
        for i, cfg in enumerate(todo, 1):
            keep(record_of(cfg), i)
    else:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            for i, rec in enumerate(pool.imap_unordered(_worker, todo), 1):
                keep(rec, i)
    return [done[run_key(c)] for c in configs]
