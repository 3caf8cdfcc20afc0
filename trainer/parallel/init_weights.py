"""Materialize a (possibly sharded) meta-device model with the same initial values in every parallel layout.

Each parameter's value depends only on the seed and its name (see Transformer.init_param_), so a 1-process run,
an FSDP run and a pipeline stage start from identical weights: every rank computes the full tensor for one
parameter at a time and keeps its own shard of it. That costs the time to draw the whole model once per rank
and the memory of its largest single tensor, never the whole model.
"""

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from trainer.models.llama import canonical_param_name, param_generator


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, device: torch.device) -> None:
    """Move `model` off the meta device onto `device` and initialize parameters and buffers in place."""
    model.to_empty(device=device)
    # to_empty gives each parameter attribute a tensor of its own, which unties a shared matrix: tie it again
    # (FSDP2 would re-tie at its first reshard, but plain models never would, and the optimizer sees both).
    if model.args.tie_word_embeddings and model.tok_embeddings is not None and model.output is not None:
        model.output.weight = model.tok_embeddings.weight
    model.init_buffers()
    for name, param in model.named_parameters():
        # A tied output matrix is the embedding by another name: a last pipeline stage that holds only `output`
        # must draw what the unsplit model draws for tok_embeddings.weight.
        if model.args.tie_word_embeddings and canonical_param_name(name) == "output.weight":
            name = "tok_embeddings.weight"
        full = torch.empty(param.shape, dtype=param.dtype, device=device)
        model.init_param_(name, full, param_generator(seed, name, device))
        if isinstance(param, DTensor):
            # src_data_rank=None: every rank holds the full value already, so slicing needs no communication.
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)
