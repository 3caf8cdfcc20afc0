"""ParallelDims: resolve the parallel degrees, check them against the world size and the model, build the mesh.

One DeviceMesh with dims (pp, dp_replicate, dp_shard, cp, tp) over every rank, plus the flattened meshes the
features use: `dp` (dp_replicate x dp_shard) for data loading, `fsdp` for FSDP2 (1-D: dp_shard x cp) or HSDP
(2-D: dp_replicate, dp_shard x cp), and `dp_cp` (dp_replicate x dp_shard x cp) over which the loss is averaged
(and DDP all-reduces).
Resolution and validation need no process group, so DRY_RUN can use them for any world size.
"""

import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainer.config import ConfigError
from trainer.torch_private import flatten_mesh, unflatten_mesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def tp_shape_problem(model_args, tp: int) -> str | None:
    """Why `tp` cannot shard this model ("does not divide the model's n_kv_heads = 2; use ..."), or None.

    Column/row-wise layers split whole heads and FFN channels; kv heads are not replicated across tp.
    """
    shape = {"n_heads": model_args.n_heads, "n_kv_heads": model_args.n_kv_heads or model_args.n_heads,
             "FFN hidden dim": model_args.ffn_hidden_dim}
    for what, n in shape.items():
        if n % tp:
            valid = [d for d in range(1, min(shape.values()) + 1) if all(v % d == 0 for v in shape.values())]
            return (f"does not divide the model's {what} = {n}; use a degree that divides n_heads, n_kv_heads and "
                    f"the FFN hidden dim: {', '.join(map(str, valid))}")
    return None


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    world_size: int
    disable_loss_parallel: bool = False
    cp_replicates_parameters: bool = False
    """parallelism.context_parallel_replicate_parameters: DDP over dp_replicate x cp instead of FSDP2 over cp."""
    meshes: dict[str, DeviceMesh] = field(default_factory=dict, repr=False)

    @classmethod
    def resolve(cls, parallelism, world_size: int) -> "ParallelDims":
        """Fill in dp_shard = -1 and check that the degrees multiply to the world size."""
        p = parallelism
        dp_shard = p.data_parallel_shard_degree
        others = p.data_parallel_replicate_degree * p.context_parallel_degree * \
            p.tensor_parallel_degree * p.pipeline_parallel_degree
        formula = (f"dp_replicate {p.data_parallel_replicate_degree} x cp {p.context_parallel_degree} x "
                   f"tp {p.tensor_parallel_degree} x pp {p.pipeline_parallel_degree}")
        if dp_shard == -1:
            if world_size % others:
                raise ConfigError(f"parallelism: {formula} = {others} does not divide the world size {world_size} "
                                  f"(NGPU), so data_parallel_shard_degree = -1 has nothing to take; change the degrees "
                                  f"or NGPU")
            dp_shard = world_size // others
        product = others * dp_shard
        if product != world_size:
            hint = (f"set data_parallel_shard_degree = {world_size // others} or -1" if world_size % others == 0
                    else "change the degrees or NGPU")
            raise ConfigError(f"parallelism: {formula} x dp_shard {dp_shard} = {product}, but the world size (NGPU) is "
                              f"{world_size} ({'too many' if product > world_size else 'too few'} by a factor of "
                              f"{max(product, world_size) / min(product, world_size):g}); {hint}")
        replicate = p.context_parallel_replicate_parameters and p.context_parallel_degree > 1
        if replicate and dp_shard * p.tensor_parallel_degree * p.pipeline_parallel_degree > 1:
            raise ConfigError(f"parallelism.context_parallel_replicate_parameters = true replicates the model over cp "
                              f"with torch's DDP, which takes neither sharded parameters nor pipeline stages, but the "
                              f"layout has dp_shard {dp_shard} x tp {p.tensor_parallel_degree} x pp "
                              f"{p.pipeline_parallel_degree}; set it to false (FSDP2 then shards over dp_shard x cp), "
                              f"or those degrees to 1 (data_parallel_replicate_degree replicates with DDP too)")
        return cls(p.data_parallel_replicate_degree, dp_shard, p.context_parallel_degree,
                   p.tensor_parallel_degree, p.pipeline_parallel_degree, world_size, p.disable_loss_parallel,
                   replicate)

    def validate_model(self, model_args) -> None:
        """Layout checks that depend on the model's shape."""
        if problem := tp_shape_problem(model_args, self.tp):
            raise ConfigError(f"parallelism.tensor_parallel_degree = {self.tp} {problem}")

    @property
    def seq_len_divisor(self) -> int:
        """What every sequence length must be a multiple of: context parallel cuts a sequence into 2 x cp chunks
        (causal load balancing), and sequence parallel splits each rank's cp share over the tp ranks."""
        if self.cp == 1:
            return self.tp
        return self.cp * math.lcm(2, self.tp)

    def check_seq_len(self, key: str, seq_len: int) -> None:
        """ConfigError naming `key` when `seq_len` does not split over this layout (see seq_len_divisor)."""
        if seq_len % self.seq_len_divisor == 0:
            return
        if self.cp > 1 and seq_len % (2 * self.cp):
            raise ConfigError(f"{key} = {seq_len} is not divisible by 2 x context_parallel_degree = {2 * self.cp} "
                              f"(causal load balancing cuts each sequence into 2 x cp chunks)")
        raise ConfigError(f"{key} = {seq_len} does not split over tensor_parallel_degree = {self.tp} (sequence "
                          f"parallel splits each {'context-parallel shard of the ' if self.cp > 1 else ''}sequence "
                          f"over the tp ranks); use a multiple of {self.seq_len_divisor}")

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many ranks read different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def loss_parallel_enabled(self) -> bool:
        """Whether the loss is computed on vocab-sharded logits (tensor parallel without disable_loss_parallel)."""
        return self.tp > 1 and not self.disable_loss_parallel

    @property
    def ddp_enabled(self) -> bool:
        """Whether parameters are replicated over the data-parallel (and, with cp_replicates_parameters, the
        context-parallel) ranks with torch's DDP: replication with no sharding, tensor or pipeline parallel (see
        trainer/parallel/ddp.py). Its mesh is dp_cp."""
        replicas = self.dp_replicate * (self.cp if self.cp_replicates_parameters else 1)
        return replicas > 1 and replicas == self.dp_replicate * self.dp_shard * self.cp and self.tp * self.pp == 1

    @property
    def fsdp_enabled(self) -> bool:
        """Whether parameters are sharded or replicated over data-parallel ranks with FSDP2 (every data-parallel or
        context-parallel layout but those DDP runs)."""
        return self.dp_replicate * self.dp_shard * self.cp > 1 and not self.ddp_enabled

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Create the world mesh and its flattened views (needs an initialized process group)."""
        shape = (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)
        world = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
        dp_cp = flatten_mesh(world, ("dp_replicate", "dp_shard", "cp"), "dp_cp")
        self.meshes = {
            "world": world,
            "dp": flatten_mesh(world, ("dp_replicate", "dp_shard"), "dp"),
            "dp_cp": dp_cp,
            # FSDP2 treats a 2-D mesh as (replicate, shard): HSDP, or plain replication when the shard size is 1.
            # Without replicas it gets the 1-D mesh: a 2-D one with a replicate dim of size 1 would still be run as
            # HSDP, with a size-1 all-reduce per block in backward.
            "fsdp": dp_cp if self.dp_replicate == 1 else unflatten_mesh(
                dp_cp, (self.dp_replicate, self.dp_shard * self.cp), ("dp_replicate", "dp_shard_cp")),
            **{name: world[name] for name in MESH_DIMS},
        }
        return world

    def mesh(self, name: str) -> DeviceMesh:
        """A named mesh built by build_mesh: world, dp, dp_cp, fsdp, or one of the MESH_DIMS."""
        return self.meshes[name]

    def optional_mesh(self, name: str) -> DeviceMesh | None:
        """The named mesh when this run spreads that dimension over more than one rank, else None (also in one
        process, where no mesh is built)."""
        mesh = self.meshes.get(name)
        return mesh if mesh is not None and mesh.size() > 1 else None

    def coordinate(self, name: str) -> tuple[int, int]:
        """(this rank's index, size) along the named 1-D mesh, e.g. "dp" or "tp"; (0, 1) without one."""
        mesh = self.optional_mesh(name)
        return (mesh.get_local_rank(), mesh.size()) if mesh is not None else (0, 1)


def device_type() -> str:
    """The device this process trains on: cuda when a GPU is visible, unless COMM_BACKEND (or the process group
    already up) is gloo, which means CPU: a CUDA mesh over gloo lacks collectives that FSDP and TP need."""
    gloo = os.environ.get("COMM_BACKEND") == "gloo" or (dist.is_initialized() and dist.get_backend() == "gloo")
    return "cuda" if torch.cuda.is_available() and not gloo else "cpu"
