"""Prepared data (scripts/prepare_data.py, training.dataset = "tokens"): the files hold the documents as the text
reader packs them, window g of the global stream is addressed directly at any dp degree, epochs reshuffle by seed,
and a folder of another tokenizer or format is refused in one line. Resume and resharding are in test_data.py."""

import json
import shutil

import numpy as np
import pytest
import torch

from tests.unit.test_bad_input import _assert_one_line, _run_in_process
from tests.unit.test_data import SEQ_LEN, TOKENIZER_PATH, loader, read_jsonl, take, windows_by_hand, write_local
from trainer.data.dataloader import build_dataloader
from trainer.data.datasets import C4_TEST_PATH, build_dataset
from trainer.data.prepare import prepare
from trainer.data.prepared import MANIFEST, PreparedDataset
from trainer.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_path(TOKENIZER_PATH)


def test_prepare_writes_the_packed_documents_and_their_boundaries(prepared_c4_test, tokenizer):
    manifest = json.loads((prepared_c4_test / MANIFEST).read_text())
    assert manifest["tokenizer"]["fingerprint"] == tokenizer.fingerprint()
    for split in ("train", "validation"):
        docs = [tokenizer.encode(t, bos=True, eos=True) for t in read_jsonl(C4_TEST_PATH / f"{split}.jsonl")]
        info = manifest["splits"][split]
        tokens = np.fromfile(prepared_c4_test / info["tokens_file"], dtype=info["dtype"])
        assert info["dtype"] == "uint16" and tokens.tolist() == [t for d in docs for t in d]
        offsets = np.load(prepared_c4_test / info["index_file"])
        assert offsets.tolist() == np.cumsum([0] + [len(d) for d in docs]).tolist()
        assert (info["tokens"], info["documents"]) == (len(tokens), len(docs))


@pytest.mark.parametrize("kind", ["text", "parquet"])
def test_prepare_reads_local_formats_as_training_does(kind, tokenizer, tmp_path):
    texts = read_jsonl(C4_TEST_PATH / "validation.jsonl")[:8]
    path = write_local(kind, tmp_path, texts)
    prepare(kind, str(path), TOKENIZER_PATH, tmp_path / "out", splits=("train",), num_proc=2, log=lambda _: None)
    prepared = build_dataset("tokens", str(tmp_path / "out"), tokenizer, SEQ_LEN, 0, 1, split="train", infinite=False)
    text = build_dataset(kind, str(path), tokenizer, SEQ_LEN, 0, 1, split="train", infinite=False)
    assert [torch.cat([x, y[-1:]]).tolist() for x, y in prepared] == [torch.cat([x, y[-1:]]).tolist() for x, y in text]


def test_validation_pass_reads_the_split_in_file_order(prepared_c4_test, tokenizer):
    expected = windows_by_hand(tokenizer, read_jsonl(C4_TEST_PATH / "validation.jsonl"))
    ds = build_dataset("tokens", str(prepared_c4_test), tokenizer, SEQ_LEN, 0, 1, split="validation", infinite=False)
    for _ in range(2):  # a finished pass rewinds
        assert [torch.cat([x, y[-1:]]).tolist() for x, y in ds] == expected


def windows(ds: PreparedDataset, n: int) -> list[list[int]]:
    it = iter(ds)
    return [torch.cat([x, y[-1:]]).tolist() for x, y in (next(it) for _ in range(n))]


def test_each_epoch_is_a_permutation_drawn_from_the_seed(prepared_c4_test, tokenizer):
    seq_len = 32767  # 20 windows of 32,768 in c4_test's 669,126 tokens
    def dataset(seed):
        return PreparedDataset(prepared_c4_test, "train", tokenizer, seq_len, 0, 1, seed=seed)
    in_file_order = windows(PreparedDataset(prepared_c4_test, "train", tokenizer, seq_len, 0, 1, infinite=False), 20)
    stream = windows(dataset(3), 60)
    epochs = [stream[i:i + 20] for i in range(0, 60, 20)]
    key = sorted(map(tuple, in_file_order))
    assert all(sorted(map(tuple, e)) == key for e in epochs)  # every window once per epoch
    assert len({tuple(map(tuple, e)) for e in [in_file_order, *epochs]}) == 4  # in a new order each time
    assert windows(dataset(3), 60) == stream and windows(dataset(4), 20) != epochs[0]


@pytest.mark.parametrize("dp_degree", [8, 512])
def test_a_rank_reads_its_windows_of_the_global_stream_directly(dp_degree, prepared_c4_test, tokenizer):
    stream = take(loader("tokens", tokenizer, path=prepared_c4_test, batch=1, seed=5), 3 * dp_degree)
    for rank in (0, dp_degree - 1):
        got = take(loader("tokens", tokenizer, path=prepared_c4_test, batch=1, seed=5, dp_rank=rank,
                          dp_degree=dp_degree), 3)
        assert all(torch.equal(got[i], stream[rank + i * dp_degree]) for i in range(3))


def test_resume_in_a_later_epoch_reads_what_follows(prepared_c4_test, tokenizer):
    """20 windows an epoch: a state saved in the third epoch resumes at the same place of the same permutation."""
    def big_windows():
        return build_dataloader("tokens", str(prepared_c4_test), tokenizer, 32767, 1, 0, 1, seed=5)
    first = big_windows()
    it = iter(first)
    for _ in range(45):
        next(it)
    resumed = big_windows()
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(torch.stack(a), torch.stack(b)) for a, b in zip(take_raw(resumed, 10), take_raw(it, 10)))


def take_raw(batches, n: int) -> list:
    it = iter(batches)
    return [next(it) for _ in range(n)]


# --- refusals -------------------------------------------------------------------------------------------------------

def copy_with_manifest(folder, tmp_path, **changes):
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    manifest = json.loads((out / MANIFEST).read_text())
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        (manifest[section] if section else manifest)[field] = value
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def test_a_folder_without_manifest_or_of_another_format_is_refused(prepared_c4_test, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path} is not a prepared dataset.*prepare_data.py"):
        build_dataset("tokens", str(tmp_path), tokenizer, SEQ_LEN, 0, 1)
    other = copy_with_manifest(prepared_c4_test, tmp_path, format=99)
    with pytest.raises(ValueError, match="format 99, this trainer reads format 1"):
        build_dataset("tokens", str(other), tokenizer, SEQ_LEN, 0, 1)


def test_a_missing_split_is_named(prepared_c4_test, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="no prepared test split.*train, validation.*--splits test"):
        build_dataset("tokens", str(prepared_c4_test), tokenizer, SEQ_LEN, 0, 1, split="test")


def test_another_tokenizer_is_a_one_line_error(prepared_c4_test, tmp_path, monkeypatch, capsys):
    other = copy_with_manifest(prepared_c4_test, tmp_path, **{"tokenizer.fingerprint": "f" * 64})
    args = ["--preflight", "--training.dataset", "tokens", "--training.dataset_path", str(other)]
    _assert_one_line(*_run_in_process(1, args, tmp_path, None, monkeypatch, capsys),
                     [f"training.dataset_path = '{other}'", "prepared with another tokenizer", "sha256 ffffffffffff",
                      "prepare it again with this tokenizer"])
    # the same folder with its own tokenizer passes
    from trainer.dry_run import main
    main([*args[:-1], str(prepared_c4_test)])
    assert capsys.readouterr().err == ""
