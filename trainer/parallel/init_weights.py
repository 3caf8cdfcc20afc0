"""Materialize a (possibly sharded) meta-device model with the same initial values in every parallel layout.

Each parameter's value depends only on the seed and its name (see Transformer.init_param_), so a 1-process run,
an FSDP run and a pipeline stage start from identical weights: every rank computes the full tensor for one
parameter at a time and keeps its own shard of it. That costs the time to draw the whole model once per rank
and the memory of its largest single tensor, never the whole model. scripts/generate.py materializes the same
way and copies checkpoint tensors in with `copy_full_`.
"""

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from trainer.models.llama import canonical_param_name, param_generator


def _shared_parameters(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """(module, name, owner module, owner name) for every parameter registered again under a second name."""
    owners, shared = {}, []
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None:
                continue
            if id(param) in owners:
                shared.append((module, name, *owners[id(param)]))
            else:
                owners[id(param)] = (module, name)
    return shared


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str) -> None:
    """Move `model` off the meta device onto `device`: parameters uninitialised (tied ones still shared), buffers
    computed."""
    # to_empty gives each module a new Parameter for a plain meta tensor (DTensors are swapped in place), which
    # would untie tied embeddings: the output projection would get its own, differently initialized weight.
    shared = _shared_parameters(model)
    model.to_empty(device=device)
    for module, name, owner, owner_name in shared:
        setattr(module, name, getattr(owner, owner_name))
    model.init_buffers()


@torch.no_grad()
def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full value `full` into `param`: a plain tensor, or this rank's shard of a DTensor."""
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank holds the full value already, so slicing needs no communication.
        shard = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, device: torch.device) -> None:
    """Move `model` off the meta device onto `device` and initialize parameters and buffers in place."""
    materialize(model, device)
    for name, param in model.named_parameters():
        # A tied output matrix is the embedding by another name: a last pipeline stage that holds only `output`
        # must draw what the unsplit model draws for tok_embeddings.weight.
        if model.args.tie_word_embeddings and canonical_param_name(name) == "output.weight":
            name = "tok_embeddings.weight"
        full = torch.empty(param.shape, dtype=param.dtype, device=device)
        model.init_param_(name, full, param_generator(seed, name, device))
        copy_full_(param, full)
