#!/usr/bin/env bash
# Launch training on one node: one rank directly, more under torchrun (or check a config with DRY_RUN=1).
#   NGPU          ranks to start (default: visible CUDA devices, else 1)
#   CONFIG_FILE   TOML config (default: configs/debug_model.toml)
#   LOG_RANK      ranks that print, e.g. 0 or 0,4 (default 0)
#   COMM_BACKEND  nccl (default with CUDA), gloo (default without; trains on CPU), nvshmem (where available)
#   DRY_RUN=1     validate the config for NGPU ranks, print the plan, train nothing (no GPU needed); with --plan
#                 [--device h100|h200|a100|b200|mi300|cpu] [--gpus-per-node 8]: every valid layout, best first
# Extra arguments are config overrides: ./run_train.sh --training.steps 20 --optimizer.lr=1e-3
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

CONFIG_FILE="${CONFIG_FILE:-$ROOT/configs/debug_model.toml}"
if [[ ! -f "$CONFIG_FILE" && -f "$ROOT/$CONFIG_FILE" ]]; then CONFIG_FILE="$ROOT/$CONFIG_FILE"; fi
if [[ -z "${NGPU:-}" ]]; then
  # torch counts the devices, but importing it takes seconds: ask it only where a GPU driver is installed.
  if command -v nvidia-smi >/dev/null 2>&1 || command -v rocm-smi >/dev/null 2>&1 || [[ -e /dev/kfd ]]; then
    NGPU="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)' 2>/dev/null || echo 1)"
  else
    NGPU=1
  fi
fi
export NGPU LOG_RANK="${LOG_RANK:-0}"
[[ -n "${COMM_BACKEND:-}" ]] && export COMM_BACKEND

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  exec "$PYTHON" -m trainer.dry_run --job.config_file "$CONFIG_FILE" "$@"
fi
if [[ ! "$NGPU" =~ ^[0-9]+$ ]] || (( 10#$NGPU < 1 )); then
  echo "error: NGPU = '$NGPU': expected a positive number of ranks" >&2
  exit 2
fi
NGPU=$(( 10#$NGPU ))

# CUDA: the caching allocator grows segments instead of splitting fixed ones (fewer fragmentation OOMs).
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  export PYTORCH_ALLOC_CONF="${PYTORCH_ALLOC_CONF:-expandable_segments:True}"
fi
# Ranks share the host's cores; without this torchrun pins every rank to 1 thread.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  cores="$(nproc 2>/dev/null || echo 1)"
  export OMP_NUM_THREADS=$(( cores / NGPU > 0 ? cores / NGPU : 1 ))
fi
# The ranks check the config themselves (imports and model build paid once): a mistake is one line from rank 0 and
# exit 2. One rank runs without torchrun's agent, in the environment torchrun gives it (a process group of one; port
# 0: its store takes a free one). More ranks run under torchrun (trainer/launch.py: torchrun, minus its failure
# report after a config error).
# SIGTERM/SIGINT to this script (a scheduler stopping the job, kill, k8s) go to the ranks only: each finishes its
# step, saves and exits 0, and so do torchrun and this script. (torchrun signalled itself forwards the signal, gives
# the ranks --shutdown-timeout / TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds, 30 by default, then SIGKILLs them, and
# exits 1 whatever they did; a save cut short there is never marked complete.)
if (( NGPU == 1 )); then
  RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=0 \
    "$PYTHON" -u -m trainer.train --job.config_file "$CONFIG_FILE" "$@" &  # -u: unbuffered, as torchrun runs ranks
  agent=$!
  to_ranks() { kill "-$1" "$agent" 2>/dev/null || true; }
else
  "$PYTHON" -m trainer.launch --standalone --nnodes=1 --nproc-per-node="$NGPU" \
    -m trainer.train --job.config_file "$CONFIG_FILE" "$@" &
  agent=$!
  to_ranks() { pkill "-$1" -P "$agent" 2>/dev/null || kill "-$1" "$agent" 2>/dev/null || true; }
fi
trap 'to_ranks TERM' TERM
trap 'to_ranks INT' INT
code=0
while true; do
  wait "$agent" && code=0 || code=$?
  kill -0 "$agent" 2>/dev/null || break  # a trapped signal ends `wait` early: wait again until torchrun exits
done
exit "$code"
