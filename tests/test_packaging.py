"""What ``pip install grpo-fix`` gets (the built wheel and sdist, not the editable install the other tests use).

- the wheel holds every package of the source tree, the console script, the verl plugin entry point, the
  LICENSE and the runnable examples;
- the sdist holds what the test suite reads (tests/, benchmarks/ scripts, .ci/, README, constraints.txt);
- slow: the wheel installed with ``[trl]`` into a fresh venv (no network: the test venv's packages are seen
  through a ``.pth``, matplotlib hidden) runs ``grpo-fix demo --steps 2`` (table-only fallback),
  ``grpo-fix experiment --help`` and ``grpo-fix bench`` from a temporary cwd; the unpacked sdist, installed
  editable, collects the whole suite and passes the tests that read the source tree (README, layout, CLI).

Everything builds offline (``--no-build-isolation``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = {
    "grpo_fix": ROOT / "grpo_fix",
    "grpo_fix/kernels": ROOT / "kernels",
    "grpo_fix/integration": ROOT / "integration",
}
# top-level entries of the test venv that a fresh `pip install "grpo-fix[trl]"` must not see
HIDDEN = ("grpo_fix", "__editable__", "matplotlib", "mpl_toolkits", "pylab")

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the tracked files")


def _source_modules() -> set[str]:
    out = set()
    for prefix, directory in SOURCE_ROOTS.items():
        for init in directory.rglob("__init__.py"):
            pkg_dir = init.parent
            rel = pkg_dir.relative_to(directory).as_posix()
            pkg = prefix if rel == "." else f"{prefix}/{rel}"
            out |= {f"{pkg}/{py.name}" for py in pkg_dir.glob("*.py")}
    return out


def _repo_files() -> list[str]:
    """The files a fresh clone has (tracked, or new and not ignored), that exist."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [f for f in listed if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory) -> Path:
    """A copy of the repository's files (setuptools would also pack stale files from ROOT/build)."""
    tree = tmp_path_factory.mktemp("tree") / "grpo-fix"
    for rel in _repo_files():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, tree / rel)
    return tree


def _build(tree: Path, kind: str, out: Path) -> Path:
    pytest.importorskip("setuptools", minversion="77")  # the build backend (built without isolation: offline)
    code = f"from setuptools import build_meta as b; print(b.build_{kind}({str(out)!r}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return out / r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def wheel(clean_tree, tmp_path_factory) -> Path:
    return _build(clean_tree, "wheel", tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def sdist(clean_tree, tmp_path_factory) -> Path:
    return _build(clean_tree, "sdist", tmp_path_factory.mktemp("sdist"))


def test_wheel_contains_every_source_module_the_cli_the_license_and_the_examples(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        metadata = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    missing = _source_modules() - names
    assert not missing, f"modules left out of the wheel (add their package to pyproject.toml): {sorted(missing)}"
    assert "grpo-fix = grpo_fix.cli:main" in entry_points
    # verl imports this group's modules on `import verl`: the "grpo_fix" policy loss registers itself
    assert "[verl.plugins]" in entry_points and "grpo_fix = grpo_fix.integration.verl" in entry_points
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    examples = {f"grpo_fix/integration/examples/{p.name}" for p in (ROOT / "integration" / "examples").iterdir()}
    assert examples - {e for e in examples if e.endswith(".pyc")} <= names


def test_sdist_carries_what_the_test_suite_reads(sdist):
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {"LICENSE", "README.md", "constraints.txt", "pyproject.toml", ".ci/run", ".ci/typecheck.py"}
    needed |= {f for f in _repo_files() if f.startswith(("tests/", "integration/examples/"))}
    needed |= {f for f in _repo_files() if f.startswith("benchmarks/") and f.endswith(".py") and f.count("/") == 1}
    assert not needed - names, f"missing from {top}: {sorted(needed - names)} (see MANIFEST.in)"
    assert not {n for n in names if "__pycache__" in n or n.startswith("benchmarks/trl_suite/upstream/")}


def _site_view(path: Path, hidden: tuple[str, ...]) -> Path:
    """A folder of links to the test venv's installed packages, less ``hidden`` (and grpo-fix itself)."""
    path.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(hidden) and not entry.name.endswith(".pth"):
            (path / entry.name).symlink_to(entry)
    return path


def _fresh_venv(where: Path, hidden: tuple[str, ...]) -> Path:
    """A venv without pip whose only extra packages are the test venv's (seen through a .pth, no download)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "test_stack.pth").write_text(str(_site_view(where.parent / f"{where.name}-site", hidden)) + "\n")
    return python


def _pip(python: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_wheel_installed_with_trl_extra_runs_the_demo_and_every_help(wheel, tmp_path):
    start = time.perf_counter()
    python = _fresh_venv(tmp_path / "venv", HIDDEN)
    _pip(python, f"{wheel}[trl]")
    bin_dir, cwd = python.parent, tmp_path / "elsewhere"
    cwd.mkdir()
    where = _run([str(python), "-c", "import grpo_fix; print(grpo_fix.__file__)"], cwd)
    assert where.stdout.startswith(str(tmp_path / "venv")), where.stdout + where.stderr
    demo = _run([str(bin_dir / "grpo-fix"), "demo", "--steps", "2", "--out", "out"], cwd)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "matplotlib is not installed: table only" in demo.stdout
    assert "| grpo-fix (uniform + prefix-consistent + ClipAwareAdamW) |" in (cwd / "out" / "demo.md").read_text()
    for args in (["--help"], ["demo", "--help"], ["experiment", "--help"], ["experiment", "overshoot", "--help"]):
        r = _run([str(bin_dir / "grpo-fix"), *args], cwd)
        assert r.returncode == 0 and r.stdout.startswith("usage: grpo-fix"), (args, r.stdout, r.stderr)
    bench = _run([str(bin_dir / "grpo-fix"), "bench"], cwd)
    assert bench.returncode == 0 and "pip download --no-deps --no-binary :all:" in bench.stdout, bench.stdout
    print(f"wheel install + demo --steps 2 + helps: {time.perf_counter() - start:.0f} s")


@pytest.mark.slow
def test_unpacked_sdist_installed_editable_collects_and_runs_the_suite(sdist, tmp_path):
    start = time.perf_counter()
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    tree = next(p for p in tmp_path.iterdir() if p.name.startswith("grpo_fix-"))
    python = _fresh_venv(tmp_path / "venv", ("grpo_fix", "__editable__"))
    _pip(python, "--no-deps", "--no-build-isolation", "-e", str(tree))
    pytest_cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    collect = _run([*pytest_cmd, "--collect-only"], tree)
    assert collect.returncode == 0 and " collected" in collect.stdout, collect.stdout[-3000:] + collect.stderr[-2000:]
    tests = ["tests/test_readme.py", "tests/test_cli.py", "tests/test_layout.py"]  # they read the source tree
    run = _run([*pytest_cmd, *tests], tree)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    print(f"sdist install + collect + {run.stdout.strip().splitlines()[-1]}: {time.perf_counter() - start:.0f} s")
