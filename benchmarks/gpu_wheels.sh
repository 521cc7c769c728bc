#!/usr/bin/env bash
# Run HERE (a machine with PyPI access), right before a GPU session: fills .whl/ with what the
# device image lacks (see ../.library/device/KINDS.md: it has torch, triton, accelerate, pandas,
# pyarrow, xxhash, hypothesis, pytest, but not trl, datasets, liger-kernel) plus a wheel of
# grpo-fix built from the current tree.  .whl/ is git-ignored through .git/info/exclude and
# travels with `run(carry=[".whl"])`; benchmarks/gpu_session.sh installs it into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf .whl && mkdir .whl
# the device's python3 is CPython 3.12 on x86-64 (pure-python wheels for most; regex/tokenizers are binary)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  trl==1.16.0 datasets==5.2.0 transformers==5.24.0 tokenizers==0.23.3 liger-kernel==0.8.5 \
  dill==0.4.1 multiprocess==0.70.19 regex==2026.11.19
rm -rf build  # setuptools would pack stale files left in build/
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl .
ls -1 .whl && du -sh .whl
