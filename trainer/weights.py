"""Model weights in and out of a (possibly sharded) model: materialize and initialize, copy full tensors in, gather
them out, and read or write model folders (DCP and HF). Checkpointing, the HF export, scripts/convert_checkpoint.py
and scripts/generate.py all go through here.

Every function that fills a sharded model takes full tensors and lets each rank keep its own shard with no
communication (`copy_full_`); the initial value of a parameter depends only on the seed and its name, so a
1-process run, an FSDP run and a pipeline stage start from identical weights.
"""

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor, distribute_tensor

from trainer.checkpoint_files import read_marker, write_marker
from trainer.config import ConfigError
from trainer.models.hf import from_hf_state_dict, load_hf_checkpoint, save_hf_checkpoint
from trainer.models.llama import ModelArgs, param_generator


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
def copy_full_(param: Tensor, full: Tensor) -> None:
    """Copy the full value `full` into `param`: a plain tensor, or this rank's shard of a DTensor (cast to its dtype)."""
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank holds the full value already, so slicing needs no communication.
        shard = distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements,
                                  src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, device: torch.device, param_device: torch.device | None = None) -> None:
    """Move `model` off the meta device onto `device` and initialize parameters and buffers in place. Each rank
    draws one full parameter at a time and keeps its shard: the memory of the largest tensor, never the model.
    `param_device` (CPU offload: the host) holds the parameters instead; the values are drawn on `device` still,
    so they are the same with and without offloading."""
    materialize(model, param_device or device)
    if param_device is not None and param_device != device:
        for module in model.modules():  # the buffers (RoPE table) are used where the compute runs
            for name, buffer in module.named_buffers(recurse=False):
                setattr(module, name, buffer.to(device))
    for name, param in model.named_parameters():
        # A tied output matrix is the embedding by another name: a last pipeline stage that holds only `output`
        # must draw what the unsplit model draws for tok_embeddings.weight.
        if model.args.tie_word_embeddings and name == "output.weight":
            name = "tok_embeddings.weight"
        # Drawn in fp32 at least, then rounded (copy_full_): a bf16 model starts from the fp32 run's weights, rounded.
        full = torch.empty(param.shape, dtype=torch.promote_types(param.dtype, torch.float32), device=device)
        model.init_param_(name, full, param_generator(seed, name, device))
        copy_full_(param, full)


@torch.no_grad()
def load_full_state(model: nn.Module, full: dict[str, Tensor]) -> None:
    """Copy full tensors into `model`'s parameters by name; each rank keeps its shard, with no communication. `full`
    must name every parameter (from_hf_state_dict guarantees it)."""
    for name, param in model.named_parameters():
        copy_full_(param, full[name])


@torch.no_grad()
def gather_full_state(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Full parameter tensors on CPU, on rank 0 only (other ranks get {}). Every rank must call it: gathering a
    sharded parameter is a collective, done one parameter at a time so no rank holds more than one full tensor
    beyond what rank 0 keeps."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    out = {}
    for name, param in model.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param.detach()
        if rank0:
            out[name] = full.to(device="cpu", dtype=dtype or full.dtype, copy=True)
    return out


# --- HF model folders (config.json + safetensors) -------------------------------------------------------------------

# What decides the weights' shapes and meaning; max_seq_len only sizes the RoPE table, which is recomputed.
_ARCHITECTURE = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "norm_eps", "rope_theta",
                 "rope_scaling", "tie_word_embeddings")


def architecture_mismatch(ours: ModelArgs, theirs: ModelArgs) -> str | None:
    """The first field in which two models' weights differ, as 'field X there, Y here', or None."""
    for name in _ARCHITECTURE:
        here, there = getattr(ours, name), getattr(theirs, name)
        if here != there:
            return f"{name} {there} there, {here} here"
    return None


def load_hf_weights(model: nn.Module, path, args: ModelArgs) -> None:
    """Load an HF Llama folder into `model` (sharded or not): every rank reads the files and keeps its shard.

    Raises ValueError naming the problem when the folder is not a Llama of `args`' shape.
    """
    hf_args, hf_sd = load_hf_checkpoint(path)
    mismatch = architecture_mismatch(args, hf_args)
    if mismatch:
        raise ValueError(f"its config.json describes another model ({mismatch}); set model.name/model.flavor to match")
    load_full_state(model, from_hf_state_dict(hf_sd, hf_args))


