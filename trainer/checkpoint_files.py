"""The file side of checkpoints, which needs no training state: finding the checkpoint a run starts from, the
completeness marker, whether a checkpoint fits the model, and moving weights in and out of HF model folders
(config.json + safetensors) and model-only DCP folders. Used by checkpoint.py, DRY_RUN and
scripts/convert_checkpoint.py; the folder layout is described in checkpoint.py.
"""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor, distribute_tensor

from trainer.config import ConfigError, JobConfig
from trainer.models.hf import from_hf_state_dict, load_hf_checkpoint, save_hf_checkpoint
from trainer.models.llama import ModelArgs


MARKER = "complete.json"
"""Written last into a checkpoint folder, by rank 0, once everything else in it is on disk."""
STEP_RE = re.compile(r"step-(\d+)")


def write_marker(folder: Path, info: dict) -> None:
    """Mark `folder` complete: the JSON goes to a temporary name first, so the marker is whole or absent."""
    tmp = folder / f"{MARKER}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(info, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MARKER)


def read_marker(folder: Path) -> dict | None:
    """The marker of a complete checkpoint folder, or None while it is missing (the save did not finish)."""
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def checkpoint_folder(cfg: JobConfig) -> Path:
    """{job.dump_folder}/{checkpoint.folder}."""
    return Path(cfg.job.dump_folder) / cfg.checkpoint.folder


def complete_steps(folder: Path) -> dict[int, Path]:
    """step -> step-N folder, for every complete full checkpoint in `folder`."""
    found = {}
    for child in folder.iterdir() if folder.is_dir() else ():
        match = STEP_RE.fullmatch(child.name)
        if match and (child / MARKER).is_file():
            found[int(match.group(1))] = child
    return found


@dataclass
class LoadPlan:
    """The checkpoint a run starts from."""

    path: Path
    resume: bool  # this run's own folder; else initial_load_path
    model_only: bool
    hf: bool


def plan_load(cfg: JobConfig) -> LoadPlan | None:
    """Where a run of `cfg` starts from, read from the filesystem alone (DRY_RUN uses it too): load_step, else the
    newest complete checkpoint of this run, else initial_load_path, else None. ConfigError when the named one is not
    there."""
    c = cfg.checkpoint
    if not c.enable:
        return None
    folder = checkpoint_folder(cfg)
    steps = complete_steps(folder)
    if c.load_step >= 0:
        if c.load_step not in steps:
            have = ", ".join(map(str, sorted(steps))) or "none"
            raise ConfigError(f"checkpoint.load_step = {c.load_step}: {folder}/step-{c.load_step} is not a complete "
                              f"checkpoint (complete steps: {have}); pick one of those or -1 for the newest")
        plan = LoadPlan(steps[c.load_step], True, False, False)
    elif steps:
        plan = LoadPlan(steps[max(steps)], True, False, False)
    elif not c.initial_load_path:
        return None
    else:
        plan = LoadPlan(Path(c.initial_load_path), False, c.initial_load_model_only, c.initial_load_in_hf)
        needed = "config.json" if plan.hf else ".metadata"
        if not (plan.path / needed).is_file():
            kind = "an HF model folder (config.json + safetensors)" if plan.hf else \
                "a DCP checkpoint folder such as step-N (or set initial_load_in_hf = true for an HF folder)"
            raise ConfigError(f"checkpoint.initial_load_path = {c.initial_load_path!r}: no {needed} there; "
                              f"point it at {kind}")
    made_by, model_name = (read_marker(plan.path) or {}).get("model"), f"{cfg.model.name} {cfg.model.flavor}"
    if made_by and made_by != model_name:  # the same shapes can still be another model (e.g. another RoPE base)
        raise ConfigError(f"checkpoint {plan.path} was saved from model {made_by}, this run is {model_name}; "
                          f"set model.name/model.flavor to match or use another checkpoint.folder")
    return plan


