"""Helpers shared by the tests that launch distributed workers in subprocesses (gloo, CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def free_port() -> int:
    """A free TCP port on the loopback interface, for MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    """The command prefix of a ``torchrun`` launch of ``nproc`` local workers.  ``--standalone``
    lets torchrun bind a free rendezvous port itself, which avoids the race between
    :func:`free_port` returning a port and torchrun binding it."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch_env(**extra) -> dict:
    """The environment of a launched worker: this process's, without the torch.distributed
    variables of an enclosing launch, with one CPU thread, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def ds_env(**extra) -> dict:
    """The environment of a DeepSpeed worker on CPU: gloo, one thread, no Triton interpreter."""
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", **extra)
    env.pop("TRITON_INTERPRET", None)
    return env


def single_process_env(**extra) -> dict:
    """``ds_env`` plus the torch.distributed variables of a one-process world."""
    return ds_env(MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", **extra)


def run_worker(cmd: list[str], env: dict, out: Path, cwd: Path, timeout: int = 240) -> None:
    """Run a worker command; fail the test with its output unless it exits 0 and wrote ``out``."""
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not Path(out).exists():
        pytest.fail(f"worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
