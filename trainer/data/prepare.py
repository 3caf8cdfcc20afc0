"""prepare: tokenize a dataset once, in parallel, into a prepared folder (layout in trainer/data/prepared.py).

A local source is tokenized by `datasets.Dataset.map(batched=True, num_proc=N)` with the run's tokenizer, into an
Arrow cache inside the output folder; its id column is then copied, in file order, into the flat token file, and
the cache removed. A streaming source (C4 from the hub) is tokenized batch by batch in this process, up to
`max_documents`. Documents are packed as the text reader packs them: blank ones dropped, BOS + text + EOS.
"""

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc

from trainer.data.datasets import load_documents
from trainer.data.prepared import FORMAT, MANIFEST
from trainer.data.tokenizer import Tokenizer

DOCS_PER_MAP_BATCH = 1000


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _tokenize(batch: dict, tokenizer: Tokenizer, dtype: str) -> dict:
    texts = [t for t in batch["text"] if t.strip()]  # as the text reader: a blank line is no document
    ids = tokenizer.encode_batch(texts, bos=True, eos=True)
    return {"ids": [np.asarray(x, dtype=dtype) for x in ids], "text_bytes": [len(t.encode("utf-8")) for t in texts]}


def _chunks(table) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(token ids, document lengths, text bytes) of a tokenized Arrow table, chunk by chunk, in row order."""
    for batch in table.to_batches(max_chunksize=64 * DOCS_PER_MAP_BATCH):
        ids = batch.column("ids")
        yield (ids.flatten().to_numpy(zero_copy_only=False), pc.list_value_length(ids).to_numpy(zero_copy_only=False),
               int(pc.sum(batch.column("text_bytes")).as_py() or 0))


def _tokenized(docs, tokenizer: Tokenizer, dtype: np.dtype, num_proc: int, cache: Path,
               max_documents: int | None) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    features = datasets.Features({"ids": datasets.List(datasets.Value(dtype.name)),
                                  "text_bytes": datasets.Value("int64")})
    kwargs = dict(batched=True, batch_size=DOCS_PER_MAP_BATCH, remove_columns=["text"], features=features,
                  fn_kwargs={"tokenizer": tokenizer, "dtype": dtype.name})
    if isinstance(docs, datasets.IterableDataset):  # streaming: one pass, in this process
        if max_documents is not None:
            docs = docs.take(max_documents)
        for batch in docs.map(_tokenize, **kwargs).with_format("arrow").iter(batch_size=DOCS_PER_MAP_BATCH):
            yield from _chunks(batch)
        return
    if max_documents is not None:
        docs = docs.select(range(min(max_documents, len(docs))))
    tokenized = docs.map(_tokenize, num_proc=num_proc if num_proc > 1 else None,
                         cache_file_name=str(cache / "tokenized.arrow"), **kwargs)
    yield from _chunks(tokenized.data.table)


def _write_split(docs, tokenizer: Tokenizer, dtype: np.dtype, out: Path, split: str, num_proc: int,
                 max_documents: int | None) -> dict:
    cache = out / f".cache-{split}"
    cache.mkdir(exist_ok=True)
    tokens_file, index_file = f"{split}.bin", f"{split}.idx.npy"
    lengths, total, text_bytes = [], 0, 0
    try:
        with open(out / f"{tokens_file}.partial", "wb") as f:
            for ids, doc_lengths, nbytes in _tokenized(docs, tokenizer, dtype, num_proc, cache, max_documents):
                f.write(ids.astype(dtype, copy=False).tobytes())
                lengths.append(doc_lengths.astype(np.int64))
                total += len(ids)
                text_bytes += nbytes
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths or [np.zeros(0, np.int64)]))]).astype(np.int64)
    assert offsets[-1] == total, (offsets[-1], total)
    np.save(out / index_file, offsets)
    os.replace(out / f"{tokens_file}.partial", out / tokens_file)
    return {"tokens": total, "documents": len(offsets) - 1, "text_bytes": text_bytes, "dtype": dtype.name,
            "tokens_file": tokens_file, "index_file": index_file}


def prepare(dataset: str, dataset_path: str | None, tokenizer_path: str | Path, out: str | Path,
            splits: tuple[str, ...] = ("train", "validation"), num_proc: int | None = None,
            max_documents: int | None = None, log=print) -> dict:
    """Tokenize `splits` of `dataset` (a name training.dataset accepts, with its dataset_path) into the folder `out`
    and return its manifest. A split other than train that the source lacks is skipped; `num_proc`: tokenizing
    processes (default: every core); `max_documents` per split (a streaming source needs it to end)."""
    out = Path(out)
    if (out / MANIFEST).exists():
        raise FileExistsError(f"{out} already holds a prepared dataset; remove it or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_path(tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size)
    num_proc = num_proc or os.cpu_count() or 1
    manifest = {"format": FORMAT,
                "tokenizer": {"fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size,
                              "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "path": str(tokenizer_path)},
                "source": {"dataset": dataset, "dataset_path": dataset_path, "max_documents": max_documents},
                "splits": {}}
    for split in splits:
        try:
            docs = load_documents(dataset, dataset_path, split)
        except FileNotFoundError:
            if split == "train":
                raise
            log(f"prepare: {dataset} has no {split} split; skipped")
            continue
        start = time.perf_counter()
        info = _write_split(docs, tokenizer, dtype, out, split, num_proc, max_documents)
        seconds = time.perf_counter() - start
        info["seconds"] = round(seconds, 3)
        manifest["splits"][split] = info
        log(f"prepare: {split}: {info['documents']:,} documents, {info['tokens']:,} tokens, "
            f"{info['text_bytes'] / 1e6:.1f} MB of text in {seconds:.1f} s "
            f"({info['text_bytes'] / 1e6 / max(seconds, 1e-9):.1f} MB/s, {num_proc} processes)")
    partial = out / f"{MANIFEST}.partial"
    partial.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, out / MANIFEST)  # last: the folder is complete once the manifest exists
    return manifest
