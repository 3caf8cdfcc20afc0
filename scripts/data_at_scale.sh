#!/usr/bin/env bash
# Data at scale: generate GB gigabytes of text from the shipped corpus, prepare it, train 20 steps on it with NGPU
# ranks, do the same on the prepared c4_test (2.2 MB), and print each run's peak RSS per rank (the log line's
# memory on CPU): a rank maps the token file and touches only its windows, so the two should be equal.
#   GB=1 NGPU=2 WORK=/tmp/data_at_scale scripts/data_at_scale.sh     (WORK is removed at the end)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GB="${GB:-1}" NGPU="${NGPU:-2}" WORK="${WORK:-$(mktemp -d)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_DATASETS_CACHE="$WORK/hf_cache" NGPU LOG_RANK=0,1
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"

python scripts/make_corpus.py --out "$WORK/corpus" --gb "$GB"
/usr/bin/time -f "prepare: %e s, peak RSS of the parent process %M KiB" \
  python scripts/prepare_data.py --dataset jsonl --dataset-path "$WORK/corpus" --out "$WORK/big" --splits train \
  2>&1 | grep -v "examples/s"
rm -rf "$WORK/corpus" "$HF_DATASETS_CACHE"  # the disk the text and its Arrow copy took
python scripts/prepare_data.py --out "$WORK/small" --splits train 2>&1 | grep -v "examples/s"
du -sh "$WORK/big" "$WORK/small"

for data in small big; do
  ./run_train.sh --training.dataset tokens --training.dataset_path "$WORK/$data" --training.steps 20 \
    --metrics.log_freq 20 --metrics.enable_tensorboard false --job.dump_folder "$WORK/run_$data" 2>&1 \
    | grep -E "step: +20|error" | sed "s/^/$data: /"
done
