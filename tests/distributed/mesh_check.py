"""Build the mesh for a layout under torchrun and check every named sub-mesh against arithmetic (rank 0 saves)."""

import json
import sys

import torch
import torch.distributed as dist

from trainer.config import load_config
from trainer.distributed import shutdown
from trainer.parallel_dims import ParallelDims


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    dims = ParallelDims.resolve(load_config(argv).parallelism, dist.get_world_size())
    dims.build_mesh("cpu")
    rank = dist.get_rank()
    # The data-parallel group must contain exactly the ranks that differ only in (dp_replicate, dp_shard):
    # summing each rank's id over it and over the fsdp mesh checks membership, not just sizes.
    report = {}
    for name in ("dp", "dp_cp", "fsdp", "tp", "pp"):
        mesh = dims.mesh(name)
        group = mesh.get_group() if mesh.ndim == 1 else None
        members = mesh.mesh.flatten().tolist()
        if group is not None:
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=group)
            assert t.item() == sum(members), (name, t.item(), members)
        report[name] = {"shape": list(mesh.shape), "members": members}
    report["dp_coordinate"] = list(dims.dp_coordinate())
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    shutdown(0, clean=True)


if __name__ == "__main__":
    main()
