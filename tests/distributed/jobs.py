"""What a multi-process test runs on every rank: one function per kind of job, `JOB(out, argv) -> exit code`.

A job runs inside a process group that is already up, either in a pooled worker that runs job after job
(tests/distributed/pool.py) or in a one-off torchrun launch (worker.py --job). Rank 0 writes the job's result to
`out` with torch.save (json for `mesh`). Nothing here calls shutdown: the worker ends the process.

    steps        N training steps through Trainer.train_step: losses, grad norms, params after step 1
    train        the real loop (Trainer.train, with its checkpoints): the logged loss of every step; switches
                 --signal-at-step N (the last rank SIGTERMs itself in step N), --kill-at-step N (every rank
                 SIGKILLs itself after step N's checkpoint call), --slow-writes S, --stall-at-step N with
                 --stall-seconds S (the last rank sleeps after step N); the last three in one-off launches only
    validation   the real loop with validation: the logged losses and, per validation, its result, the weights it
                 saw and whether it left the RNG and train mode alone; --dcp DIR saves the final model there
    mesh         the DeviceMesh of a layout, checked against rank arithmetic
    cli          trainer.train.run, as `python -m trainer.train` runs it
    generate     scripts/generate.py's run, as the script runs it (its output on rank 0's stdout)
"""

import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor

from trainer import train as train_module
from trainer.config import load_config
from trainer.parallel_dims import ParallelDims
from trainer.train import LoopObserver, Trainer

ROOT = Path(__file__).resolve().parents[2]


