"""FSDP2 (`fully_shard`) over the data-parallel mesh: per transformer block, then the root.

The mesh is 1-D (dp_shard x cp) for plain FSDP, or 2-D (dp_replicate, dp_shard x cp), over whose second dim FSDP2
shards and over whose first it replicates: HSDP, or replication when the second has size 1 (with tensor parallel or
pipeline stages; pure replication runs on DDP instead, see ddp.py).
Gradients are averaged over the whole mesh with ReduceOp.AVG, which gloo supports (it has no PREMUL_SUM, so we
never ask FSDP for a custom divide factor).

training.enable_cpu_offload applies FSDP2's CPUOffloadPolicy: the sharded parameters, their gradients and so the
optimizer states live in host memory and the optimizer steps there; each block's parameters visit the device only
between its all-gather and its reshard. Without FSDP there is nothing to offload through (see check_cpu_offload).
"""

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from trainer.config import ConfigError


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               reshard_after_forward: str, pp_enabled: bool = False, cpu_offload: bool = False) -> None:
    """Shard `model` in place. reshard_after_forward: default | always | never (see the config docstring);
    cpu_offload: keep the shards (and so gradients and optimizer states) in host memory."""
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # A block's forward inputs are the hidden states and the fp32 RoPE table. Cast to param_dtype, the table would
    # rotate q and k with bf16 cos/sin, unlike a run without FSDP (autocast leaves it fp32). The hidden states need
    # no cast: they are the output of the embedding or of the previous block, in param_dtype already (and the root
    # still casts what a later pipeline stage receives).
    block_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    # With pipelining every microbatch would re-gather the stage's weights, so "default" keeps them gathered there.
    reshard = {"always": True, "never": False, "default": not pp_enabled}[reshard_after_forward]
    # Pinned host memory makes the host-to-device copies asynchronous; there is none to make on a CPU mesh (and
    # pinning needs an accelerator).
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu") if cpu_offload else OffloadPolicy()
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=block_policy, reshard_after_forward=reshard, offload_policy=offload)
    # The root holds embeddings, final norm and output: they are used last in forward and first in backward, so
    # resharding them after forward would only be undone at once.
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward == "always",
                offload_policy=offload)


def check_cpu_offload(enabled: bool, fsdp_enabled: bool) -> None:
    """training.enable_cpu_offload needs FSDP. torchtitan v0.2.2 offloads only through fully_shard's offload policy:
    without FSDP its trainer leaves the weights on the host and the batch on the GPU, and the first forward fails.
    Sharding one process over a mesh of one would make this trainer differ from torchtitan and need a process group
    a one-process run does not have; a one-line refusal says what to change instead."""
    if enabled and not fsdp_enabled:
        raise ConfigError("training.enable_cpu_offload = true needs FSDP, which this layout does not use "
                          "(no sharding or context parallel; pure replication runs on DDP): set "
                          "parallelism.data_parallel_shard_degree > 1, or enable_cpu_offload = false")
