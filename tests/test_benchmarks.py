"""The benchmark scripts run (tiny CPU shapes, Triton interpreter), so they cannot rot before a GPU runs them.

- ``opcount.py``: the op and host-sync counter the loss benchmark (and any test) uses;
- ``bench_loss.py``: grpo-fix's loss against TRL 1.16's own ``_compute_loss``, with parity, op
  and sync counts; what is pinned here: no host sync in any backward, and none in our forward
  with deferred checks unless the prefix classes are found inside the call;
- ``bench_kernels.py``, ``bench_train_step.py``: every entry runs, and every entry computing the
  benchmark's loss agrees with the fp32 reference;
- ``gpu_check.py``: the one GPU call, every section in ``--smoke-cpu`` mode, and its budget logic
  (a section that does not fit is skipped with the reason, a failing one does not stop the rest).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    """``benchmarks/<name>.py`` as a module (the directory is not a package)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def table(out: str, header_first: str) -> list[dict]:
    """The rows of every markdown table in ``out`` whose header starts with ``| header_first |``."""
    rows, keys = [], None
    for line in out.splitlines():
        if line.startswith(f"| {header_first} |"):
            keys = [c.strip() for c in line.strip().strip("|").split("|")]
        elif keys and line.startswith("|") and not line.startswith("|---"):
            rows.append(dict(zip(keys, (c.strip() for c in line.strip().strip("|").split("|")))))
        elif not line.startswith("|"):
            keys = None
    return rows


# ----------------------------------------------------------------------------- opcount


def test_opcount_counts_ops_and_syncs_forward_and_backward():
    opcount = load("opcount")
    x = torch.randn(4, 3, requires_grad=True)

    def call():
        y = (x * 2).sum()
        float(y.detach())  # reads a value: a sync
        x.detach()[x.detach() > 0]  # boolean-mask index: data-dependent size
        return y

    fwd, bwd = opcount.count_forward_backward(call)
    assert fwd.syncs == 2 and bwd.syncs == 0, (fwd.names, bwd.names)
    assert fwd.names[:2] == ["mul", "sum"] and "SYNC:_local_scalar_dense" in fwd.names
    assert any(n == "SYNC:index" for n in fwd.names), fwd.names
    assert bwd.ops >= 2 and fwd.ops == len(fwd.names)


def test_opcount_regions_and_opaque_calls():
    opcount = load("opcount")
    x = torch.randn(5)
    with opcount.OpCounter() as counter:
        x + 1
        with counter.region("inner"):
            x * 2
            x.exp()
        with counter.opaque("kernel"):
            x.sin().cos()  # not recorded
        x.view(5, 1).unsqueeze(0)  # views: no kernel
    assert counter.counts.names == ["add", "mul", "exp", "<kernel>", "view", "unsqueeze"]
    assert counter.counts.in_region["inner"] == 2
    assert counter.counts.launches == 4


# ----------------------------------------------------------------------------- the loss benchmark