def full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter of the whole model as a full tensor, by its unsplit name (a collective: every rank calls)."""
    state = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone().cpu()
             for part in trainer.model.parts for name, p in part.named_parameters()}
    pipeline = trainer.model.pipeline
    if pipeline is None:
        return state
    # Each pp rank holds only its stages: the union over the pp group is the whole model.
    parts = [None] * trainer.dims.pp
    dist.all_gather_object(parts, state, group=pipeline.group)
    state = {name: t for part in parts for name, t in part.items()}
    if trainer.plan.model_args.tie_word_embeddings:  # the last stage's copy of the tied matrix must equal the first's
        copy = state.pop("output.weight")
        diff = (copy - state["tok_embeddings.weight"]).abs().max().item()
        assert diff == 0, f"the tied output/embedding copies diverged by {diff:.3g}"
    return state


def _save(trainer: Trainer, out: str, record: dict) -> None:
    if trainer.dist.rank == 0:
        torch.save(record, out)


def steps(out: str, argv: list[str]) -> int:
    """Drive Trainer.train_step for training.steps steps."""
    trainer = Trainer(load_config(argv))
    try:
        data_iter = iter(trainer.dataloader)
        losses, grad_norms, params = [], [], None
        for _ in range(trainer.cfg.training.steps):
            loss, grad_norm = trainer.train_step([next(data_iter) for _ in range(trainer.plan.accum_steps)])
            losses.append(trainer.global_loss(loss)[0])
            grad_norms.append(grad_norm.item())
            if trainer.step == 1:
                params = full_state(trainer)
        _save(trainer, out, {"losses": losses, "grad_norms": grad_norms, "params_after_step1": params,
                             "world_size": trainer.dist.world_size})
    finally:
        trainer.close()
    return 0


class LossRecorder(LoopObserver):
    """The logged global loss of every step (needs metrics.log_freq = 1), and the fault switches of `train`."""

    def __init__(self, signal_at: int | None = None, kill_at: int | None = None, stall_at: int | None = None,
                 stall_seconds: float = 0.0):
        self.losses: dict[int, float] = {}
        self.signal_at, self.kill_at, self.stall_at, self.stall_seconds = signal_at, kill_at, stall_at, stall_seconds

    def before_training(self, trainer):
        self.first_step = trainer.step + 1

    def after_step(self, trainer, step, loss):
        assert loss is not None, "recording the logged loss needs metrics.log_freq = 1"
        self.losses[step] = loss
        last_rank = trainer.dist.rank == trainer.dist.world_size - 1
        if step == self.signal_at and last_rank:
            os.kill(os.getpid(), signal.SIGTERM)  # the checkpointer's handler records it: save and stop
        if step == self.stall_at and last_rank:
            time.sleep(self.stall_seconds)  # a hung rank: the others wait in their next collective

    def after_checkpoint(self, trainer, step):
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def _slow_checkpoint_writes(seconds: float) -> None:
    """Checkpoint data files take `seconds` longer to write (a slow disk): an async save is then still in flight."""
    write_data = FileSystemWriter.write_data

    def slow_write_data(self, plan, planner):
        time.sleep(seconds)
        return write_data(self, plan, planner)

    FileSystemWriter.write_data = slow_write_data


def train(out: str, argv: list[str]) -> int:
    """The training entry point (trainer.train.run: its one-line errors and exit codes) with a recorder; rank 0
    writes {"losses": {step: loss}, "first_step": the first step this run trained}."""
    switches = {}
    while argv and argv[0] in ("--signal-at-step", "--kill-at-step", "--slow-writes", "--stall-at-step",
                               "--stall-seconds"):
        switches[argv[0][2:]] = float(argv[1])
        argv = argv[2:]
    if "slow-writes" in switches:
        _slow_checkpoint_writes(switches["slow-writes"])
    recorder = LossRecorder(switches.get("signal-at-step"), switches.get("kill-at-step"),
                            switches.get("stall-at-step"), switches.get("stall-seconds", 0.0))
    code = train_module.run(argv, observers=(recorder,))
    if code == 0 and dist.get_rank() == 0:
        torch.save({"losses": recorder.losses, "first_step": recorder.first_step}, out)
    return code


class ValidationRecorder(LossRecorder):
    """Per validation: the result, the full weights it evaluated, and whether it left RNG and train mode alone."""

    def __init__(self):
        super().__init__()
        self.validations: list[dict] = []
        self._before = None

    def before_validation(self, trainer, step):
        self._before = (full_state(trainer), torch.get_rng_state())

    def after_validation(self, trainer, step, result):
        params, rng = self._before
        self.validations.append({"step": step, "loss": result.loss, "tokens": result.tokens,
                                 "batches": result.batches, "params": params,
                                 "rng_unchanged": torch.equal(rng, torch.get_rng_state()),
                                 "training_mode": all(p.training for p in trainer.model.parts)})


def validation(out: str, argv: list[str]) -> int:
    """Trainer.train with validation; records losses, validations and world_size (--dcp DIR: save the model)."""
    dcp_dir = None
    if argv[:1] == ["--dcp"]:
        dcp_dir, argv = argv[1], argv[2:]
    recorder = ValidationRecorder()
    trainer = Trainer(load_config(argv), observers=(recorder,))
    try:
        trainer.train()
        if dcp_dir is not None:
            dcp.save({"model": get_model_state_dict(trainer.model.model)}, checkpoint_id=dcp_dir)
        _save(trainer, out, {"losses": recorder.losses, "validations": recorder.validations,
                             "world_size": trainer.dist.world_size})
    finally:
        trainer.close()
    return 0


def mesh(out: str, argv: list[str]) -> int:
    """Build the mesh of a layout and check each 1-D sub-mesh's membership with an all-reduce of rank ids."""
    dims = ParallelDims.resolve(load_config(argv).parallelism, dist.get_world_size())
    dims.build_mesh("cpu")
    rank = dist.get_rank()
    # The data-parallel group must contain exactly the ranks that differ only in (dp_replicate, dp_shard):
    # summing each rank's id over it and over the fsdp mesh checks membership, not just sizes.
    report = {}
    for name in ("dp", "dp_cp", "fsdp", "tp", "pp"):
        m = dims.mesh(name)
        members = m.mesh.flatten().tolist()
        if m.ndim == 1:
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=m.get_group())
            assert t.item() == sum(members), (name, t.item(), members)
        report[name] = {"shape": list(m.shape), "members": members}
    report["dp_coordinate"] = list(dims.coordinate("dp"))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    return 0


def cli(out: str, argv: list[str]) -> int:
    """The training entry point's own run (`python -m trainer.train argv`); `out` is unused."""
    return train_module.run(argv)


def generate(out: str, argv: list[str]) -> int:
    """scripts/generate.py with `argv`, as its main runs it (without ending the process); `out` is unused."""
    import importlib.util

    from trainer.distributed import init_distributed

    spec = importlib.util.spec_from_file_location("generate_script", ROOT / "scripts/generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.run(script.parse_args(argv), init_distributed())


def agreed_errors(out: str, argv: list[str]) -> int:
    """trainer.distributed.agreed_errors with a ConfigError on the ranks listed in argv only; rank 0 writes what
    every rank raised."""
    from trainer.config import ConfigError
    from trainer.distributed import agreed_errors as agreed

    failing = {int(r) for r in argv}
    raised = None
    try:
        with agreed():
            if dist.get_rank() in failing:
                raise ConfigError(f"training.dataset_path = '/data/{dist.get_rank()}': no such file")
    except ConfigError as e:
        raised = str(e)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, raised)
    if dist.get_rank() == 0:
        torch.save(every, out)
    return 0


JOBS = {"agreed_errors": agreed_errors, "steps": steps, "train": train, "validation": validation, "mesh": mesh, "cli": cli, "generate": generate}
