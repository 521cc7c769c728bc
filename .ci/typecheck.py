#!/usr/bin/env python3
"""Run mypy on the library as it is installed: ``kernels/`` and ``integration/`` are the packages
``grpo_fix.kernels`` and ``grpo_fix.integration`` (pyproject's package-dir), which mypy cannot
see in the source layout.  The three folders are copied into one ``grpo_fix`` tree in a
temporary directory; reported paths are mapped back to the source files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = {
    "grpo_fix": ROOT / "grpo_fix",
    "grpo_fix/kernels": ROOT / "kernels",
    "grpo_fix/integration": ROOT / "integration",
}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        ignore = shutil.ignore_patterns("__pycache__", "examples")
        for dest, src in LAYOUT.items():
            shutil.copytree(src, Path(tmp) / dest, ignore=ignore, dirs_exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "-p", "grpo_fix"],
            cwd=tmp,
            capture_output=True,
            text=True,
        )
        out = proc.stdout + proc.stderr
        for dest, src in sorted(LAYOUT.items(), key=lambda kv: -len(kv[0])):
            out = out.replace(dest + "/", os.path.relpath(src, ROOT) + "/")
        print(out, end="")
        return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
