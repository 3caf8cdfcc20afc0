"""Process-group setup and teardown for torchrun-launched ranks (or one plain process)."""

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.config import ConfigError
from trainer.torch_private import nvshmem_available, use_nvshmem_symmetric_memory


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    log_ranks: frozenset[int]

    @property
    def should_log(self) -> bool:
        """Whether this rank prints (LOG_RANK, default rank 0)."""
        return self.rank in self.log_ranks


def _log_ranks() -> frozenset[int]:
    raw = os.environ.get("LOG_RANK", "0")
    try:
        return frozenset(int(r) for r in raw.split(",") if r.strip())
    except ValueError:
        raise ConfigError(f"LOG_RANK = {raw!r}: expected a rank or a comma-separated list of ranks, e.g. 0 or 0,4")


def init_distributed() -> DistInfo:
    """Read torchrun's environment, pick the device and backend (COMM_BACKEND) and init the process group.

    A run without torchrun's variables is one process and gets no process group at all; a process group that is
    already initialized is kept.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    info = DistInfo(rank, local_rank, world_size, device, _log_ranks())
    if dist.is_initialized() or (world_size == 1 and "MASTER_ADDR" not in os.environ):
        return info  # a process group already up (a test worker running several jobs) is used as it is
    backend = os.environ.get("COMM_BACKEND") or ("nccl" if cuda else "gloo")
    if backend == "nvshmem":
        if not (cuda and nvshmem_available()):
            raise ConfigError("COMM_BACKEND = 'nvshmem': NVSHMEM is not available with this torch build or device; "
                              "use nccl (CUDA) or gloo (CPU)")
        backend = "nccl"
    elif backend not in ("nccl", "gloo"):
        raise ConfigError(f"COMM_BACKEND = {backend!r} is not one of nccl, gloo, nvshmem")
    elif backend == "nccl" and not cuda:
        raise ConfigError("COMM_BACKEND = 'nccl' needs CUDA, and no GPU is visible; use gloo (the default on CPU)")
    dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    if os.environ.get("COMM_BACKEND") == "nvshmem":
        use_nvshmem_symmetric_memory()
    return info


def shutdown(exit_code: int, clean: bool) -> None:
    """End the process without the gloo exit abort: barrier, destroy, flush, os._exit.

    `clean` is False after an error on this rank: a barrier would then wait for ranks that may never come.
    os._exit skips atexit handlers, so writers must be closed before this.
    """
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
