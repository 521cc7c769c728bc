"""The built wheel (what ``pip install .`` or a package index installs, unlike the editable
install the tests run against) holds every package of the source tree, the console script and the verl plugin entry point."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = {
    "grpo_fix": ROOT / "grpo_fix",
    "grpo_fix/kernels": ROOT / "kernels",
    "grpo_fix/integration": ROOT / "integration",
}


def _source_modules() -> set[str]:
    out = set()
    for prefix, directory in SOURCE_ROOTS.items():
        for init in directory.rglob("__init__.py"):
            pkg_dir = init.parent
            rel = pkg_dir.relative_to(directory).as_posix()
            pkg = prefix if rel == "." else f"{prefix}/{rel}"
            out |= {f"{pkg}/{py.name}" for py in pkg_dir.glob("*.py")}
    return out


def test_wheel_contains_every_source_module_and_the_cli(tmp_path):
    pytest.importorskip("setuptools", minversion="68")  # the build backend (built without isolation: offline)
    src = tmp_path / "src"  # a clean copy: setuptools would also pack stale files from ROOT/build
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for directory in SOURCE_ROOTS.values():
        shutil.copytree(directory, src / directory.name, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = tmp_path.glob("grpo_fix-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    missing = _source_modules() - names
    assert not missing, f"modules left out of the wheel (add their package to pyproject.toml): {sorted(missing)}"
    assert "grpo-fix = grpo_fix.cli:main" in entry_points
    # verl imports this group's modules on `import verl`: the "grpo_fix" policy loss registers itself
    assert "[verl.plugins]" in entry_points and "grpo_fix = grpo_fix.integration.verl" in entry_points
