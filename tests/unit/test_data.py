"""Tokenizer, packing, dp sharding and resumable loading, checked against values computed by hand or by HF."""

import gzip
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from types import SimpleNamespace

from torchdata.stateful_dataloader import StatefulDataLoader

from trainer.data.dataloader import build_dataloader, resume_position
from trainer.data.datasets import C4_TEST_PATH, build_dataset
from trainer.data.prepare import prepare
from trainer.data.tokenizer import Tokenizer

TOKENIZER_PATH = Path(__file__).resolve().parents[1] / "assets/tokenizer"
TEXT = "The quick brown fox jumps over the lazy dog. Ünïcödé, tabs\tand\nnewlines survive."
SEQ_LEN = 32


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_path(TOKENIZER_PATH)


@pytest.fixture(scope="module")
def prepared_tiny(tmp_path_factory) -> Path:
    """tiny_corpus prepared ("tokens"): 3 windows of SEQ_LEN + 1, so a few batches cross several epochs."""
    folder = tmp_path_factory.mktemp("tiny")
    prepare("jsonl", str(tiny_corpus(folder / "tiny.jsonl")), TOKENIZER_PATH, folder / "prepared", num_proc=1,
            log=lambda _: None)
    return folder / "prepared"


def source(name: str, tmp_path: Path, prepared: Path) -> Path | None:
    """dataset_path of `name` in the tests that read a few documents over many epochs."""
    return {"jsonl": tiny_corpus(tmp_path / "tiny.jsonl"), "tokens": prepared}.get(name)


def loader(name="c4_test", tokenizer=None, path=None, batch=2, dp_rank=0, dp_degree=1, **kwargs):
    return build_dataloader(name, path, tokenizer, SEQ_LEN, batch, dp_rank, dp_degree, vocab_size=2048, **kwargs)


def take(batches, n: int) -> list[torch.Tensor]:
    """Inputs and labels of the next n batches, stacked as one [2, batch, seq_len] tensor each."""
    it = iter(batches)
    return [torch.stack(next(it)) for _ in range(n)]


def windows_by_hand(tokenizer, texts: list[str]) -> list[list[int]]:
    tokens = [t for text in texts for t in tokenizer.encode(text, bos=True, eos=True)]
    n = len(tokens) // (SEQ_LEN + 1)
    return [tokens[i * (SEQ_LEN + 1):(i + 1) * (SEQ_LEN + 1)] for i in range(n)]


def read_jsonl(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


# --- tokenizer ---------------------------------------------------------------------------------------------------

def test_tokenizer_round_trip_and_special_ids(tokenizer):
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (2048, 0, 1)
    ids = tokenizer.encode(TEXT)
    assert ids[0] == tokenizer.bos_id and ids[1] != tokenizer.bos_id  # the post-processor's BOS is not added twice
    assert tokenizer.decode(tokenizer.encode(TEXT, bos=False)) == TEXT
    assert tokenizer.encode(TEXT, bos=False, eos=True) == ids[1:] + [tokenizer.eos_id]
    batch = tokenizer.encode_batch([TEXT, "x"], bos=True, eos=True)
    assert batch == [tokenizer.encode(t, eos=True) for t in (TEXT, "x")]


def test_tokenizer_matches_transformers(tokenizer):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_PATH))
    assert reference(TEXT)["input_ids"] == tokenizer.encode(TEXT)
    assert (reference.bos_token_id, reference.eos_token_id) == (tokenizer.bos_id, tokenizer.eos_id)


def test_tokenizer_without_config_finds_known_special_tokens(tmp_path, tokenizer):
    shutil.copy(TOKENIZER_PATH / "tokenizer.json", tmp_path / "tokenizer.json")
    bare = Tokenizer.from_path(tmp_path / "tokenizer.json")
    assert (bare.bos_id, bare.eos_id) == (tokenizer.bos_id, tokenizer.eos_id)


def test_tokenizer_missing_file_names_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*download_hf_assets"):
        Tokenizer.from_path(tmp_path)