def folder_bytes(path: Path) -> int:
    """Bytes of every file under `path`."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_model_fits(path: Path, saved: dict, shapes: dict[str, torch.Size], model_name: str,
                     partial: bool = False) -> None:
    """ConfigError unless the DCP checkpoint at `path` (its metadata `saved`) holds exactly this model's tensors.

    `partial`: this rank holds only some pipeline stages, so the other stages' tensors are expected there too.
    """
    made_by = (read_marker(path) or {}).get("model")  # plan_load has checked that it is this model
    origin = f" (it was saved from {made_by})" if made_by else ""
    for name, shape in shapes.items():
        md = saved.get(f"model.{name}")
        if not isinstance(md, TensorStorageMetadata) or tuple(md.size) != tuple(shape):
            there = "missing" if md is None else f"of shape {tuple(md.size)}"
            raise ConfigError(f"checkpoint {path} does not fit model {model_name}: {name} is {there} there, "
                              f"of shape {tuple(shape)} here{origin}; load a checkpoint of this model")
    extra = sorted(k for k in saved if k.startswith("model.") and k[len("model."):] not in shapes)
    if extra and not partial:
        raise ConfigError(f"checkpoint {path} does not fit model {model_name}: it has {extra[0]} and "
                          f"{len(extra) - 1} more tensors this model lacks{origin}; load a checkpoint of this model")


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


@torch.no_grad()
def copy_full_state_into(model: nn.Module, full: dict[str, Tensor]) -> None:
    """Copy full (unsharded) tensors into `model`'s parameters; each rank keeps its own shard, with no communication,
    as init_weights does. `full` must name every parameter (from_hf_state_dict guarantees it)."""
    for name, param in model.named_parameters():
        value = full[name]
        if isinstance(param, DTensor):
            value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                      src_data_rank=None)  # every rank holds the full value: slice locally
            param.to_local().copy_(value.to_local())
        else:
            param.copy_(value)


def load_hf_weights(model: nn.Module, path: Path, args: ModelArgs) -> None:
    """Load an HF Llama folder into `model` (sharded or not): every rank reads the files and keeps its shard.

    Raises ValueError naming the problem when the folder is not a Llama of `args`' shape.
    """
    hf_args, hf_sd = load_hf_checkpoint(path)
    mismatch = architecture_mismatch(args, hf_args)
    if mismatch:
        raise ValueError(f"its config.json describes another model ({mismatch}); set model.name/model.flavor to match")
    copy_full_state_into(model, from_hf_state_dict(hf_sd, hf_args))


@torch.no_grad()
def full_model_state(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
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


def save_hf_weights(model: nn.Module, path: Path, args: ModelArgs, dtype: torch.dtype) -> None:
    """Write `model` as an HF Llama folder that transformers loads (rank 0 writes; every rank must call)."""
    full = full_model_state(model, dtype)
    if full:
        save_hf_checkpoint(path, args, full, dtype=dtype)


def read_dcp_model(path: Path) -> dict[str, Tensor]:
    """The full `model.*` tensors of a DCP folder (full checkpoint or model-only), names without `model.`, read in
    one process without a process group. Raises ValueError when there are none."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    model = {key.removeprefix("model."): torch.empty(md.size, dtype=md.properties.dtype)
             for key, md in metadata.items() if key.startswith("model.") and isinstance(md, TensorStorageMetadata)}
    if not model:
        raise ValueError(f"{path} holds no model.* tensors; is it a checkpoint of this trainer?")
    dcp.load({"model": model}, checkpoint_id=str(path), no_dist=True)
    return model


def save_dcp_model(path: Path, sd: dict[str, Tensor], info: dict) -> None:
    """Write full tensors as a model-only DCP folder (one process) and mark it complete with `info`."""
    dcp.save({"model": sd}, checkpoint_id=str(path), no_dist=True)
    write_marker(path, {**info, "model_only": True, "format": "dcp"})
