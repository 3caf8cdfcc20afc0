"""Generate a corpus of any size from the shipped one (tests/assets/c4_test): jsonl shards of the c4_test training
documents over and over, each numbered (so no two are equal), to test the data path at scale.

    python scripts/make_corpus.py --out /tmp/corpus --gb 1
    python scripts/prepare_data.py --dataset jsonl --dataset-path /tmp/corpus --out /tmp/corpus_tokens
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARD_BYTES = 256 * 1024 * 1024


def make_corpus(out: Path, nbytes: int, shard_bytes: int = SHARD_BYTES) -> int:
    """Write at least `nbytes` of text as out/train-NNNNN.jsonl shards; returns the bytes of text written."""
    out.mkdir(parents=True, exist_ok=True)
    lines = (ROOT / "tests/assets/c4_test/train.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    written, doc, shard = 0, 0, 0
    while written < nbytes:
        with open(out / f"train-{shard:05d}.jsonl", "w", encoding="utf-8") as f:
            in_shard = 0
            while in_shard < shard_bytes and written < nbytes:
                text = f"Document {doc}. {texts[doc % len(texts)]}"
                f.write(json.dumps({"text": text}) + "\n")
                size = len(text.encode("utf-8"))
                written, in_shard, doc = written + size, in_shard + size, doc + 1
        shard += 1
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--gb", type=float, default=1.0, help="text to write, in GB (10^9 bytes)")
    args = parser.parse_args(argv)
    print(f"wrote {make_corpus(args.out, int(args.gb * 1e9)) / 1e9:.2f} GB of text to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