# --- packing -----------------------------------------------------------------------------------------------------

def test_validation_split_is_packed_documents_and_stops(tokenizer):
    expected = windows_by_hand(tokenizer, read_jsonl(C4_TEST_PATH / "validation.jsonl"))
    ds = build_dataset("c4_test", None, tokenizer, SEQ_LEN, 0, 1, split="validation", infinite=False)
    for _ in range(2):  # a finished pass rewinds, so each evaluation sees the whole split
        samples = list(ds)
        assert len(samples) == len(expected)
        for (inputs, labels), window in zip(samples, expected):
            assert inputs.tolist() == window[:-1] and labels.tolist() == window[1:]
    batches = list(loader(tokenizer=tokenizer, batch=4, split="validation", infinite=False))
    assert len(batches) == len(expected) // 4


@pytest.mark.parametrize("name", ["c4_test", "synthetic", "tokens"])
def test_batches_are_int64_and_labels_are_shifted_inputs(name, tokenizer, prepared_c4_test):
    path = prepared_c4_test if name == "tokens" else None
    for inputs, labels in take(loader(name, tokenizer, path=path, batch=3), 5):
        assert inputs.shape == labels.shape == (3, SEQ_LEN) and inputs.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], labels[:, :-1])
        assert 0 <= int(inputs.min()) and int(inputs.max()) < 2048


# --- sharding ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["c4_test", "synthetic", "tokens"])
def test_dp_ranks_interleave_to_the_single_process_stream(name, tokenizer, prepared_c4_test):
    path = prepared_c4_test if name == "tokens" else None
    single = take(loader(name, tokenizer, path=path, batch=4), 6)
    ranks = [take(loader(name, tokenizer, path=path, batch=2, dp_rank=r, dp_degree=2), 6) for r in range(2)]
    for step, batch in enumerate(single):
        # Window i is rank i % 2's, so the global batch of a step is the same for dp=1 and dp=2.
        assert torch.equal(batch[:, 0::2], ranks[0][step]) and torch.equal(batch[:, 1::2], ranks[1][step])


# --- checkpointing -----------------------------------------------------------------------------------------------

def tiny_corpus(path: Path) -> Path:
    """Six short documents, so that a few batches cross several epochs (and reshuffles)."""
    path.write_text("".join(json.dumps({"text": f"document {i} " + "word " * (5 * i)}) + "\n" for i in range(6)))
    return path


@pytest.mark.parametrize("name", ["c4_test", "synthetic", "jsonl", "tokens"])
@pytest.mark.parametrize("dp_rank, dp_degree", [(0, 1), (1, 2)])
def test_resume_yields_exactly_the_batches_that_follow(name, dp_rank, dp_degree, tokenizer, tmp_path, prepared_tiny):
    path = source(name, tmp_path, prepared_tiny)
    kwargs = dict(name=name, tokenizer=tokenizer, path=path, batch=2, dp_rank=dp_rank, dp_degree=dp_degree, seed=3)
    uninterrupted = take(loader(**kwargs), 12)

    first = loader(**kwargs)
    it = iter(first)
    for _ in range(5):
        next(it)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # through bytes, as a checkpoint would
    resumed = loader(**kwargs)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    for expected, got in zip(uninterrupted[5:], take(resumed, 7), strict=True):
        assert torch.equal(expected, got)


def test_document_order_is_fixed_by_the_seed(tokenizer):
    same = [take(loader(tokenizer=tokenizer, seed=7), 3) for _ in range(2)]
    other = take(loader(tokenizer=tokenizer, seed=8), 3)
    assert all(torch.equal(a, b) for a, b in zip(*same)) and not torch.equal(same[0][0], other[0])


def test_state_of_another_dp_degree_is_refused(tokenizer):
    saved = loader(tokenizer=tokenizer, dp_rank=1, dp_degree=2)
    next(iter(saved))
    restored = loader(tokenizer=tokenizer, dp_rank=1, dp_degree=4)
    restored.load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match="dp_degree=2.*dp_degree=4"):
        next(iter(restored))  # StatefulDataLoader applies a loaded state when the next iteration starts


