#!/usr/bin/env bash
# Run on a machine with PyPI access, right before a GPU run: fills .whl/ with what the GPU
# machine's image lacks (it has torch, triton, accelerate, pandas, pyarrow, xxhash, pytest, but not
# trl, datasets or liger-kernel) plus a wheel of grpo-fix built from the current tree.  .whl/ is
# git-ignored through .git/info/exclude and travels to the GPU machine next to the tree (at most
# 64 MiB together: the script prints the size); benchmarks/gpu_session.sh installs it into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf .whl && mkdir .whl
# the project's venv when there is one (it has setuptools for building the grpo-fix wheel)
py=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && py=.venv/bin/python
# the device's python3 is CPython 3.12 on x86-64 (pure-python wheels for most; regex/tokenizers are binary)
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  trl==1.16.0 datasets==5.2.0 transformers==5.24.0 tokenizers==0.23.3 liger-kernel==0.8.5 \
  dill==0.4.1 multiprocess==0.70.19 regex==2026.11.19
rm -rf build  # setuptools would pack stale files left in build/
"$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl .
ls -1 .whl && du -sh .whl
size=$(( $(du -sk .whl | cut -f1) + $(git ls-files -z | xargs -0 du -skc 2>/dev/null | tail -1 | cut -f1) ))
echo "the tree's tracked files + .whl/: $((size / 1024)) MiB (at most 64 MiB travel)"
[ "$size" -le $((64 * 1024)) ] || { echo "too large to travel" >&2; exit 1; }