def save_hf_weights(model: nn.Module, path, args: ModelArgs, dtype: torch.dtype) -> None:
    """Write `model` as an HF Llama folder that transformers loads (rank 0 writes; every rank must call)."""
    full = gather_full_state(model, dtype)
    if full:
        save_hf_checkpoint(path, args, full, dtype=dtype)


# --- DCP model folders ----------------------------------------------------------------------------------------------

def check_model_fits(path, saved: dict, shapes: dict[str, torch.Size], model_name: str, partial: bool = False,
                     prefix: str = "model.", optional: tuple[str, ...] = ()) -> None:
    """ConfigError unless the DCP checkpoint at `path` (its metadata `saved`) holds exactly this model's tensors
    under `prefix`.

    `partial`: this rank holds only some pipeline stages, so the other stages' tensors are expected there too.
    `optional`: names that may be absent (the output copy of a tied embedding).
    """
    made_by = (read_marker(path) or {}).get("model")
    origin = f" (it was saved from {made_by})" if made_by else ""
    for name, shape in shapes.items():
        md = saved.get(f"{prefix}{name}")
        if md is None and name in optional:
            continue
        if not isinstance(md, TensorStorageMetadata) or tuple(md.size) != tuple(shape):
            there = "missing" if md is None else f"of shape {tuple(md.size)}"
            raise ConfigError(f"checkpoint {path} does not fit model {model_name}: {name} is {there} there, "
                              f"of shape {tuple(shape)} here{origin}; load a checkpoint of this model")
    extra = sorted(k for k in saved if k.startswith(prefix) and k[len(prefix):] not in shapes
                   and isinstance(saved[k], TensorStorageMetadata))
    if extra and not partial:
        raise ConfigError(f"checkpoint {path} does not fit model {model_name}: it has {extra[0]} and "
                          f"{len(extra) - 1} more tensors this model lacks{origin}; load a checkpoint of this model")


def load_dcp_weights(model: nn.Module, path, model_name: str | None = None) -> None:
    """Read the model tensors of a DCP folder into `model`: one process, or this rank's shards of a sharded model
    (DCP reshards any saved layout). The tensors are those under `model.` (as the checkpointer saves them), or
    unprefixed (`dcp.save(model.state_dict())`). ConfigError when the folder does not hold this model."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    model_name = model_name or f"of {model.args.n_layers} layers and dim {model.args.dim}"
    prefix = "model." if any(key.startswith("model.") for key in saved) else ""
    ours = model.state_dict()
    tied = ("output.weight",) if model.args.tie_word_embeddings else ()
    check_model_fits(path, saved, {name: t.shape for name, t in ours.items()}, model_name, prefix=prefix,
                     optional=tied)
    request = {f"{prefix}{name}": tensor for name, tensor in ours.items() if f"{prefix}{name}" in saved}
    # Copies into our tensors (this rank's shards of the DTensors), casting the dtype.
    dcp.load(request, checkpoint_id=str(path), no_dist=not dist.is_initialized())


def read_dcp_model(path) -> dict[str, Tensor]:
    """The full `model.*` tensors of a DCP folder (full checkpoint or model-only), names without `model.`, read in
    one process without a process group. Raises ValueError when there are none."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    model = {key.removeprefix("model."): torch.empty(md.size, dtype=md.properties.dtype)
             for key, md in metadata.items() if key.startswith("model.") and isinstance(md, TensorStorageMetadata)}
    if not model:
        raise ValueError(f"{path} holds no model.* tensors; is it a checkpoint of this trainer?")
    dcp.load({"model": model}, checkpoint_id=str(path), no_dist=True)
    return model


def save_dcp_model(path, sd: dict[str, Tensor], info: dict) -> None:
    """Write full tensors as a model-only DCP folder (one process) and mark it complete with `info`."""
    dcp.save({"model": sd}, checkpoint_id=str(path), no_dist=True)
    write_marker(path, {**info, "model_only": True, "format": "dcp"})
