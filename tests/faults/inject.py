"""Faults injected into the ranks of a real training run (tests/faults): SIGKILL of one rank at one moment.

    kind           where the rank dies                                                  ranks   steps
    forward        in the forward of step N                                             any     any
    backward       in the backward of step N (a gradient hook of the last block)       any     any
    optimizer      as the optimizer starts step N (after the gradient all-reduces)      any     any
    sync_save      in the data write of step N's synchronous save (before or after)    any     saved
    async_staging  while step N's asynchronous save copies the state                   any     saved
    async_write    in the background write of step N's asynchronous save               any     saved
    marker         writing step N's complete.json (torn: half a temporary file; or      0       saved
                   whole, just before anything after it)
    purge          keep_latest_k deleting an older checkpoint after step N's save      0       purging

    disk_full      not a kill: from step N's save on, every data file write on the rank (RANK -1: on every rank)
                   fails with ENOSPC halfway through, as on a full disk

Rank 0 also appends each step whose marker it wrote to a journal: what was complete when the rank died, which the
harness compares with what the disk holds afterwards.
"""

import contextlib
import errno
import os
import shutil
import signal
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem

import trainer.checkpoint as checkpoint_module
from trainer.checkpoint_integrity import ChecksummedWriter
from trainer.train import LoopObserver

KINDS = ("forward", "backward", "optimizer", "sync_save", "async_staging", "async_write", "marker", "purge")
OTHER_KINDS = ("disk_full",)
SAVE_KINDS = {"sync_save", "async_staging", "async_write", "marker", "purge"}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class FaultInjector(LoopObserver):
    """`spec` = "KIND:RANK:STEP:VARIANT" (VARIANT: before/after for sync_save, torn/whole for marker, else -)."""

    def __init__(self, spec: str, journal: str):
        kind, rank, step, self.variant = spec.split(":")
        assert kind in KINDS + OTHER_KINDS, kind
        self.kind, self.rank, self.step, self.journal = kind, int(rank), int(step), Path(journal)
        self.training = 1  # the step being trained
        self.saving = 0  # the newest step handed to the checkpointer
        self._patch()

    def _here(self) -> bool:
        return self.rank == -1 or (dist.get_rank() if dist.is_initialized() else 0) == self.rank

    def _armed(self, kind: str, step: int) -> bool:
        return self.kind == kind and step >= self.step and self._here()

    # --- the training step -------------------------------------------------------------------------------------

    def before_training(self, trainer):
        self.training = trainer.step + 1
        model = trainer.model.parts[0]
        model.register_forward_pre_hook(lambda *_: die() if self._armed("forward", self.training) else None)

        def on_block_output(module, args, output):
            if self._armed("backward", self.training) and output.requires_grad:
                output.register_hook(lambda grad: die())

        model.layers[list(model.layers)[-1]].register_forward_hook(on_block_output)
        trainer.optimizer.register_step_pre_hook(
            lambda *_: die() if self._armed("optimizer", self.training) else None)

    def after_step(self, trainer, step, loss):
        self.saving, self.training = step, step + 1

    # --- checkpointing -----------------------------------------------------------------------------------------

    def _patch(self) -> None:
        injector = self
        write_data, stage, write_marker, rmtree = (ChecksummedWriter.write_data, dcp.FileSystemWriter.stage,
                                                   checkpoint_module.write_marker, shutil.rmtree)

        def faulty_write_data(writer, plan, planner):
            kind = "sync_save" if injector.kind == "sync_save" else "async_write"
            if injector._armed(kind, injector.saving) and injector.variant != "after":
                die()
            future = write_data(writer, plan, planner)
            if injector._armed(kind, injector.saving):
                die()  # the data is written, its checksums not yet
            return future

        def faulty_stage(writer, state_dict):
            if injector._armed("async_staging", injector.saving):
                die()
            return stage(writer, state_dict)

        def journaled_write_marker(folder, info):
            if injector._armed("marker", info["step"]) and injector.variant == "torn":
                (folder / "complete.json.tmp").write_text('{"step": ')
                die()
            write_marker(folder, info)
            if folder.parent.name != "export":
                with open(injector.journal, "a") as f:
                    f.write(f"{info['step']}\n")
                    f.flush()
                    os.fsync(f.fileno())
            if injector._armed("marker", info["step"]):
                die()

        def faulty_rmtree(path, *args, **kwargs):
            files = sorted(Path(path).glob("*")) if Path(path).is_dir() else []
            if files and injector._armed("purge", injector.saving):
                for f in files[: len(files) // 2]:
                    f.unlink()
                die()
            return rmtree(path, *args, **kwargs)

        class FullDiskStream:
            """A file on a full disk: the first write goes halfway, then ENOSPC."""

            def __init__(self, stream):
                self.stream = stream

            def write(self, data) -> int:
                data = memoryview(data).cast("B")
                self.stream.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def __getattr__(self, name):
                return getattr(self.stream, name)

        create_stream = FileSystem.create_stream

        @contextlib.contextmanager
        def full_disk_stream(fs, path, mode):
            with create_stream(fs, path, mode) as stream:
                full = "w" in mode and Path(path).suffix == ".distcp" and injector._armed("disk_full", injector.saving)
                yield FullDiskStream(stream) if full else stream

        FileSystem.create_stream = full_disk_stream
        ChecksummedWriter.write_data = faulty_write_data
        dcp.FileSystemWriter.stage = faulty_stage
        checkpoint_module.write_marker = journaled_write_marker
        shutil.rmtree = faulty_rmtree


class LossLog(LoopObserver):
    """Rank 0 appends "step loss" (the loss's repr) to a file after every step, so a run that is killed still
    leaves the losses it logged (needs metrics.log_freq = 1)."""

    def __init__(self, path: str):
        self.path = path

    def after_step(self, trainer, step, loss):
        if trainer.dist.rank == 0:
            with open(self.path, "a") as f:
                f.write(f"{step} {loss!r}\n")


def fault_train(out: str, argv: list[str]) -> int:
    """The `fault` job: `SPEC JOURNAL CONFIG...`: the training entry point with a FaultInjector (SPEC "none" for
    none) and a LossLog into `out`."""
    from trainer import train as train_module

    spec, journal, argv = argv[0], argv[1], argv[2:]
    observers = (LossLog(out),) if spec == "none" else (LossLog(out), FaultInjector(spec, journal))
    return train_module.run(argv, observers=observers)
