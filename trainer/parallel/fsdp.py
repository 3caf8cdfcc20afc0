"""FSDP2 (`fully_shard`) over the data-parallel mesh: per transformer block, then the root.

The mesh is 1-D (dp_shard x cp) for plain FSDP, or 2-D (dp_replicate, dp_shard x cp), over whose second dim FSDP2
shards and over whose first it replicates: HSDP, or DDP-style replication when the second has size 1.
Gradients are averaged over the whole mesh with ReduceOp.AVG, which gloo supports (it has no PREMUL_SUM, so we
never ask FSDP for a custom divide factor).
"""

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               reshard_after_forward: str, pp_enabled: bool = False) -> None:
    """Shard `model` in place. reshard_after_forward: default | always | never (see the config docstring)."""
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # A block's forward inputs are the hidden states and the fp32 RoPE table. Cast to param_dtype, the table would
    # rotate q and k with bf16 cos/sin, unlike a run without FSDP (autocast leaves it fp32). The hidden states need
    # no cast: they are the output of the embedding or of the previous block, in param_dtype already (and the root
    # still casts what a later pipeline stage receives).
    block_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    # With pipelining every microbatch would re-gather the stage's weights, so "default" keeps them gathered there.
    reshard = {"always": True, "never": False, "default": not pp_enabled}[reshard_after_forward]
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=block_policy, reshard_after_forward=reshard)
    # The root holds embeddings, final norm and output: they are used last in forward and first in backward, so
    # resharding them after forward would only be undone at once.
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward == "always")
