"""Copy TRL's GRPO trainer test file, its helpers and the zen dataset generators out of a TRL git repository.

Nothing of TRL's is committed here: the files land in ``upstream/`` (git-ignored), with ``SOURCE.json``
recording the commit they came from.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

# TRL 1.16.0 has no tag in the public repository snapshot this harness was built against (its newest release
# branch is v1.9-release); this is the newest commit of main there (2026-07-24, VERSION 1.10.0.dev0), the
# closest to the 1.16.0 wheel that the tests run against.
DEFAULT_COMMIT = "f2cd57710ae345ea6428ae95363267fcf38a3dc8"
TRL_URL = "https://github.com/huggingface/trl"
FILES = {
    "tests/__init__.py": "trl_tests/__init__.py",
    "tests/conftest.py": "trl_tests/conftest.py",
    "tests/testing_utils.py": "trl_tests/testing_utils.py",
    "tests/testing_constants.py": "trl_tests/testing_constants.py",
    "tests/test_grpo_trainer.py": "trl_tests/test_grpo_trainer.py",
    "scripts/generate_zen_dataset.py": "scripts/generate_zen_dataset.py",
    "scripts/generate_zen_image_dataset.py": "scripts/generate_zen_image_dataset.py",
    "scripts/generate_zen_multi_image_dataset.py": "scripts/generate_zen_multi_image_dataset.py",
}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def local_repo(source: str, work: Path) -> Path:
    """``source`` itself when it is a local git directory (bare or not), else a blobless bare clone of it."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    clone = work / "trl.git"
    if not clone.is_dir():
        subprocess.run(["git", "clone", "--bare", "--filter=blob:none", source, str(clone)], check=True)
    return clone


def fetch(source: str, commit: str, dest: Path, work: Path) -> dict[str, str]:
    """Write :data:`FILES` at ``commit`` of ``source`` under ``dest``; return what was fetched."""
    repo = local_repo(source, work)
    full = _git(repo, "rev-parse", f"{commit}^{{commit}}").strip()
    for src, rel in FILES.items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_git(repo, "show", f"{full}:{src}"))
    info = {
        "repository": TRL_URL,
        "commit": full,
        "commit_date": _git(repo, "show", "-s", "--format=%cI", full).strip(),
        "version_file": _git(repo, "show", f"{full}:VERSION").strip(),
    }
    (dest / "SOURCE.json").write_text(json.dumps(info, indent=1))
    return info
