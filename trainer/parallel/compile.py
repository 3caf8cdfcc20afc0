"""torch.compile of the transformer blocks (in place) and of the loss, and what stays eager where compile is wrong.

Each block is compiled separately rather than the whole model: every block has the same code and shapes, so one
graph serves them all (compile time does not grow with depth), and FSDP2's per-block hooks stay outside the
graphs. `module.compile()` compiles the module's call in place, so parameter names keep no `_orig_mod.` prefix.
Applied after activation checkpointing (compile then sees the checkpoint and traces it) and before FSDP.

Tensor parallel on CPU (torch 2.13, measured at tp=2 with sequence and loss parallel against eager tp=2, same
weights and batch; the experiment is in the README's compile section): a whole compiled block crashes in backward
(`'Tensor' object has no attribute '_local_tensor'`); an inductor-compiled attention, or compiled norms, run but
give wrong gradients (attention: every gradient off by up to 100%; norms: the embedding's by 7%), while aot_eager
gets attention right, so the fault is in inductor's CPU code for these DTensor graphs. A compiled feed_forward
(the SwiGLU MLP, its all-gather and reduce-scatter included) and a compiled loss under loss parallel match eager
to 5e-7. So there, only each block's feed_forward is compiled and the rest of the block runs eager. Training TP
always runs sequence parallel (without it the norms stay plain tensors that foreach AdamW refuses next to
DTensors), so "attention without SP", which compiles correctly, is no training layout. CUDA keeps whole blocks.
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
    """Whether each whole block is compiled (True) or only its feed_forward (CPU with tensor parallel)."""
    return not (device_type == "cpu" and tp > 1)


def compile_summary(cfg: JobConfig, device_type: str, tp: int) -> str:
    """What compile covers, in a few words for the start-up line: off, or the components and the backend."""
    c = cfg.compile
    if not (c.enable and c.components):
        return "off"
    parts = [("model (feed_forward only)" if not compiles_whole_blocks(device_type, tp) else "model")
             if component == "model" else component for component in c.components]
    return f"{'+'.join(parts)} ({c.backend})"


def eager_note(cfg: JobConfig, device_type: str, tp: int) -> str | None:
    """The one start-up line saying what compile leaves eager and why (CPU with tensor parallel), else None."""
    c = cfg.compile
    if not (c.enable and "model" in c.components) or compiles_whole_blocks(device_type, tp):
        return None
    return (f"compile on CPU with tensor_parallel_degree {tp}: only each block's feed_forward is compiled; attention, "
            "the norms and the residual adds run eager, because torch 2.13 on CPU crashes in backward (whole block) "
            "or computes wrong gradients (attention, norms) when it compiles them under sequence parallel")


def apply_compile(model: nn.Module, backend: str, whole_blocks: bool = True) -> None:
    """Compile every block of `model.layers` in place, or with `whole_blocks=False` only its feed_forward."""
    for block in model.layers.values():
        (block if whole_blocks else block.feed_forward).compile(backend=backend, fullgraph=True)


def maybe_compile_loss(loss_fn: Callable, cfg: JobConfig) -> Callable:
    """`loss_fn` compiled when compile.enable and "loss" is in compile.components, else unchanged."""
    if cfg.compile.enable and "loss" in cfg.compile.components:
        return torch.compile(loss_fn, backend=cfg.compile.backend, fullgraph=True)
    return loss_fn
