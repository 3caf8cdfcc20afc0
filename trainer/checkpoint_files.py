"""The folder side of checkpoints, which needs no training state: the completeness marker, the step folders of a
run, and the checkpoint a run starts from. Used by checkpoint.py, weights.py, DRY_RUN and the scripts; the folder
layout is described in checkpoint.py.
"""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from trainer.config import ConfigError, JobConfig


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


def step_folders(folder: Path, complete_only: bool = True) -> dict[int, Path]:
    """step -> step-N folder in `folder`: the complete ones (marked), or with complete_only=False every one that
    holds a DCP save (.metadata) or an HF model (config.json)."""
    found = {}
    for child in folder.iterdir() if folder.is_dir() else ():
        match = STEP_RE.fullmatch(child.name)
        if match and ((child / MARKER).is_file() if complete_only else
                      (child / ".metadata").is_file() or (child / "config.json").is_file()):
            found[int(match.group(1))] = child
    return found


def complete_steps(folder: Path) -> dict[int, Path]:
    """step -> step-N folder, for every complete checkpoint in `folder`."""
    return step_folders(folder)


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
        # torchtitan writes a run's final model-only save into checkpoint/step-N itself; ours is in export/step-N.
        exported = plan.path.parent / "export" / plan.path.name
        if not (plan.path / needed).is_file() and (exported / needed).is_file():
            plan.path = exported
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
