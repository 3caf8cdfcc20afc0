"""Train the small byte-level BPE tokenizer shipped in tests/assets/tokenizer/ on the test corpus.

It is shaped like Llama 3's tokenizer at a toy size: byte-level BPE, `<|begin_of_text|>` / `<|end_of_text|>` special
tokens, and a post-processor that prepends BOS (so trainer.data.tokenizer has to control BOS itself, as with the
real one). tokenizer_config.json lets transformers' AutoTokenizer load the folder for reference tests.

    python scripts/train_tokenizer.py              # reads tests/assets/c4_test/train.jsonl
"""

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO = Path(__file__).resolve().parents[1]
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def read_texts(path: Path) -> list[str]:
    """The "text" field of every record of a jsonl file."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def train(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with the two special tokens at ids 0 and 1; vocab_size counts them."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        # All 256 bytes up front, so no input can ever hit an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=REPO / "tests/assets/c4_test/train.jsonl")
    parser.add_argument("--out", type=Path, default=REPO / "tests/assets/tokenizer")
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args()

    tokenizer = train(read_texts(args.corpus), args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
    }
    (args.out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    print(f"vocab_size={tokenizer.get_vocab_size()} -> {args.out}")


if __name__ == "__main__":
    main()
