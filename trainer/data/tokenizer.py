"""Tokenizer: a HF `tokenizer.json` (Llama 3, Llama 2, SmolLM, the test asset) with BOS/EOS under our control."""

import hashlib
import json
from pathlib import Path

import tokenizers

# Special-token names of the model families we load, used when tokenizer_config.json does not name them.
BOS_NAMES = ("<|begin_of_text|>", "<s>")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<|im_end|>")


def _config_token(config: dict, key: str) -> str | None:
    # transformers writes either "<s>" or a serialized AddedToken {"content": "<s>", ...}.
    token = config.get(key)
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    """Wraps `tokenizers.Tokenizer`; `encode` adds BOS/EOS only when asked, never through the post-processor."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, bos_token: str | None, eos_token: str | None):
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._find_id(bos_token, BOS_NAMES)
        self.eos_id = self._find_id(eos_token, EOS_NAMES)
        if self.eos_id is None:
            raise ValueError(f"tokenizer has none of the known EOS tokens {EOS_NAMES}; "
                             "name its EOS as eos_token in tokenizer_config.json")

    @classmethod
    def from_path(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` from a folder (with tokenizer_config.json beside it, if any) or from the file."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {file}; run scripts/download_hf_assets.py "
                                    "or set model.hf_assets_path to a folder that has one")
        config_file = file.with_name("tokenizer_config.json")
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        bos, eos = _config_token(config, "bos_token"), _config_token(config, "eos_token")
        return cls(tokenizers.Tokenizer.from_file(str(file)), bos, eos)

    def _find_id(self, configured: str | None, known_names: tuple[str, ...]) -> int | None:
        candidates = (configured, *known_names) if configured else known_names
        for name in candidates:
            token_id = self._tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        prefix = [self.bos_id] if bos and self.bos_id is not None else []
        return prefix + ids + ([self.eos_id] if eos else [])

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS first (if the tokenizer has one) and EOS last when asked."""
        return self._wrap(self._tokenizer.encode(text, add_special_tokens=False).ids, bos, eos)

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        """`encode` over many texts at once; the Rust side runs them in parallel."""
        encodings = self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [self._wrap(e.ids, bos, eos) for e in encodings]

    def fingerprint(self) -> str:
        """SHA-256 of the tokenizer's canonical JSON and its BOS/EOS ids: equal exactly when two tokenizers turn
        every text into the same ids (a prepared dataset records it, and refuses another tokenizer)."""
        text = f"{self._tokenizer.to_str()}|bos={self.bos_id}|eos={self.eos_id}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special tokens are kept so document boundaries stay visible."""
        return self._tokenizer.decode(ids, skip_special_tokens=False)
