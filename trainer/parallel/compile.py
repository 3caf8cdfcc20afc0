"""torch.compile of the transformer blocks (in place) and of the loss, and where compile cannot run.

Each block is compiled separately rather than the whole model: every block has the same code and shapes, so one
graph serves them all (compile time does not grow with depth), and FSDP2's per-block hooks stay outside the
graphs. `block.compile()` compiles the module's call in place, so parameter names keep no `_orig_mod.` prefix.
Applied after activation checkpointing (compile then sees the checkpoint and traces it) and before FSDP.
"""

from collections.abc import Callable

import torch
from torch import nn

from trainer.config import ConfigError, JobConfig


def check_compile_supported(cfg: JobConfig, device_type: str) -> None:
    """Raise ConfigError for a compile setting a run on `device_type` ("cuda" or "cpu") cannot use."""
    c = cfg.compile
    if not (c.enable and c.components):
        return
    if c.backend not in torch.compiler.list_backends(exclude_tags=()):
        raise ConfigError(f"compile.backend = {c.backend!r} is not a torch.compile backend; use inductor "
                          "(or aot_eager / eager to narrow down a compile problem)")
    tp = cfg.parallelism.tensor_parallel_degree
    if device_type == "cpu" and tp > 1:
        # torch 2.13 CPU: whole-block compile crashes in backward with TP/SP, attention-only gives wrong gradients.
        raise ConfigError(f"compile.enable = true with parallelism.tensor_parallel_degree = {tp} is not supported "
                          "on CPU (torch.compile + tensor parallel is broken there); disable one of them")


def apply_compile(model: nn.Module, backend: str) -> None:
    """Compile every block of `model.layers` in place."""
    for block in model.layers.values():
        block.compile(backend=backend, fullgraph=True)


def maybe_compile_loss(loss_fn: Callable, cfg: JobConfig) -> Callable:
    """`loss_fn` compiled when compile.enable and "loss" is in compile.components, else unchanged."""
    if cfg.compile.enable and "loss" in cfg.compile.components:
        return torch.compile(loss_fn, backend=cfg.compile.backend, fullgraph=True)
    return loss_fn
