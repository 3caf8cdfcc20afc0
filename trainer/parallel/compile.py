"""torch.compile of the transformer blocks (in place) and of the loss, and what stays eager where compile is wrong.

Each block is compiled separately rather than the whole model: every block has the same code and shapes, so one
graph serves them all (compile time does not grow with depth), and FSDP2's per-block hooks stay outside the
graphs. `module.compile()` compiles the module's call in place, so parameter names keep no `_orig_mod.` prefix.
Applied after activation checkpointing (compile then sees the checkpoint and traces it) and before FSDP.

Tensor parallel on CPU (torch 2.13, measured by scripts/compile_tp_scopes.py at tp=2 with sequence and loss parallel
against eager tp=2, same weights and batch; figures in the README's compile section): a whole compiled block
crashes in backward (`'Tensor' object has no attribute '_local_tensor'`), and the compiled RMSNorms (sequence
parallel) run but give the embedding a gradient 7% off. Attention and feed_forward compiled together, their
all-gathers and reduce-scatters included, match eager to 3.5e-7, and so does the compiled loss under loss parallel.
So there each block's attention and feed_forward are compiled, and its norms and residual adds run eager. (Earlier
measurements that found compiled attention wrong had read graphs from a warm AOTAutograd cache, which returns wrong
code for graphs over DTensors: see torch_private.set_autograd_cache, which parallelize() applies.) CUDA keeps whole
blocks.
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


def compiles_whole_blocks(device_type: str, tp: int) -> bool:
    """Whether each whole block is compiled (True) or its attention and feed_forward (CPU with tensor parallel)."""
    return not (device_type == "cpu" and tp > 1)


def compile_summary(cfg: JobConfig, device_type: str, tp: int) -> str:
    """What compile covers, in a few words for the start-up line: off, or the components and the backend."""
    c = cfg.compile
    if not (c.enable and c.components):
        return "off"
    parts = [("model (attention + feed_forward)" if not compiles_whole_blocks(device_type, tp) else "model")
             if component == "model" else component for component in c.components]
    return f"{'+'.join(parts)} ({c.backend})"


def eager_note(cfg: JobConfig, device_type: str, tp: int) -> str | None:
    """The one start-up line saying what compile leaves eager and why (CPU with tensor parallel), else None."""
    c = cfg.compile
    if not (c.enable and "model" in c.components) or compiles_whole_blocks(device_type, tp):
        return None
    return (f"compile on CPU with tensor_parallel_degree {tp}: each block's attention and feed_forward are compiled, "
            "its two norms and residual adds run eager, because torch 2.13 on CPU crashes in backward compiling a "
            "whole block and computes a wrong embedding gradient compiling the sequence-parallel norms")


def apply_compile(model: nn.Module, backend: str, whole_blocks: bool = True) -> None:
    """Compile every block of `model.layers` in place, or with `whole_blocks=False` its attention and feed_forward."""
    for block in model.layers.values():
        for module in [block] if whole_blocks else [block.attention, block.feed_forward]:
            module.compile(backend=backend, fullgraph=True)


def maybe_compile_loss(loss_fn: Callable, cfg: JobConfig) -> Callable:
    """`loss_fn` compiled when compile.enable and "loss" is in compile.components, else unchanged."""
    if cfg.compile.enable and "loss" in cfg.compile.components:
        return torch.compile(loss_fn, backend=cfg.compile.backend, fullgraph=True)
    return loss_fn
