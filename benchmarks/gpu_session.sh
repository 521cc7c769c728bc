#!/usr/bin/env bash
# Everything a GPU session measures, in device calls of < 10 min each.  On the device machine,
# from the repo root, after benchmarks/gpu_wheels.sh ran here and with carry=[".whl"]:
#
#   bash benchmarks/gpu_session.sh check     # versions, sm_90 static report, CUDA numerics tests  (~4 min: compiles the math)
#   bash benchmarks/gpu_session.sh logits    # bench_kernels: logits path + launch sweep            (~5 min)
#   bash benchmarks/gpu_session.sh linear    # bench_kernels: logits-free path                      (~3 min)
#   bash benchmarks/gpu_session.sh steps     # bench_optimizer + bench_train_step                   (~5 min)
#
# Each call leaves one file, $OUT/<stage>.tar.gz (the device returns at most 8 files): the logs
# and every result file the stage wrote under benchmarks/results/.  Unpack it here with
# `tar xzf <files_at>/<stage>.tar.gz -C benchmarks/results --strip-components=1 --wildcards 'results/*.json' 'results/*.md'`
# and commit those with the device named (the file names and headers carry it).
set -uo pipefail
stage=${1:?usage: gpu_session.sh check|logits|linear|steps}
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no .whl/ (run benchmarks/gpu_wheels.sh here first); grpo_fix must be importable some other way" >&2
fi
work=$(mktemp -d)
mkdir -p "$work/results"
touch "$work/start"
sleep 1

step() {  # step NAME SECONDS CMD...: run with a time limit, log to results/NAME.log, never abort the stage
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > >(tee "$work/results/$name.log") 2>&1
  echo "== $name rc=$?" | tee -a "$work/results/$name.log"
}

case $stage in
  check)
    step env 60 bash -c 'nvidia-smi; python3 -c "import torch, triton, grpo_fix; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), grpo_fix.__file__)"; python3 -m pip list 2>/dev/null | grep -i -E "^(torch|triton|transformers|trl|liger|datasets|accelerate|tokenizers) "'
    step static 100 python3 benchmarks/kernel_static_report.py --check
    step cuda_tests 420 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_clip_aware_adamw.py -k "gpu or cuda"
    ;;
  logits) step bench_logits 420 python3 benchmarks/bench_kernels.py --only logits
          step bench_sweep 150 python3 benchmarks/bench_kernels.py --only sweep ;;
  linear) step bench_linear 540 python3 benchmarks/bench_kernels.py --only linear ;;
  steps)  gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
          step bench_optimizer 200 python3 benchmarks/bench_optimizer.py --out "benchmarks/results/optimizer_$gpu"
          step bench_train_step 340 python3 benchmarks/bench_train_step.py ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
find benchmarks/results -maxdepth 1 -type f -newer "$work/start" -exec cp {} "$work/results/" \;
tar czf "$OUT/$stage.tar.gz" -C "$work" results
ls -la "$work/results"
