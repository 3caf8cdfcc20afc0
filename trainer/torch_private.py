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


def enable_async_tensor_parallel() -> None:
    """Let inductor overlap TP collectives with the matmuls around them (micro-pipeline TP; private config in
    2.13). Only compiled code on CUDA benefits. torchtitan also called enable_symm_mem_for_group for the tp group;
    2.13 deprecates that as unnecessary."""
    import torch._inductor.config

    torch._inductor.config._micro_pipeline_tp = True


def init_fake_process_group(rank: int, world_size: int) -> None:
    """A process group whose collectives do nothing, so DRY_RUN can build any rank's real sharded layout in one
    process (torch.testing._internal in 2.13; torchtitan's dry run uses the same)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
