"""build_dataloader: the dataset of one dp rank in a StatefulDataLoader, so its position is saved with checkpoints."""

import copy
import warnings

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from trainer.data.datasets import build_dataset
from trainer.data.tokenizer import Tokenizer

# torchdata 0.11 calls torch.set_vital on every iteration, which torch 2.13 deprecates: its warning, not ours.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning,
                        module="torchdata.stateful_dataloader")


def build_dataloader(dataset: str, dataset_path: str | None, tokenizer: Tokenizer | None, seq_len: int,
                     local_batch_size: int, dp_rank: int, dp_degree: int, seed: int = 0, split: str = "train",
                     infinite: bool = True, vocab_size: int | None = None, options=None,
                     device_type: str = "cpu") -> StatefulDataLoader:
    """Batches of (inputs, labels), int64 tensors of shape [local_batch_size, seq_len]; a last partial batch is dropped.

    Training loaders are endless (`infinite=True`); a validation loader (`split="validation"`, `infinite=False`) makes
    one pass per iteration. `vocab_size` is only read by the synthetic dataset. `options`: a [*.dataloader] section
    (num_workers, persistent_workers, pin_memory, prefetch_factor); worker processes share the rank's batches in
    turn (see WindowStream), so the batches are the same with any number of workers. `device_type`: where the
    batches go; an unset pin_memory pins them for "cuda".
    """
    ds = build_dataset(dataset, dataset_path, tokenizer, seq_len, dp_rank, dp_degree, seed, split, infinite,
                       vocab_size, batch_size=local_batch_size)
    workers = options.num_workers if options is not None else 0
    extra = {} if workers == 0 else {"persistent_workers": options.persistent_workers,
                                     "prefetch_factor": options.prefetch_factor}
    pin = options.pin_memory if options is not None and options.pin_memory is not None else device_type == "cuda"
    return StatefulDataLoader(ds, batch_size=local_batch_size, drop_last=True, num_workers=workers,
                              pin_memory=pin, **extra)


def to_device(batch, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A batch's tensors on `device`. To CUDA the copy does not block the host: from pinned memory it runs
    asynchronously, ordered on the stream before the kernels that read it. On CPU the tensors themselves."""
    non_blocking = device.type == "cuda"
    return tuple(t.to(device, non_blocking=non_blocking) for t in batch)


def dataset_states(loader_state: dict) -> list[dict]:
    """The dataset positions inside a StatefulDataLoader state: one without workers, one per worker with them."""
    if "dataset_state" in loader_state:
        return [loader_state["dataset_state"]]
    workers = (loader_state.get("_snapshot") or {}).get("_worker_snapshots") or {}
    return [w["dataset_state"] for w in workers.values() if w.get("dataset_state") is not None]


def saved_workers(loader_state: dict) -> int:
    """The number of worker processes of the loader that saved `loader_state`."""
    if "dataset_state" in loader_state:
        return 0
    return loader_state["_snapshot"]["_main_snapshot"]["_num_workers"]


def resume_position(states: list[dict], dp_rank: int, dp_degree: int) -> dict:
    """The dataset state for `dp_rank` of `dp_degree`, made from the loader states every dp rank saved at one step
    (`states[r]` from dp rank r, each with or without workers), for a run resumed with another dp degree or number
    of workers.

    Exact because of the sharding rule (see datasets.py): every rank and worker walks the one global stream, batches
    are handed out in order, so the furthest position of any rank's worker is the global position, every window
    before it was read and none after it; each new rank (and worker) continues from there with its own share.
    Raises ValueError on states that do not fit.
    """
    per_rank = [dataset_states(s) for s in states]
    if any("docs_state" in x for d in per_rank for x in d):
        raise ValueError("a streaming source split per rank (c4 from the hub) resumes only at the dp degree and "
                         "number of loader workers it was saved with")
    if any(not d or any(x.get("dp_degree") != len(states) or x.get("dp_rank") != r for x in d)
           for r, d in enumerate(per_rank)):
        raise ValueError(f"the {len(states)} saved data loader states are not one per dp rank of one run")
    flat = [x for d in per_rank for x in d]
    seen = [x["windows_seen"] for x in flat]
    if all(len(d) == 1 for d in per_rank) and max(seen) - min(seen) >= len(states):
        raise ValueError(f"the saved data loader states are at different positions ({min(seen)}..{max(seen)} windows)")
    state = copy.deepcopy(max(flat, key=lambda x: x["windows_seen"]))
    state.update(dp_rank=dp_rank, dp_degree=dp_degree)
    return state
