"""Text sources by name, and the checkpointable datasets that cut them into training windows for one dp rank.

Every rank keeps its share of one global stream of windows (the sharding rule, trainer/data/windows.py). A text
source is tokenized on the fly, so every rank tokenizes the whole stream to find its windows: a cost that grows
with the dp degree. A prepared folder ("tokens", trainer/data/prepared.py) addresses a rank's windows directly.
"""

import re
from collections.abc import Iterator
from pathlib import Path

import datasets
import torch
from datasets.distributed import split_dataset_by_node

from trainer.data.prepared import PreparedDataset
from trainer.data.tokenizer import Tokenizer
from trainer.data.windows import WindowStream

C4_TEST_PATH = Path(__file__).resolve().parents[2] / "tests/assets/c4_test"
# Dataset name -> datasets' builder for local files.
LOCAL_BUILDERS = {"text": "text", "json": "json", "jsonl": "json", "parquet": "parquet"}
SUFFIX_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
DATASET_NAMES = ("c4_test", "c4", "synthetic", *LOCAL_BUILDERS, "tokens")
# Documents tokenized per encode_batch call; it bounds the token buffer kept in a checkpoint.
DOCS_PER_BATCH = 32


def _builder_of(file: Path) -> str | None:
    return SUFFIX_BUILDERS.get(Path(file.name.removesuffix(".gz")).suffix)


def _local_files(path: Path, split: str, builder: str | None) -> tuple[str, list[str]]:
    """The builder and data files for a file or folder; in a folder, files named after the split (train.jsonl,
    c4-validation.00000-of-00008.json.gz) are that split's, and a folder without such names is all train."""
    if not path.exists():
        raise FileNotFoundError(f"dataset_path {path} does not exist; point training.dataset_path at a file or folder")
    if path.is_file():
        builder = builder or _builder_of(path)
        if builder is None:
            raise ValueError(f"cannot tell the format of {path} from its extension; "
                             f"set training.dataset to one of {', '.join(LOCAL_BUILDERS)}")
        return builder, [str(path)]
    formats = {builder} if builder else set(SUFFIX_BUILDERS.values())
    files = sorted(f for f in path.rglob("*") if f.is_file() and _builder_of(f) in formats)
    named = [f for f in files if re.search(rf"(^|[-_.]){split}([-_.]|$)", f.name)]
    files = named or (files if split == "train" else [])
    builders = {_builder_of(f) for f in files}
    if len(builders) != 1:
        found = f"files of several formats {sorted(builders)}" if builders else \
            f"no {split} files ({', '.join(SUFFIX_BUILDERS)})"
        raise FileNotFoundError(f"dataset_path {path} has {found}; point it at a folder of one format")
    return builders.pop(), [str(f) for f in files]


def load_documents(name: str, dataset_path: str | None, split: str) -> datasets.Dataset | datasets.IterableDataset:
    """The documents of dataset `name` as a "text"-only HF dataset: map-style for local data, streaming for C4."""
    streaming = False
    if name == "c4_test":
        builder, files = _local_files(Path(dataset_path) if dataset_path else C4_TEST_PATH, split, "json")
    elif name == "c4":
        if dataset_path is None:
            docs = datasets.load_dataset("allenai/c4", name="en", split=split, streaming=True)
            return docs.select_columns(["text"])
        builder, files = _local_files(Path(dataset_path), split, None)
        streaming = True  # a local copy of C4 is as large as the hub one
    elif name in LOCAL_BUILDERS:
        if dataset_path is None:
            raise ValueError(f"dataset {name!r} reads local files; set training.dataset_path to a file or folder")
        builder, files = _local_files(Path(dataset_path), split, LOCAL_BUILDERS[name])
    else:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    docs = datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming).select_columns(["text"])
    if not streaming and len(docs) == 0:
        raise ValueError(f"dataset {name!r} at {files[0]} holds no documents")
    return docs


