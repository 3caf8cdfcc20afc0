"""build_dataloader: the dataset of one dp rank in a StatefulDataLoader, so its position is saved with checkpoints."""

import copy

from torchdata.stateful_dataloader import StatefulDataLoader

from trainer.data.datasets import build_dataset
from trainer.data.tokenizer import Tokenizer


def build_dataloader(dataset: str, dataset_path: str | None, tokenizer: Tokenizer | None, seq_len: int,
                     local_batch_size: int, dp_rank: int, dp_degree: int, seed: int = 0, split: str = "train",
                     infinite: bool = True, vocab_size: int | None = None) -> StatefulDataLoader:
    """Batches of (inputs, labels), int64 tensors of shape [local_batch_size, seq_len]; a last partial batch is dropped.

    Training loaders are endless (`infinite=True`); a validation loader (`split="validation"`, `infinite=False`) makes
    one pass per iteration. `vocab_size` is only read by the synthetic dataset.
    """
    ds = build_dataset(dataset, dataset_path, tokenizer, seq_len, dp_rank, dp_degree, seed, split, infinite, vocab_size)
    # No worker processes: each would iterate its own copy of the stream, and the dataset is cheap next to a step.
    return StatefulDataLoader(ds, batch_size=local_batch_size, drop_last=True, num_workers=0)


def reshard_loader_state(states: list[dict], dp_rank: int, dp_degree: int) -> dict:
    """The loader state for `dp_rank` of `dp_degree`, made from the states that every rank of another dp degree
    saved at the same step (`states[r]` from dp rank r), so a run resumes its data with a new dp degree.

    Exact because of the sharding rule (see datasets.py): every rank walks the one global stream, so the rank that
    has counted the most windows holds the global position, every window before it was read by some rank and none
    after it; each new rank continues from there with its own share. Raises ValueError on states that do not fit.
    """
    datasets_state = [s.get("dataset_state") or {} for s in states]
    if any(d.get("dp_degree") != len(states) or d.get("dp_rank") != r for r, d in enumerate(datasets_state)):
        raise ValueError(f"the {len(states)} saved data loader states are not one per dp rank of one run")
    seen = [d["windows_seen"] for d in datasets_state]
    if max(seen) - min(seen) >= len(states):
        raise ValueError(f"the saved data loader states are at different positions ({min(seen)}..{max(seen)} windows)")
    furthest = max(range(len(states)), key=lambda r: seen[r])
    state = copy.deepcopy(states[furthest])
    state["dataset_state"].update(dp_rank=dp_rank, dp_degree=dp_degree)
    return state
