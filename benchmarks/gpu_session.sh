#!/usr/bin/env bash
# The one GPU call.  First, on a machine with PyPI access, from the repo root:
#
#   bash benchmarks/gpu_wheels.sh          # fills the git-ignored .whl/ (trl, liger-kernel, ... and grpo-fix)
#
# then on the GPU machine, from the repo root, with .whl/ carried along and a 600 s limit:
#
#   bash benchmarks/gpu_session.sh         # extra arguments go to gpu_check.py (e.g. --only logits,linear)
#
# It installs the wheels into /tmp/site (the image has torch and triton but not trl, datasets or
# liger-kernel) and runs benchmarks/gpu_check.py with a budget of $GPU_CHECK_BUDGET seconds (480),
# which writes $OUT/gpu_check_<device>.json and .md after every section; the log is
# $OUT/gpu_check.log.  Copy the .json and .md into benchmarks/results/ and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no .whl/ (run benchmarks/gpu_wheels.sh first); grpo_fix must be installed some other way" >&2
fi
python3 benchmarks/gpu_check.py --budget "${GPU_CHECK_BUDGET:-480}" --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
