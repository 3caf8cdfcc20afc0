"""Parallelisms applied to the model from the outside, one file each, in a fixed order by `parallelize`."""

import os

import torch
from torch import nn

from trainer.config import JobConfig
from trainer.converters import float8_tensorwise
from trainer.parallel.activation_checkpoint import apply_activation_checkpointing
from trainer.parallel.compile import apply_compile, compiles_whole_blocks
from trainer.parallel.context_parallel import apply_context_parallel
from trainer.parallel.ddp import apply_ddp
from trainer.parallel.fsdp import apply_fsdp
from trainer.parallel.tensor_parallel import apply_tensor_parallel
from trainer.parallel_dims import ParallelDims
from trainer.torch_private import set_autograd_cache


def parallelize(model: nn.Module, dims: ParallelDims, cfg: JobConfig, param_dtype: torch.dtype,
                device_type: str) -> nn.Module:
    """Apply, in torchtitan's order, TP -> CP -> activation checkpointing -> compile -> FSDP (or DDP, for pure
    replication) to a meta model (or one pipeline stage of it). `device_type` is the device the run trains on."""
    p = cfg.parallelism
    if dims.tp > 1:  # float8 styles need NCCL: gloo cannot all-gather float8 (see tensor_parallel.py)
        apply_tensor_parallel(model, dims.mesh("tp"), loss_parallel_enabled=dims.loss_parallel_enabled,
                              async_tp=p.enable_async_tensor_parallel, sequence_parallel=p.enable_sequence_parallel,
                              float8=float8_tensorwise(cfg) and device_type == "cuda")
    if dims.cp > 1:
        apply_context_parallel(device_type, p.context_parallel_load_balance, p.context_parallel_rotate_method)
    apply_activation_checkpointing(model, cfg.activation_checkpoint,
                                   pareto_dir=os.path.join(cfg.job.dump_folder, "memory_budget_pareto"))
    if cfg.compile.enable:
        # Process-wide, and set by every build: graphs over DTensors compile fresh (see set_autograd_cache).
        set_autograd_cache(enabled=dims.tp == 1 and dims.cp == 1)
    if cfg.compile.enable and "model" in cfg.compile.components:
        apply_compile(model, cfg.compile.backend, compiles_whole_blocks(device_type, dims.tp))
    if dims.fsdp_enabled:
        apply_fsdp(model, dims.mesh("fsdp"), param_dtype=param_dtype,
                   reduce_dtype=getattr(torch, cfg.training.mixed_precision_reduce),
                   reshard_after_forward=p.fsdp_reshard_after_forward, pp_enabled=dims.pp > 1,
                   cpu_offload=cfg.training.enable_cpu_offload)
    elif dims.ddp_enabled:
        apply_ddp(model, dims.mesh("dp_cp"))  # dp_replicate, or dp_replicate x cp when cp replicates parameters
    return model