@pytest.mark.parametrize("name", ["c4_test", "synthetic", "jsonl", "tokens"])
@pytest.mark.parametrize("saved_degree, new_degree", [(4, 2), (2, 4), (2, 1)])
def test_data_position_reshards_to_another_dp_degree(name, saved_degree, new_degree, tokenizer, tmp_path,
                                                     prepared_tiny):
    path = source(name, tmp_path, prepared_tiny)
    kwargs = dict(name=name, tokenizer=tokenizer, path=path, batch=1, seed=3)
    stream = take(loader(**kwargs), 12 + 4 * new_degree)  # one process: window i is the i-th of the global stream
    saved = []
    for rank in range(saved_degree):  # each rank reads its share of the first 12 windows, as 12 / dp steps would
        dl = loader(**kwargs, dp_rank=rank, dp_degree=saved_degree)
        take(dl, 12 // saved_degree)
        saved.append(dl.state_dict())
    for rank in range(new_degree):
        resumed = loader(**kwargs, dp_rank=rank, dp_degree=new_degree)
        resumed.dataset.load_state_dict(resume_position(saved, rank, new_degree))
        # It goes on with the windows 12 + rank, 12 + rank + new_degree, ...: none read twice, none skipped.
        assert all(torch.equal(got, stream[12 + rank + i * new_degree]) for i, got in enumerate(take(resumed, 4)))


def test_reshard_refuses_states_of_different_steps(tokenizer):
    saved = []
    for rank, batches in ((0, 2), (1, 3)):
        dl = loader(tokenizer=tokenizer, batch=1, dp_rank=rank, dp_degree=2)
        take(dl, batches)
        saved.append(dl.state_dict())
    with pytest.raises(ValueError, match="different positions"):
        resume_position(saved, 0, 1)


# --- worker processes --------------------------------------------------------------------------------------------

def workers(n: int) -> SimpleNamespace:
    """A [training.dataloader] section."""
    return SimpleNamespace(num_workers=n, persistent_workers=False, pin_memory=False, prefetch_factor=None)


@pytest.mark.parametrize("name", ["c4_test", "synthetic", "tokens"])
def test_workers_hand_out_the_batches_of_one_process(name, tokenizer, prepared_tiny):
    for dp_rank in range(2):
        kwargs = dict(name=name, tokenizer=tokenizer, path=prepared_tiny if name == "tokens" else None, batch=2,
                      dp_rank=dp_rank, dp_degree=2, seed=3)
        plain, with_workers = take(loader(**kwargs), 6), take(loader(**kwargs, options=workers(2)), 6)
        assert all(torch.equal(a, b) for a, b in zip(plain, with_workers))


@pytest.mark.parametrize("name", ["c4_test", "tokens"])
def test_resume_with_workers_is_exact_and_reshards(name, tokenizer, prepared_tiny):
    kwargs = dict(name=name, tokenizer=tokenizer, path=prepared_tiny if name == "tokens" else None, batch=2, seed=3)
    straight = take(loader(**kwargs, dp_degree=1), 8)  # one process: what the two ranks read together
    saved = []
    for rank in range(2):  # dp=2, 2 workers each: 3 batches per rank, then the state
        dl = loader(**kwargs, dp_rank=rank, dp_degree=2, options=workers(2))
        it = iter(dl)
        [next(it) for _ in range(3)]
        saved.append(dl.state_dict())
        # the same degree and workers: the loader state resumes exactly
        resumed = loader(**kwargs, dp_rank=rank, dp_degree=2, options=workers(2))
        resumed.load_state_dict(saved[-1])
        assert all(torch.equal(a, b) for a, b in zip(take(resumed, 2), dl_after(it, 2)))
    # dp=2 x 2 workers -> one process without workers: the global stream goes on at window 12 (2 ranks x 3 x 2).
    one = loader(**kwargs, dp_degree=1)
    one.dataset.load_state_dict(resume_position(saved, 0, 1))
    rest = torch.cat([b for b in take(one, 2)], dim=1)
    expected = torch.cat(straight, dim=1)[:, 12:16]
    assert torch.equal(rest, expected)


def dl_after(it, n: int) -> list:
    """The next n batches of a running iterator, as `take` returns them."""
    return [torch.stack(next(it)) for _ in range(n)]


# --- local files and errors --------------------------------------------------------------------------------------

def write_local(kind: str, folder: Path, texts: list[str]) -> Path:
    if kind == "text":
        path = folder / "corpus.txt"
        path.write_text("\n\n".join(t.replace("\n", " ") for t in texts), encoding="utf-8")  # blank lines are skipped
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        path = folder / "corpus.parquet"
        pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), path)
    else:  # a C4-like folder: gzipped shards named after their split
        path = folder / "en"
        path.mkdir()
        for split in ("train", "validation"):
            lines = "".join(json.dumps({"text": f"{split}: {t}", "url": "u"}) + "\n" for t in texts)
            with gzip.open(path / f"c4-{split}.00000-of-00001.json.gz", "wt", encoding="utf-8") as f:
                f.write(lines)
    return path


