"""The Triton kernels compile for sm_90 (H100/H200) on this CPU machine, without spills and with
128-bit global memory access (benchmarks/kernel_static_report.py; no GPU needed).

The interpreter tests check the kernels' arithmetic; this checks what the interpreter cannot:
that the real compiler accepts them and produces vectorised, spill-free code for the benchmark
layouts, and that the check notices when rows lose their 16-byte alignment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_static_report.py"


def _nvidia_backend_tools() -> bool:
    try:
        import triton
    except ImportError:
        return False
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (bin_dir / "ptxas").exists() and (bin_dir / "cuobjdump").exists()


pytestmark = pytest.mark.skipif(
    not _nvidia_backend_tools(), reason="triton's NVIDIA backend (ptxas, cuobjdump) is not installed"
)


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_kernels_compile_for_sm90_vectorised_without_spills():
    r = _run()
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| logprob") or line.startswith("| adamw")]
    assert len(rows) == 11, r.stdout  # 7 log-prob variants, the AdamW step x 2 dtypes x with / without the flag
    assert all(line.rstrip().endswith("| ok |") for line in rows), r.stdout
    assert sum("HAS_OK=True" in line for line in rows) == 2, r.stdout  # the variant CUDA runs by default


def test_check_fails_when_rows_are_not_16_byte_aligned():
    """An odd vocabulary puts rows at odd element offsets: no 128-bit loads, and the check says so
    (the AdamW kernel is unaffected)."""
    r = _run("--vocab", "50257")
    assert r.returncode == 1
    assert "no 128-bit global load" in r.stdout
    adam = [line for line in r.stdout.splitlines() if line.startswith("| adamw")]
    assert adam and all(line.rstrip().endswith("| ok |") for line in adam)
