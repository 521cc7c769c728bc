"""The README's Python examples run as written, and .ci/run calls the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_blocks_execute():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


def test_ci_runs_the_readme_test_command():
    install_and_test = re.search(r"## Install and test.*?```bash\n(.*?)\n```", README, flags=re.S).group(1).strip()
    assert "pytest" in install_and_test
    assert install_and_test in (ROOT / ".ci" / "run").read_text()


def test_ci_runs_the_static_checks():
    ci = (ROOT / ".ci" / "run").read_text()
    for check in ("ruff check .", "ruff format --check .", ".ci/typecheck.py"):
        assert check in ci, f".ci/run does not run {check}"
