#!/usr/bin/env bash
# The GPU check in one command (scripts/gpu_check.py: throughput, MFU and memory of 1B/3B/8B-4L in bf16 and float8
# beside a plain loop, and the CUDA sanity checks), writing benchmarks/gpu.md and benchmarks/gpu.json.
# Installs nothing when the trainer's dependencies import already; otherwise runs scripts/install.sh first.
#   ./scripts/gpu_check.sh [--out DIR] [--budget-s S] [--only NAME ...] [--cpu-smoke]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if "$PYTHON" -c 'import torch, torchdata, torchao, tensorboard, tokenizers, datasets, safetensors, tomli_w' 2>/dev/null; then
  echo "gpu_check: dependencies present, nothing installed"
else
  "$ROOT/scripts/install.sh"
fi
cd "$ROOT"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" "$ROOT/scripts/gpu_check.py" "$@"
