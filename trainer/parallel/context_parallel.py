"""Context parallel: every sequence is split over the `cp` mesh dim and attention runs as a ring over it.

Two halves: `apply_context_parallel` (called by `parallelize`, once) sets the process-wide ring-attention options,
and `cp_context` is the context every batch's forward and backward run in (the model's `batch_context`). Inside
it torch's `context_parallel` shards the buffers in place (inputs and labels on dim 1, the RoPE table on dim 0)
and routes SDPA to ring attention. With load balancing, each rank holds chunks i and 2cp-1-i of
the sequence so causal attention costs every rank the same. The loss on a rank is the mean over its tokens;
FSDP averages gradients over dp_shard x cp (or, with parallelism.context_parallel_replicate_parameters, DDP over
dp_replicate x cp), so the step equals the unsplit one. On CPU the ring needs
`enable_cpu_context_parallel` (a private-API shim, see trainer/torch_private.py).
"""

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.experimental import context_parallel

from trainer.torch_private import enable_cpu_context_parallel, set_context_parallel_options


def apply_context_parallel(device_type: str, load_balance: bool, rotate_method: str) -> None:
    """Process-wide ring-attention settings, once per model build (the model itself is left unchanged)."""
    if device_type == "cpu":
        enable_cpu_context_parallel()
    set_context_parallel_options(load_balance, rotate_method)


def cp_context(mesh: DeviceMesh | None, model_parts: list[nn.Module], inputs: torch.Tensor, labels: torch.Tensor):
    """The context one micro-batch's forward and backward run in; a no-op without context parallel.

    inputs and labels stay sharded afterwards (they are not used again); the RoPE tables are restored.
    """
    if mesh is None:
        return contextlib.nullcontext()
    ropes = [m.rope_cache for m in model_parts]
    return context_parallel(mesh, buffers=[inputs, labels, *ropes], buffer_seq_dims=[1, 1, *[0] * len(ropes)],
                            no_restore_buffers={inputs, labels})
