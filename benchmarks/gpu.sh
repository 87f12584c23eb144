#!/usr/bin/env bash
# The GPU check: one command on a machine with a CUDA GPU and torch, torchvision, numpy, pandas, pillow, pyyaml,
# tqdm and pytest already installed (no dvc, no mlflow; it installs nothing and needs no network). About four
# minutes on an H100; every part has its own time limit, so one that hangs or fails does not hide the others.
#   bash benchmarks/gpu.sh                 # the whole check
#   PARTS="tests fit" bash benchmarks/gpu.sh   # some of: tests bench fit
# It prints, in order:
#   1. nvidia-smi and the versions of Python, torch and torchvision;
#   2. the CUDA-marked tests of the test files that need neither dvc nor mlflow;
#   3. benchmarks/train.py at batch 256, 224 px, amp auto (bf16), eager and under torch.compile side by side:
#      (a) baseline, (b) kennel engine, (c) model alone, b/a, b/c, peak GPU memory;
#   4. benchmarks/fit.py: a real kennel.training.train(...) on 8,000 generated 224 px scenes, 3 epochs, batch 256:
#      epoch times, img/s, accuracy, where the time goes, peak GPU memory;
#   5. nvidia-smi's memory and utilisation at the end, and the exit status of each part.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PARTS=${PARTS:-tests bench fit}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" KENNEL_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
status=()

part() {  # part NAME SECONDS COMMAND...: run with a time limit, say how long it took and how it ended
  local name=$1 limit=$2 start rc
  shift 2
  echo; echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  echo "=== $name: exit $rc after $(( $(date +%s) - start ))s$([ "$rc" = 124 ] && echo ' (time limit)')"
  status+=("$name=$rc")
}

echo "=== machine $(date -u +%FT%TZ)"
nvidia-smi || echo "nvidia-smi: not available"
"$PY" -c 'import sys, torch, torchvision; print("python", sys.version.split()[0], "| torch", torch.__version__,
  "| torchvision", torchvision.__version__, "| cuda", torch.version.cuda, "| available", torch.cuda.is_available(),
  "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'

if [[ " $PARTS " == *" tests "* ]]; then
  # Test files that import neither dvc nor mlflow (directly or through kennel's tracking side) and mark a test gpu.
  files=$(grep -l "mark.gpu" tests/test_*.py \
    | xargs grep -L -E "^\s*(import|from) (mlflow|dvc)|kennel\.(tracking|serving|cli|reproduce|stage)|make_project|\bdvc\(" || true)
  echo "CUDA-marked tests in:" ${files:-none}
  # shellcheck disable=SC2086
  [ -n "$files" ] && part "CUDA tests" 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rA $files
fi
if [[ " $PARTS " == *" bench "* ]]; then
  # 8,704 generated JPEGs = 34 batches of 256: 2 warm-up + 30 timed steps on every path, plus a full epoch
  part "benchmark eager + compiled" 240 "$PY" benchmarks/train.py --device cuda --images 8704 --batch-size 256 \
    --steps 30 --warmup 2 --workers "$(nproc)" --compile both
fi
if [[ " $PARTS " == *" fit "* ]]; then
  part "train() on generated scenes" 120 "$PY" benchmarks/fit.py --device cuda --per-class 4000 --size 224 \
    --batch-size 256 --epochs 3
fi

echo; echo "=== end $(date -u +%H:%M:%S): ${status[*]:-nothing run}"
nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv 2>/dev/null || true