def test_loss_benchmark_smoke_parity_and_syncs(tmp_path):
    bench_loss = load("bench_loss")
    stem = tmp_path / "loss"
    assert bench_loss.main(["--shapes", "8x16", "--rounds", "2", "--warmup", "0", "--out", str(stem)]) == 0
    result = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".md").exists() and "machine" in result["meta"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == set(bench_loss.TRL_VARIANTS) | set(bench_loss.OURS_VARIANTS)
    for preset, p in result["parity"]["(8, 16)"].items():  # the timed TRL code computes our presets' loss
        assert p["loss_rel_diff"] < 1e-5 and p["grad_max_diff_rel_to_max"] < 1e-5, (preset, p)
    for name, r in rows.items():
        assert r["bwd_syncs"] == 0, (name, r["bwd_histogram"])
        assert r["median_ms"] > 0 and 0 < r["fwd_launches"] < r["fwd_ops"]
    assert rows[bench_loss.TRL_DEFAULT]["fwd_syncs"] >= 3  # TRL reads its metrics with .item()
    for name in bench_loss.OURS_VARIANTS:
        deferred = rows[name]["fwd_syncs_checks_deferred"]
        if "completion_ids" in name:
            assert deferred >= 1  # torch.unique finds the classes inside the call
        else:
            assert deferred == 0, (name, rows[name]["fwd_sync_ops"])
            assert rows[name]["fwd_sync_ops"] == ["SYNC:_local_scalar_dense"]  # the eager value check only
        assert 0 < rows[name]["fwd_ops_in_compiled_region"] < rows[name]["fwd_ops"]


# ----------------------------------------------------------------------------- GPU benchmarks on CPU


def test_kernel_benchmark_smoke(capsys):
    """benchmarks/bench_kernels.py runs every entry on tiny CPU shapes (interpreter), and every
    entry that computes the benchmark's loss (ours, TRL's head, Liger's when installed) agrees
    with the fp32 reference under every condition (the anchor's beta and temperature included):
    the GPU run compares the same math and its argument orders are right."""
    bench_kernels = load("bench_kernels")
    assert bench_kernels.main(["--smoke-cpu", "--no-compile"]) == 0
    out = capsys.readouterr().out
    rows = table(out, "shape")
    checked = [r for r in rows if r.get("loss err", "-") != "-"]
    names = [r["entry"] for r in checked]
    for want in ("ours logits_surrogate_loss", "ours linear_surrogate_loss", "TRL 1.16 ChunkedLogProbFunction"):
        assert any(want in n for n in names), names
    anchor = [r for r in checked if r["condition"].startswith("anchor")]
    assert {r["entry"].split(" (")[0] for r in anchor} >= {"TRL-style eager", "ours logits_surrogate_loss"}
    if importlib.util.find_spec("liger_kernel") is not None:
        # logits path: 4 conditions; logits-free: materialised + fused
        assert sum("Liger" in n for n in names) == len(bench_kernels.LOGITS_CONDITIONS) + 2, names
    assert all(r["status"] == "ok" for r in checked), checked
    sweep = [r for r in rows if r["entry"].startswith(("fwd", "bwd"))]
    assert sum("Liger" in r["entry"] for r in sweep) == 4 and all(r["status"] == "ok" for r in sweep), sweep


def test_train_step_benchmark_smoke(capsys):
    """The GPU training-step benchmark runs end to end on tiny CPU shapes (no numbers are recorded)."""
    assert load("bench_train_step").main(["--smoke-cpu"]) == 0
    out = capsys.readouterr().out
    assert "TRL default" in out and "grpo-fix" in out


def test_gpu_check_smoke_cpu_runs_every_section(tmp_path):
    gpu_check = load("gpu_check")
    assert gpu_check.main(["--smoke-cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check_cpu-smoke.json").read_text())
    status = {s["name"]: s["status"] for s in result["sections"]}
    assert list(status) == [s.name for s in gpu_check.SECTIONS]
    assert status.pop("cuda_tests") == "skipped"  # needs CUDA
    assert set(status.values()) == {"ok"}, status
    sections = {s["name"]: s for s in result["sections"]}
    checks = sections["correctness"]["rows"]
    assert all(r["ok"] for r in checks) and any("zero advantage" in r["check"] for r in checks)
    assert {r["tensors"] for r in sections["optimizer"]["rows"]} == {200, 1}
    assert any("anchor" in (r["condition"] or "") for r in sections["logits"]["rows"])
    assert (tmp_path / "gpu_check_cpu-smoke.md").read_text().startswith("# GPU check on cpu-smoke")


def test_gpu_check_budget_skips_and_isolates_failures(tmp_path, monkeypatch):
    gpu_check = load("gpu_check")

    def boom(ctx):
        raise RuntimeError("broken section")

    sections = (
        gpu_check.Section("first", 1, boom),
        gpu_check.Section("second", 1, lambda ctx: dict(rows=[dict(a=1)])),
        gpu_check.Section("huge", 10_000, lambda ctx: dict(rows=[])),
    )
    monkeypatch.setattr(gpu_check, "SECTIONS", sections)
    assert gpu_check.main(["--smoke-cpu", "--out", str(tmp_path)]) == 1  # an error is reported
    by_name = {s["name"]: s for s in json.loads((tmp_path / "gpu_check_cpu-smoke.json").read_text())["sections"]}
    assert by_name["first"]["status"] == "error" and "broken section" in by_name["first"]["error"]
    assert by_name["second"]["status"] == "ok" and by_name["second"]["rows"] == [dict(a=1)]
    assert by_name["huge"]["status"] == "ok"  # smoke runs ignore the GPU estimates

    monkeypatch.setattr(gpu_check, "SECTIONS", sections[1:])
    assert gpu_check.main(["--smoke-cpu", "--budget", "5", "--out", str(tmp_path)]) == 0
    by_name = {s["name"]: s for s in json.loads((tmp_path / "gpu_check_cpu-smoke.json").read_text())["sections"]}
    assert by_name["second"]["status"] == "skipped" and "s left" in by_name["second"]["reason"]


def test_runner_records_entries_past_the_deadline_as_skipped():
    bench_kernels = load("bench_kernels")
    run = bench_kernels.Runner([], torch.device("cpu"), 1, 0, deadline=0.0)
    row = run.entry("logits", "s", "never built", lambda: pytest.fail("built past the deadline"))
    assert row["status"].startswith("skipped")
