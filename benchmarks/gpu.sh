#!/usr/bin/env bash
# The GPU check, one command on a machine with a CUDA GPU and torch/torchvision/numpy/pandas/pillow/tqdm already
# installed (it installs nothing). Prints one table; takes about two minutes on an H100.
#   bash benchmarks/gpu.sh            # resnet18 at 224, batch 256
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# 8,704 generated JPEGs = 34 batches of 256: 2 warm-up + 30 timed steps on every path, plus a full epoch
timeout 330 "$PY" benchmarks/train.py --device cuda --images 8704 --batch-size 256 --steps 30 --warmup 2 \
  --workers "$(nproc)"
