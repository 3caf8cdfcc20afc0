"""build_dataloader: the dataset of one dp rank in a StatefulDataLoader, so its position is saved with checkpoints."""

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
