#!/usr/bin/env bash
# The GPU session in one call (H100 / H200, no network; `python` has CUDA torch and the repo's deps):
#   (a) the tests that skip without CUDA, (b) bf16 decode at the real GLM-4-9B / Persimmon-8B / xglm-564M
#   shapes on random weights, batch 1 and 8: reference generate, reference static cache + torch.compile
#   (CUDA graphs), glmkit default / static / compiled (CUDA graphs), tok/s and share of the roofline at the
#   read bandwidth measured in the same process. One family per process (a 9B model in bf16 is ~18 GB;
#   the reference and glmkit share its tensors); every step has a hard timeout and the whole script a
#   deadline (GPU_BUDGET_S, default 450 s), so it ends in under 8 minutes. Output goes to the terminal and
#   to $OUT/gpu-bench-<time>.log ($OUT unset: /tmp).
#
#   bash benchmarks/gpu.sh              # on the GPU machine
#   bash benchmarks/gpu.sh --dry-run    # (or GLMKIT_GPU_DRY=1) the same steps on CPU at tiny shapes, < 1 min
set -u -o pipefail
cd "$(dirname "$0")/.."

DRY=${GLMKIT_GPU_DRY:-0}
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python}
LOG="${OUT:-/tmp}/gpu-bench-$(date -u +%Y%m%dT%H%M%SZ).log"
mkdir -p "$(dirname "$LOG")"
exec > >(tee -a "$LOG") 2>&1

BUDGET=${GPU_BUDGET_S:-450}
START=$(date +%s)
FAILED=0

# step SECONDS NAME CMD...: run CMD with at most SECONDS (fewer if the deadline is nearer): SIGINT first
# (the benchmark then prints what it has measured), SIGKILL 10 s later.
step() {
  local limit=$1 name=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START) - 12))
  ((left < limit)) && limit=$left
  if ((limit < 15)); then
    echo "=== $name: skipped, the deadline is near"
    return 124
  fi
  echo "=== $name ($(date -u +%T), at most ${limit} s): $*"
  timeout --signal=INT --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $(($(date +%s) - START)) s in all"
  return $rc
}

if ((DRY)); then
  echo "# DRY RUN on CPU, tiny shapes (figures mean nothing): every step of the GPU script"
  DEVICE=(--device cpu --tiny --compile-backend eager --threads 2)
  NEW=(--new 16 --prompt 16 --repeats 1)
  T_TEST=60 T_BIG=30 T_SMALL=30
else
  DEVICE=(--device cuda --dtype bf16)
  NEW=(--new 64 --prompt 128 --repeats 2)
  T_TEST=90 T_BIG=140 T_SMALL=60
fi

step 20 "environment" "$PY" -c "import torch, transformers, glmkit; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', '| transformers', \
transformers.__version__, '| glmkit', glmkit.__version__)" || FAILED=1
if command -v nvidia-smi >/dev/null; then
  step 15 "nvidia-smi" nvidia-smi --query-gpu=name,memory.total,clocks.max.mem --format=csv
fi

# (a) every test whose name says cuda / gpu (they skip without CUDA; on CPU this checks they are collected),
# less this script's own dry-run test (GLMKIT_GPU_SCRIPT makes it skip too: no recursion)
export GLMKIT_GPU_SCRIPT=1
step "$T_TEST" "CUDA tests" "$PY" -m pytest -q -p no:cacheprovider -m "slow or not slow" \
  -k "(cuda or gpu) and not dry_run" -rs tests/
rc=$?
((rc != 0 && rc != 5)) && FAILED=1 # 5: no test selected

# (b) decode, one (family, batches) per process, most wanted first: batch 1 of the 9B-class models, xglm-564M,
# then batch 8 of the big ones with whatever time is left (each process builds its model and compiles anew)
decode() {
  local limit=$1 family=$2
  shift 2
  step "$limit" "decode $family batch $*" "$PY" -m glmkit.bench --family "$family" --batch "$@" --compile \
    --ref-compile "${DEVICE[@]}" "${NEW[@]}" --json "${LOG%.log}-$family-b${1}.json" || FAILED=1
}
decode "$T_BIG" glm 1
decode "$T_BIG" persimmon 1
decode "$T_SMALL" xglm 1 8
decode "$T_BIG" glm 8
decode "$T_BIG" persimmon 8

echo "# done in $(($(date +%s) - START)) s; log: $LOG"
exit $FAILED
