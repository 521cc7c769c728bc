"""The ``grpo-fix`` command: every subcommand answers ``--help`` with exit 0, ``bench`` says what it needs,
and the demo falls back to a table when matplotlib is missing (the installed wheel is tested in
test_packaging.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from grpo_fix import cli
from grpo_fix.lab import demo

HELP_COMMANDS = [
    ["--help"],
    ["demo", "--help"],
    ["experiment", "--help"],
    ["bench", "--help"],
    *[["experiment", name, "--help"] for name in cli.EXPERIMENTS],
]


@pytest.mark.parametrize("argv", HELP_COMMANDS, ids=" ".join)
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: grpo-fix")
    if argv[0] == "experiment" and len(argv) == 3:  # the experiment's own options, not the dispatcher's
        assert f"grpo-fix experiment {argv[1]}" in out and "--out" in out


def test_unknown_experiment_and_missing_command_are_usage_errors(capsys):
    for argv in (["experiment", "no-such-thing"], ["experiment"], []):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
    assert "prefix-bias" in capsys.readouterr().err


def test_bench_finds_this_checkout_and_names_the_sdist_elsewhere(tmp_path, capsys):
    assert cli.benchmarks_dir(None) == Path(__file__).resolve().parents[1] / "benchmarks"
    assert cli.benchmarks_dir(str(tmp_path)) is None
    assert cli.main(["bench", "--source", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "pip download --no-deps --no-binary :all:" in out and "pip install -e" in out
    assert f"grpo_fix-{cli.__version__}[bench,trl,triton]" in out


def test_bench_without_a_gpu_says_so_and_exits_0(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench"]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_demo_without_matplotlib_writes_the_table_and_says_why_there_is_no_plot(monkeypatch, tmp_path, capsys):
    """The reporting branch only (training is covered by test_experiments and the wheel test): the runs are
    replaced by fixed histories, matplotlib is reported missing."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a)
    )

    def run_one(name, overrides, **kwargs):
        history = [{"step": s, "reward": 0.1 * s, "loss": 0.0} for s in range(1, 5)]
        return {"name": name, "config": overrides, "summary": {"reward (last 25%)": 0.4}, "history": history}

    monkeypatch.setattr(demo, "run_one", run_one)
    result = demo.main(["--steps", "4", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "matplotlib is not installed: table only" in out
    assert set(result["paths"]) == {"json", "md"} and not (tmp_path / "demo.png").exists()
    assert "| TRL default (dapo + AdamW) |" in (tmp_path / "demo.md").read_text()


def test_demo_names_the_extra_when_trl_is_missing(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else find_spec(name, *a))
    with pytest.raises(SystemExit, match=r'needs trl: pip install "grpo-fix\[trl\]"'):
        demo.main(["--steps", "1"])
