"""Tokenize a dataset once into a prepared folder that training reads with training.dataset = "tokens".

    python scripts/prepare_data.py --dataset c4_test --out /data/c4_test_tokens
    python scripts/prepare_data.py --dataset jsonl --dataset-path corpus/ --tokenizer ./assets/llama3 \
        --out /data/corpus_tokens --num-proc 32
    python scripts/prepare_data.py --dataset c4 --max-documents 1000000 --out /data/c4_1m   # streams from the hub

then train with training.dataset = "tokens", training.dataset_path = the --out folder (the same tokenizer in
model.hf_assets_path). The work is trainer/data/prepare.py's `prepare`, importable as well.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.data.datasets import LOCAL_BUILDERS  # noqa: E402
from trainer.data.prepare import prepare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="c4_test", choices=["c4_test", "c4", *LOCAL_BUILDERS],
                        help="source, as training.dataset names it")
    parser.add_argument("--dataset-path", default=None, help="local file or folder (training.dataset_path)")
    parser.add_argument("--tokenizer", default="./tests/assets/tokenizer",
                        help="folder with tokenizer.json (model.hf_assets_path of the runs that will read it)")
    parser.add_argument("--out", required=True, help="the prepared folder to create")
    parser.add_argument("--splits", default="train,validation",
                        help="comma-separated splits; one other than train that the source lacks is skipped")
    parser.add_argument("--num-proc", type=int, default=None, help="tokenizing processes (default: every core)")
    parser.add_argument("--max-documents", type=int, default=None, help="at most this many documents per split")
    args = parser.parse_args(argv)
    prepare(args.dataset, args.dataset_path, args.tokenizer, args.out, tuple(args.splits.split(",")),
            args.num_proc, args.max_documents)
    return 0


if __name__ == "__main__":
    sys.exit(main())
