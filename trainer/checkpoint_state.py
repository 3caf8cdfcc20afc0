"""What a full checkpoint holds, mapped onto this rank's live objects in both directions: the state dict a save
writes, and the load that restores it (the keys are listed in checkpoint.py's layout). Model and optimizer go by
parameter name, so any layout reshards to any other; the data position is resharded to another data-parallel degree
or worker count; RNG states go by global rank. When and where checkpoints are written and which one is read is
checkpoint.py's.
"""

import pickle
import random
import re
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict, set_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

from trainer.config import ConfigError
from trainer.data.dataloader import resume_position, saved_workers
from trainer.weights import check_model_fits

# Optimizer state keyed by parameter name, param_groups included: unflattened, param_groups is a list whose
# "group 0" every pipeline stage has, and those collide in one DCP checkpoint.
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

DATALOADER_RE = re.compile(r"dataloader\.dp(\d+)")
# DCP warns on every save and load of a one-process run that it assumes one process, which is what we mean.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _rng_state() -> dict:
    """Python's and torch's CPU RNG states, and the current CUDA device's (this rank's GPU, which init_distributed
    made current) without the other visible GPUs': restoring those by index failed where fewer are visible."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def dcp_cause(e: BaseException) -> str:
    """The first failure inside a DCP exception (which lists every rank's traceback), as one line."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


class ModelPartsView(nn.Module):
    """This rank's pipeline stages as one module with the unsplit model's parameter names.

    Checkpointing saves and loads by name, so a stage-split run reshards to and from any other layout. Holds
    references only: the stages keep running on their own.
    """

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleDict()
        for part in parts:
            for name in ("tok_embeddings", "norm", "output"):
                if getattr(part, name, None) is not None:
                    setattr(self, name, getattr(part, name))
            self.layers.update(part.layers)


class CheckpointedState:
    """This rank's share of a full checkpoint: the model (its pipeline stages seen as one, ModelPartsView), the
    optimizer, the lr schedule, the data position of its data-parallel rank, its RNG states, and `states` (further
    train state by checkpoint key, each with state_dict()/load_state_dict()). `model_name` names the model in
    errors about a checkpoint that does not fit."""

    def __init__(self, model_parts: list[nn.Module], optimizer, lr_scheduler, dataloader,
                 states: dict[str, Stateful], dims, model_name: str, log):
        self.model = model_parts[0] if len(model_parts) == 1 else ModelPartsView(model_parts)
        self.optimizer, self.lr_scheduler, self.dataloader, self.states = optimizer, lr_scheduler, dataloader, states
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.dp_rank, self.dp_degree = dims.coordinate("dp")
        self.pipelined = dims.pp > 1  # this rank holds only some stages of the model
        self.model_name, self.log = model_name, log

    def parts(self) -> tuple[str, ...]:
        """The top-level keys of a full checkpoint, in load order."""
        return ("model", "optimizer", "lr_scheduler", "dataloader", *self.states, "rng")

    def state_dict(self) -> dict:
        """The full checkpoint's state of this rank, by top-level key (parts())."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=OPTIONS)
        return {"model": model_sd, "optimizer": optim_sd, "lr_scheduler": self.lr_scheduler.state_dict(),
                **{name: obj.state_dict() for name, obj in self.states.items()},
                "dataloader": {f"dp{self.dp_rank}": pickle.dumps(self.dataloader.state_dict())},
                "rng": {f"rank{self.rank}": pickle.dumps(_rng_state())}}

    def load(self, path: Path, parts: list[str]) -> list[str]:
        """Restore `parts` (top-level keys) from the DCP checkpoint at `path` into the live objects; returns the
        parts restored (rng is dropped when `path` holds no RNG state for this rank: saved with fewer ranks). A
        checkpoint that cannot be read or does not fit this run raises a one-line ConfigError."""
        try:
            saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        except Exception as e:
            raise ConfigError(f"checkpoint {path}: unreadable DCP metadata ({dcp_cause(e)}); the folder is corrupt, "
                              f"delete it or pick another with checkpoint.load_step") from None
        for part in parts:
            if part != "rng" and not any(k.startswith(f"{part}.") for k in saved):
                raise ConfigError(f"checkpoint {path} has no {part} state (a model-only save?); start from it with "
                                  f"checkpoint.initial_load_path and initial_load_model_only = true, or add "
                                  f"{part} to checkpoint.exclude_from_loading")
        if "optimizer" in parts:  # first: it creates the optimizer state that the load then fills in
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=OPTIONS)
        else:
            # get_state_dict would create the optimizer state with a zero-gradient step, which leaves Adam's step
            # count at 1: the first real step would then be bias-corrected as the second.
            model_sd, optim_sd = get_model_state_dict(self.model), None
        check_model_fits(path, saved, {name: value.shape for name, value in model_sd.items()}, self.model_name,
                         partial=self.pipelined)

        saved_dp = sorted(int(m.group(1)) for k in saved if (m := DATALOADER_RE.fullmatch(k)))
        same_dp = len(saved_dp) == self.dp_degree
        loader_keys = [f"dp{r}" for r in ([self.dp_rank] if same_dp else saved_dp)]
        rng_key = f"rank{self.rank}"
        if "rng" in parts and f"rng.{rng_key}" not in saved:
            parts.remove("rng")  # saved with fewer ranks: this one keeps its seeded state
        state = {"model": model_sd, "optimizer": optim_sd, "lr_scheduler": self.lr_scheduler.state_dict(),
                 **{name: obj.state_dict() for name, obj in self.states.items()},
                 "dataloader": dict.fromkeys(loader_keys, b""),
                 "rng": {rng_key: b""}}
        state = {part: value for part, value in state.items() if part in parts}
        try:
            dcp.load(state, checkpoint_id=str(path))
        except (Exception, CheckpointException) as e:
            raise ConfigError(f"checkpoint {path} could not be read ({dcp_cause(e)}); it is corrupt or incomplete: "
                              f"delete it or pick another with checkpoint.load_step") from None

        if "model" in state and "optimizer" in state:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=OPTIONS)
        elif "model" in state:
            set_model_state_dict(self.model, state["model"])
        elif "optimizer" in state:
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=OPTIONS)
        if "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        for name, obj in self.states.items():
            if name in state:
                obj.load_state_dict(state[name])
        if "rng" in state:
            _set_rng_state(pickle.loads(state["rng"][rng_key]))
        if "dataloader" in state:
            self._load_dataloader(path, [pickle.loads(state["dataloader"][k]) for k in loader_keys], same_dp)
        return parts

    def _load_dataloader(self, path: Path, states: list[dict], same_dp: bool) -> None:
        workers = self.dataloader.num_workers
        if same_dp and saved_workers(states[0]) == workers:
            self.dataloader.load_state_dict(states[0])
            return
        try:
            position = resume_position(states, self.dp_rank, self.dp_degree)
        except ValueError as e:
            raise ConfigError(f"checkpoint {path}: cannot reshard the data position ({e}); add dataloader to "
                              f"checkpoint.exclude_from_loading to restart the data") from None
        # The loader starts where its dataset is: in this process, or in each worker process it copies it to.
        self.dataloader.dataset.load_state_dict(position)
        self.log(f"checkpoint: data position saved at data-parallel degree {len(states)} with "
                 f"{saved_workers(states[0])} loader workers resharded to {self.dp_degree} with {workers}: no sample "
                 f"is read twice or skipped")
