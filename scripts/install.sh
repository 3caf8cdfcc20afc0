#!/usr/bin/env bash
# Install the trainer, its test dependencies and torchao (float8 training) without replacing a working torch.
#  - torch >= 2.11 already importable (e.g. your CUDA build): kept as is.
#  - otherwise, with an NVIDIA GPU: the newest torch from the index (CUDA build).
#  - otherwise: torch==2.13.0, the CPU wheel on our machines (elsewhere add
#    PIP_INDEX_URL=https://download.pytorch.org/whl/cpu to get the small CPU build).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if "$PYTHON" -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 11))' 2>/dev/null; then
  echo "keeping torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$PYTHON" -m pip install "torch>=2.11"
else
  "$PYTHON" -m pip install "torch==2.13.0"
fi
# torchao (the float8 extra) has no torch requirement: it cannot replace the torch chosen above.
"$PYTHON" -m pip install -e "$ROOT[test,bench,float8]"
