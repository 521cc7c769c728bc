"""The layout the README's Layout section describes, checked mechanically.

- The import graph of the library (every import statement, including the ones inside functions)
  has no cycle, and each room imports only the rooms below it: the kernels nothing above them, the
  loss and the optimizer only the kernels and the shared leaf modules, the lab only the public API.
- No library file is longer than 450 lines; ``GRPOFixTrainer._compute_loss`` is under 50 lines.
- Every library module imports (in one fresh interpreter).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> package name (pyproject's package-dir)
ROOMS = {
    ROOT / "grpo_fix": "grpo_fix",
    ROOT / "kernels": "grpo_fix.kernels",
    ROOT / "integration": "grpo_fix.integration",
}
LEAVES = {"grpo_fix.options", "grpo_fix.window", "grpo_fix.signal"}

#: module prefix -> the grpo_fix modules (prefixes) it may import
ALLOWED = {
    "grpo_fix.kernels": {"grpo_fix.kernels"},
    "grpo_fix.options": set(),
    "grpo_fix.window": {"grpo_fix.options"},
    "grpo_fix.signal": set(),
    "grpo_fix.loss": {"grpo_fix.loss", "grpo_fix.kernels"} | LEAVES,
    "grpo_fix.optim": {"grpo_fix.optim", "grpo_fix.kernels"} | LEAVES,
    "grpo_fix.health": LEAVES | {"grpo_fix.optim.finite"},
    "grpo_fix.lab": {"grpo_fix", "grpo_fix.lab", "grpo_fix.integration"},
    "grpo_fix.integration": {
        "grpo_fix",
        "grpo_fix.integration",
        "grpo_fix.loss",
        "grpo_fix.optim",
        "grpo_fix.kernels",
        "grpo_fix.health",
    }
    | LEAVES,
    "grpo_fix.cli": {"grpo_fix.lab"},
}


def library_modules() -> dict[str, Path]:
    """Module name -> file, for every library module (examples are scripts, not modules)."""
    out = {}
    for folder, package in ROOMS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            if "examples" in rel.parts or "__pycache__" in rel.parts:
                continue
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The grpo_fix modules ``name`` imports anywhere in its file (resolved, deepest known name)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t:
                found.add(t)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = library_modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def _room(name: str) -> str:
    return max((p for p in ALLOWED if name == p or name.startswith(p + ".")), key=len, default=name)


def test_each_room_imports_only_the_rooms_below_it():
    bad = []
    for name, deps in import_graph().items():
        room = _room(name)
        if room not in ALLOWED:
            continue
        allowed = ALLOWED[room] | {room}
        for dep in deps:
            if not any(dep == a or dep.startswith(a + ".") for a in allowed):
                bad.append(f"{name} imports {dep}")
    assert not bad, "imports across the layering:\n" + "\n".join(sorted(bad))


def test_no_import_cycle_including_lazy_imports():
    graph = import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep) :] + [dep]) if dep in path else f"{node} -> {dep}")
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_library_file_over_450_lines():
    long = {
        str(p.relative_to(ROOT)): n for p in library_modules().values() if (n := len(p.read_text().splitlines())) > 450
    }
    assert not long, f"files over 450 lines: {long}"


def test_trl_compute_loss_is_short():
    for path in (ROOT / "integration" / "trl").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name == "_compute_loss":
                length = node.end_lineno - node.lineno + 1
                assert length < 50, f"{path.name}: _compute_loss is {length} lines"
                return
    pytest.fail("GRPOFixTrainer._compute_loss not found")


def test_every_library_module_imports():
    optional = ("grpo_fix.integration.trl", "grpo_fix.integration.deepspeed", "grpo_fix.lab")
    names = sorted(n for n in library_modules() if not n.startswith(optional))
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({n!r})\n" for n in names) + "print('ok')\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
