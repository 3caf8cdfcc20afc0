"""WindowStream: the global stream of training windows, and which of them belong to one dp rank (and loader worker).

Sharding rule: every rank walks the same global stream of windows of seq_len + 1 tokens and keeps window i when
i % dp_degree == dp_rank. The union of what the dp ranks read at a step is then the same for any dp degree, so a
dp=2 run sees exactly the global batch of a one-process run with twice the local batch; the training parity tests
rely on it, and resume_position (dataloader.py) reshards a saved position to another dp degree by it.
"""

import torch
from torch.utils.data import IterableDataset, get_worker_info


class WindowStream(IterableDataset):
    """Counts the windows of the global stream and tells which belong to this dp rank (and, in a loader with
    worker processes, to this worker); base of the datasets here.

    With W workers, each walks the whole stream and keeps the rank's batches k with k % W == its id (batches of
    `batch_size` of the rank's windows): the loader hands batches out from the workers in turn, so the rank sees
    the very batches, in the same order, that it reads without workers."""

    def __init__(self, seq_len: int, dp_rank: int, dp_degree: int, batch_size: int = 1):
        if not 0 <= dp_rank < dp_degree:
            raise ValueError(f"dp_rank {dp_rank} must be in [0, dp_degree={dp_degree})")
        self.seq_len, self.dp_rank, self.dp_degree, self.batch_size = seq_len, dp_rank, dp_degree, batch_size
        self._windows_seen = 0
        self._worker, self._workers = 0, 1

    def _find_worker(self) -> None:
        """Called at the start of iteration: which worker process of how many this copy of the dataset runs in."""
        info = get_worker_info()
        self._worker, self._workers = (info.id, info.num_workers) if info is not None else (0, 1)

    def _is_mine(self) -> bool:
        """Count one more global window; True when it belongs to this rank (and worker)."""
        index = self._windows_seen
        self._windows_seen += 1
        if index % self.dp_degree != self.dp_rank:
            return False
        return (index // self.dp_degree // self.batch_size) % self._workers == self._worker

    def _next_mine(self, index: int) -> int:
        """The first global window at or after `index` that `_is_mine` would keep, found by arithmetic (O(1) in the
        dp degree), for a dataset that addresses windows directly; the caller sets `_windows_seen` past it."""
        i = max(0, -(-(index - self.dp_rank) // self.dp_degree))  # this rank's i-th window is global i*dp + rank
        batch = i // self.batch_size
        behind = (self._worker - batch) % self._workers  # batches until the next one of this worker
        if behind:
            i = (batch + behind) * self.batch_size
        return i * self.dp_degree + self.dp_rank

    @staticmethod
    def _sample(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return window[:-1], window[1:]

    def state_dict(self) -> dict:
        """The dp layout and the number of global windows seen so far."""
        return {"dp_rank": self.dp_rank, "dp_degree": self.dp_degree, "windows_seen": self._windows_seen}

    def load_state_dict(self, state: dict) -> None:
        """Resume the window count; a state of another dp degree or rank would give a different split of the data."""
        if state["dp_degree"] != self.dp_degree:
            raise ValueError(
                f"data loader state was saved with dp_degree={state['dp_degree']} but this run has dp_degree="
                f"{self.dp_degree}; resume with the same data-parallel degree"
            )
        if state["dp_rank"] != self.dp_rank:
            raise ValueError(f"data loader state of dp_rank {state['dp_rank']} loaded on dp_rank {self.dp_rank}")
        self._windows_seen = state["windows_seen"]
