"""Pure data-parallel replication (dp_replicate > 1 and no other parallelism) with torch's DDP.

DDP's C++ reducer packs gradients into buckets in the order backward produces them and all-reduces each bucket
(a mean over the replicas) as soon as it is full, while backward goes on with the earlier layers: communication
overlaps compute, and there are no per-block copies in and out of flat buffers as FSDP2 makes over a shard dim of
size 1. The gradients are views into the buckets (gradient_as_bucket_view): no second copy of them. It is applied
in place through torch's composable `replicate`, so parameter names, state dicts and DCP checkpoints are those of
the plain model, and any layout can resume them.

Context parallel replicates over DDP too when parallelism.context_parallel_replicate_parameters is set: the mesh is
then dp_replicate x cp (each cp rank's gradients are those of its part of the sequences, and their mean over the mesh
is the step's gradient, as FSDP2's over dp_shard x cp). Not used with other dims: HSDP (dp_shard > 1) and context
parallel by default shard over FSDP2; tensor parallel and pipeline stages replicate over FSDP2 too
(ParallelDims.ddp_enabled). Without FSDP there is no MixedPrecisionPolicy: a bf16
mixed_precision_param runs under autocast over fp32 weights, and gradients are reduced in fp32, as in one process.
"""

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from trainer.torch_private import replicate_module

# Small enough that the 4-block benchmark model gets several buckets and its first all-reduces start while
# backward still runs through the lower blocks; 25 MB (DDP's default) would put a model that size in one bucket, sent
# after backward. See README "Data parallel" for the measurement.
BUCKET_CAP_MB = 4


def apply_ddp(model: nn.Module, mesh: DeviceMesh, bucket_cap_mb: float = BUCKET_CAP_MB) -> None:
    """Replicate `model` in place over the 1-D `mesh` (dp_cp); gradients are averaged over it."""
    replicate_module(model, process_group=mesh.get_group(), bucket_cap_mb=bucket_cap_mb,
                     gradient_as_bucket_view=True)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Whether the next backward all-reduces the gradients (off for all but the last micro-batch of a step under
    gradient accumulation: they add up locally, and the last backward reduces the sum once)."""
    model.set_requires_gradient_sync(enabled)