@pytest.mark.parametrize("name, kind", [("text", "text"), ("parquet", "parquet"), ("json", "c4"), ("c4", "c4")])
def test_local_files_load(name, kind, tokenizer, tmp_path):
    texts = read_jsonl(C4_TEST_PATH / "validation.jsonl")[:8]
    path = write_local(kind, tmp_path, texts)
    expected = {"c4": [f"validation: {t}" for t in texts], "text": [t.replace("\n", " ") for t in texts]}
    expected = expected.get(kind, texts)
    ds = build_dataset(name, str(path), tokenizer, SEQ_LEN, 0, 1, split="validation", infinite=False)
    assert [torch.cat([x, y[-1:]]).tolist() for x, y in ds] == windows_by_hand(tokenizer, expected)


def test_unknown_dataset_names_the_valid_ones(tokenizer):
    with pytest.raises(ValueError, match="'c4_tset'.*c4_test, c4, synthetic"):
        loader("c4_tset", tokenizer)


@pytest.mark.parametrize("name", ["c4_test", "jsonl", "c4"])
def test_missing_path_is_named(name, tokenizer, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        loader(name, tokenizer, path=str(missing))


# --- a streaming source split per rank (c4 from the hub; here the same code on a local file, streamed) -------------

def streamed(split: str = "validation"):
    import datasets
    return datasets.load_dataset("json", data_files=str(C4_TEST_PATH / f"{split}.jsonl"), split="train",
                                 streaming=True).select_columns(["text"])


def test_streaming_ranks_read_disjoint_documents_and_resume_from_the_source_state(tokenizer):
    from trainer.data.datasets import RankStreamDataset
    texts = read_jsonl(C4_TEST_PATH / "validation.jsonl")
    for rank in range(2):  # one file: rank r reads documents r, r + 2, ... (datasets' split_dataset_by_node)
        ds = RankStreamDataset(streamed(), tokenizer, SEQ_LEN, rank, 2, infinite=False)
        assert [torch.cat([x, y[-1:]]).tolist() for x, y in ds] == windows_by_hand(tokenizer, texts[rank::2])

    def rank1():
        return StatefulDataLoader(RankStreamDataset(streamed(), tokenizer, SEQ_LEN, 1, 2), batch_size=16)
    # rank 1's half of the split is ~950 windows: batch 60 is in the second epoch, after the resume at 50
    uninterrupted = take(rank1(), 64)
    first = rank1()
    it = iter(first)
    for _ in range(50):
        next(it)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    resumed = rank1()
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[50:], take(resumed, 14), strict=True))
    with pytest.raises(ValueError, match="resumes only at the dp degree"):
        resume_position([first.state_dict(), first.state_dict()], 0, 1)
