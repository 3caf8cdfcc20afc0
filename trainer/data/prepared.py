"""Prepared data: a folder of token ids in flat files (np.memmap-able; made by trainer/data/prepare.py), and the
dataset that reads window g of the global stream directly, so a rank touches only its own windows.

A prepared folder, Megatron's and nanoGPT's layout:
  manifest.json      format, the tokenizer's fingerprint, the source, and per split its token and document counts,
                     dtype and files; written last, so a folder without it is an unfinished prepare
  <split>.bin        the ids of every document (BOS + text + EOS, as the text reader packs them), concatenated;
                     uint16 when the vocabulary fits, else uint32
  <split>.idx.npy    int64 offset of each document's first token in <split>.bin, then the total: the document
                     boundaries (read by nothing in training yet: EOS marks them in the stream)

Addressing: a split of T tokens holds n = T // (seq_len + 1) windows (the tail is dropped); global window g is in
epoch g // n, at the (g % n)-th place of that epoch's order, a permutation of the n windows drawn from (seed,
epoch) and evaluated at that one place (permutation.py: O(1) time and memory, nothing built per epoch). A
validation pass (infinite=False) reads the windows in file order once. The position is the number of global windows
passed (WindowStream's state), so a resume at any step, at any dp degree, costs O(1).
"""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from trainer.data.permutation import Permutation
from trainer.data.tokenizer import Tokenizer
from trainer.data.windows import WindowStream

MANIFEST = "manifest.json"
FORMAT = 1


def read_manifest(folder: Path) -> dict:
    """The manifest of a prepared folder; ValueError (one line) if it is missing or of another format."""
    file = Path(folder) / MANIFEST
    if not file.is_file():
        raise ValueError(f"{folder} is not a prepared dataset (no {MANIFEST}); make one with scripts/prepare_data.py")
    manifest = json.loads(file.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{file} has format {manifest.get('format')!r}, this trainer reads format {FORMAT}; "
                         f"prepare the data again with scripts/prepare_data.py")
    return manifest


def check_tokenizer(manifest: dict, tokenizer: Tokenizer, folder: Path) -> None:
    """ValueError unless `tokenizer` is the one the folder was prepared with (same ids for every text)."""
    prepared = manifest["tokenizer"]
    if prepared["fingerprint"] != tokenizer.fingerprint():
        raise ValueError(f"{folder} was prepared with another tokenizer ({prepared['path']}, {prepared['vocab_size']} "
                         f"tokens, sha256 {prepared['fingerprint'][:12]}) than model.hf_assets_path's ("
                         f"{tokenizer.vocab_size} tokens, sha256 {tokenizer.fingerprint()[:12]}); prepare it again "
                         f"with this tokenizer or point model.hf_assets_path at that one")


class PreparedDataset(WindowStream):
    """Windows of seq_len + 1 tokens of one split of a prepared folder, for one dp rank (and loader worker).

    `infinite`: epoch after epoch, each in its own order drawn from (seed, epoch); otherwise one pass in file order,
    after which the position rewinds (a validation loader)."""

    def __init__(self, folder: Path, split: str, tokenizer: Tokenizer, seq_len: int, dp_rank: int, dp_degree: int,
                 seed: int = 0, infinite: bool = True, batch_size: int = 1):
        super().__init__(seq_len, dp_rank, dp_degree, batch_size)
        manifest = read_manifest(folder)
        check_tokenizer(manifest, tokenizer, folder)
        if split not in manifest["splits"]:
            raise ValueError(f"{folder} has no prepared {split} split (it has {', '.join(manifest['splits'])}); "
                             f"prepare one with scripts/prepare_data.py --splits {split}")
        info = manifest["splits"][split]
        self.path, self.dtype = Path(folder) / info["tokens_file"], np.dtype(info["dtype"])
        self.num_windows = info["tokens"] // (seq_len + 1)
        if self.num_windows == 0:
            raise ValueError(f"{folder}: the {split} split has {info['tokens']} tokens, less than one window of "
                             f"seq_len + 1 = {seq_len + 1}")
        self.seed, self.infinite = seed, infinite
        self._file = None  # the token file, opened in the process that iterates
        self._order = Permutation(self.num_windows, seed, 0)  # the order of the epoch being read

    def __getstate__(self) -> dict:
        # A loader worker opens the file itself.
        return {**self.__dict__, "_file": None}

    def _window(self, index: int) -> int:
        """Which window of the split global window `index` is."""
        epoch, place = divmod(index, self.num_windows)
        if not self.infinite:
            return place
        if self._order.epoch != epoch:
            self._order = Permutation(self.num_windows, self.seed, epoch)
        return self._order(place)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._find_worker()
        if self._file is None:
            self._file = open(self.path, "rb", buffering=0)
        window_len = self.seq_len + 1
        nbytes = window_len * self.dtype.itemsize
        while True:
            index = self._next_mine(self._windows_seen)
            if not self.infinite and index >= self.num_windows:
                self._windows_seen = 0  # the next iteration is a fresh pass
                return
            # One pread a window rather than a slice of np.memmap: a memory map's fault-around maps ~350 KB of
            # cached file around every random 258-byte window into this process (measured, Linux), so a rank's RSS
            # would grow with the part of the corpus it has read; the page cache still shares the file.
            data = os.pread(self._file.fileno(), nbytes, self._window(index) * nbytes)
            window = torch.from_numpy(np.frombuffer(data, dtype=self.dtype).astype(np.int64))
            self._windows_seen = index + 1
            yield self._sample(window)