class PackedDataset(WindowStream):
    """Documents tokenized as BOS + text + EOS, concatenated and cut into windows of seq_len + 1 tokens.

    A map-style source is reshuffled every epoch with seed + epoch when `infinite`; a streaming source keeps its
    order. With `infinite=False` one pass is made (the tail shorter than a window is dropped) and the position then
    rewinds, so the next iteration is a fresh pass, as a validation loader needs.
    """

    def __init__(self, docs: datasets.Dataset | datasets.IterableDataset, tokenizer: Tokenizer, seq_len: int,
                 dp_rank: int, dp_degree: int, seed: int = 0, infinite: bool = True, batch_size: int = 1):
        super().__init__(seq_len, dp_rank, dp_degree, batch_size)
        self.docs, self.tokenizer, self.seed, self.infinite = docs, tokenizer, seed, infinite
        self._shuffle = infinite and isinstance(docs, datasets.Dataset)
        self._rewind()

    def _rewind(self) -> None:
        self._epoch, self._docs_consumed, self._tokens, self._offset = 0, 0, [], 0
        self._windows_seen = 0

    def _document_batches(self) -> Iterator[list[str]]:
        """Batches of texts from the current position on, epoch after epoch when infinite."""
        while True:
            docs = self.docs.shuffle(seed=self.seed + self._epoch) if self._shuffle else self.docs
            # Dataset.skip refuses to skip every row, which a state saved right at the end of an epoch asks for.
            at_end = isinstance(docs, datasets.Dataset) and self._docs_consumed == len(docs)
            for batch in [] if at_end else docs.skip(self._docs_consumed).iter(batch_size=DOCS_PER_BATCH):
                yield batch["text"]
            if not self.infinite:
                return
            self._epoch, self._docs_consumed = self._epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._find_worker()
        window_len = self.seq_len + 1
        batches = self._document_batches()
        while True:
            while len(self._tokens) - self._offset < window_len:
                texts = next(batches, None)
                if texts is None:  # end of a single pass
                    self._rewind()
                    return
                documents = [t for t in texts if t.strip()]  # the blank lines of a text file are no documents
                new_tokens = [t for ids in self.tokenizer.encode_batch(documents, bos=True, eos=True) for t in ids]
                # Position and buffer move together, so a state_dict taken at any yield is consistent.
                self._tokens = self._tokens[self._offset:] + new_tokens
                self._offset, self._docs_consumed = 0, self._docs_consumed + len(texts)
            start = self._offset
            self._offset += window_len
            if self._is_mine():
                yield self._sample(torch.tensor(self._tokens[start:start + window_len], dtype=torch.long))

    def state_dict(self) -> dict:
        """Position in the global stream: epoch, documents consumed in it, the token buffer left, windows seen."""
        return {**super().state_dict(), "epoch": self._epoch, "docs_consumed": self._docs_consumed,
                "tokens": self._tokens[self._offset:]}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a position saved by `state_dict`."""
        super().load_state_dict(state)
        self._epoch, self._docs_consumed = state["epoch"], state["docs_consumed"]
        self._tokens, self._offset = list(state["tokens"]), 0


class RankStreamDataset(PackedDataset):
    """A streaming source (C4 from the hub) split between the dp ranks by `datasets.distributed.split_dataset_by_node`
    (by files when the dp degree divides their number, else every dp-th document): a rank reads and tokenizes only
    its part, and resumes from the source's own `state_dict` instead of re-reading the stream from its start. In a
    loader with workers, `datasets` splits the rank's files between them in turn.

    The price of scale: a rank's windows come from its own documents, so the global batch of a step depends on the
    dp degree (layouts of different dp do not see the same data) and a saved position cannot be resharded."""

    def __init__(self, docs: datasets.IterableDataset, tokenizer: Tokenizer, seq_len: int, dp_rank: int,
                 dp_degree: int, seed: int = 0, infinite: bool = True, batch_size: int = 1):
        super().__init__(split_dataset_by_node(docs, rank=dp_rank, world_size=dp_degree), tokenizer, seq_len,
                         dp_rank, dp_degree, seed, infinite, batch_size)
        self._start = self.docs.state_dict()

    def _rewind(self) -> None:
        super()._rewind()
        self._docs_state = None

    def _is_mine(self) -> bool:
        self._windows_seen += 1
        return True  # every window of the rank's (and worker's) own documents

    def _document_batches(self) -> Iterator[list[str]]:
        while True:
            self.docs.load_state_dict(self._docs_state or self._start)
            for batch in self.docs.iter(batch_size=DOCS_PER_BATCH):
                # Taken as the batch is handed over: __iter__ adds its tokens to the buffer before it yields again.
                self._docs_state = self.docs.state_dict()
                yield batch["text"]
            if not self.infinite:
                return
            self._epoch, self._docs_state = self._epoch + 1, None

    def state_dict(self) -> dict:
        """The source's own position, the token buffer left and the windows seen."""
        return {**WindowStream.state_dict(self), "epoch": self._epoch, "docs_state": self._docs_state,
                "tokens": self._tokens[self._offset:]}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a position saved by `state_dict` (same dp degree and rank only)."""
        WindowStream.load_state_dict(self, state)
        self._epoch, self._docs_state = state["epoch"], state["docs_state"]
        self._tokens, self._offset = list(state["tokens"]), 0


class SyntheticDataset(WindowStream):
    """Endless uniform random token ids; window i comes from its own seed, so any rank jumps straight to its own."""

    def __init__(self, vocab_size: int, seq_len: int, dp_rank: int, dp_degree: int, seed: int = 0,
                 batch_size: int = 1):
        super().__init__(seq_len, dp_rank, dp_degree, batch_size)
        self.vocab_size, self.seed = vocab_size, seed
        self._generator = torch.Generator()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._find_worker()
        while True:
            index = self._windows_seen
            if self._is_mine():
                self._generator.manual_seed((self.seed << 32) + index)
                yield self._sample(torch.randint(self.vocab_size, (self.seq_len + 1,), generator=self._generator))


def build_dataset(name: str, dataset_path: str | None, tokenizer: Tokenizer | None, seq_len: int, dp_rank: int,
                  dp_degree: int, seed: int = 0, split: str = "train", infinite: bool = True,
                  vocab_size: int | None = None, batch_size: int = 1) -> WindowStream:
    """The dataset `name` for one dp rank. `synthetic` needs `vocab_size` and is endless whatever split/infinite say;
    the others need a tokenizer. `batch_size` is the loader's, by which worker processes share the rank's windows."""
    if name == "tokens":
        if dataset_path is None:
            raise ValueError("dataset 'tokens' reads a folder made by scripts/prepare_data.py; set dataset_path to it")
        if tokenizer is None:
            raise ValueError("dataset 'tokens' needs the tokenizer it was prepared with")
        return PreparedDataset(Path(dataset_path), split, tokenizer, seq_len, dp_rank, dp_degree, seed, infinite,
                               batch_size)
    if name == "synthetic":
        if vocab_size is None:
            raise ValueError("dataset 'synthetic' needs vocab_size (the model's) to draw token ids from")
        return SyntheticDataset(vocab_size, seq_len, dp_rank, dp_degree, seed, batch_size)
    docs = load_documents(name, dataset_path, split)
    if tokenizer is None:
        raise ValueError(f"dataset {name!r} needs a tokenizer")
    if name == "c4" and dataset_path is None:  # streamed from the hub: each rank reads only its part
        return RankStreamDataset(docs, tokenizer, seq_len, dp_rank, dp_degree, seed, infinite, batch_size)
    return PackedDataset(docs, tokenizer, seq_len, dp_rank, dp_degree, seed, infinite, batch_size)
