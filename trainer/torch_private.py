"""Every private torch API this trainer touches, in one place.

Checked against torch 2.13.0. tests/unit/test_torch_private.py fails loudly when an upgrade moves one of these.
"""

from torch.distributed.device_mesh import DeviceMesh


def flatten_mesh(mesh: DeviceMesh, dims: tuple[str, ...], name: str) -> DeviceMesh:
    """Merge named dims of `mesh` into one 1-D mesh called `name` (torch has no public flatten in 2.13).

    Keep the returned object: slicing the flattened name back out of the root mesh is deprecated in 2.13.
    """
    return mesh[dims]._flatten(name)


def unflatten_mesh(mesh: DeviceMesh, sizes: tuple[int, ...], names: tuple[str, ...]) -> DeviceMesh:
    """Split a 1-D mesh into a mesh of shape `sizes` with dims `names` (private `_unflatten` in 2.13)."""
    return mesh._unflatten(0, sizes, names)


def nvshmem_available() -> bool:
    """Whether this torch build and machine can use NVSHMEM for symmetric memory (private module in 2.13)."""
    try:
        from torch.distributed._symmetric_memory import is_nvshmem_available
    except ImportError:
        return False
    return bool(is_nvshmem_available())


def use_nvshmem_symmetric_memory() -> None:
    """Back torch's symmetric memory (async TP, fused collectives) with NVSHMEM (private module in 2.13)."""
    from torch.distributed._symmetric_memory import set_backend

    set_backend("NVSHMEM")


def init_fake_process_group(rank: int, world_size: int) -> None:
    """A process group whose collectives do nothing, so DRY_RUN can build any rank's real sharded layout in one
    process (torch.testing._internal in 2.13; torchtitan's dry run uses the same)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def record_cuda_memory_history(enabled: bool, max_entries: int = 100_000) -> None:
    """Start (or stop) recording CUDA allocator events with stack traces for memory snapshots (private in 2.13;
    absent from CPU builds)."""
    import torch

    torch.cuda.memory._record_memory_history("all" if enabled else None, max_entries=max_entries)


def dump_cuda_memory_snapshot(path: str) -> None:
    """Write the recorded CUDA allocator history as a pickle for pytorch.org/memory_viz (private in 2.13)."""
    import torch

    torch.cuda.memory._dump_snapshot(path)
