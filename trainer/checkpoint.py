"""Checkpoints on torch.distributed.checkpoint (DCP): resume (with a fall back past a corrupt checkpoint), periodic
and async saves, keep_latest_k, the final export, and a save on SIGTERM/SIGINT. What a full checkpoint holds and
how it maps onto the live objects is checkpoint_state.py's; the folders and markers, checkpoint_files.py's.

Layout under {job.dump_folder}/{checkpoint.folder}:

    step-N/          a full checkpoint: one DCP save whose keys are
                       model.*            parameters by name, sharded as trained (DCP reshards them on load)
                       optimizer.*        optimizer state by parameter name (get_state_dict)
                       lr_scheduler.*     the LambdaLR state
                       train_state.*      step, tokens_seen (and any other entry of `states`, under its name)
                       dataloader.dp{r}   the StatefulDataLoader state of data-parallel rank r (pickled)
                       rng.rank{r}        the RNG states of global rank r (pickled)
                     complete.json        the marker: written last, by rank 0, once every rank's data is on disk
    export/step-N/   the final model-only save (last_save_model_only): DCP in export_dtype, or an HF folder

A folder without the marker is a save that did not finish: it is never loaded, and it is replaced when that step is
saved again. A folder with it is never written into again. keep_latest_k deletes only older complete checkpoints,
and only once a newer one is complete. A run resumed with another data-parallel degree gets its data position
resharded exactly (resume_position), and so is one resumed with another number of loader workers; exclude_from_loading = ["dataloader"] restarts the data instead.
"""

import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from trainer.checkpoint_files import (MARKER, STEP_RE, checkpoint_folder, complete_steps, folder_bytes, plan_load,
                                      read_marker, write_marker)
from trainer.checkpoint_integrity import ChecksummedWriter, check_file, files_to_check, metadata_record
from trainer.checkpoint_state import CheckpointedState, dcp_cause
from trainer.config import ConfigError, JobConfig
from trainer.weights import load_hf_weights, save_hf_weights


@dataclass
class _PendingSave:
    """An async save in flight; `done` is set on rank 0 once its marker is written (at once on other ranks)."""

    future: object
    path: Path
    info: dict
    start: float
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class CheckpointError(ConfigError):
    """A checkpoint that cannot be written or loaded (a full disk, a corrupt folder): every rank raises it alike,
    and the run ends with its one line, like a mistake in the config."""


class Checkpointer:
    """Saves and restores everything a resumed run needs to continue exactly. Inert when checkpoint.enable is
    false.

    `model_parts`: this rank's model, one module per pipeline stage it runs; `states`: further train state by
    checkpoint key, each with state_dict()/load_state_dict() (the loop's {"train_state": TrainState}).
    """

    def __init__(self, cfg: JobConfig, model_parts: list[nn.Module], optimizer, lr_scheduler, dataloader,
                 states: dict[str, Stateful], dims, model_args, device: torch.device, log):
        self.cfg, self.c, self.log = cfg, cfg.checkpoint, log
        self.model_args = model_args
        self.state = CheckpointedState(model_parts, optimizer, lr_scheduler, dataloader, states, dims,
                                       f"{cfg.model.name} {cfg.model.flavor}", log)
        self.folder = checkpoint_folder(cfg)
        self.rank = self.state.rank
        self._pending: _PendingSave | None = None
        self._saved: set[Path] = set()
        self._signal: str | None = None
        self._old_handlers: dict = {}
        self._async_pg = self._flag_pg = self._stager = None
        if not self.c.enable:
            return
        if self.c.async_mode != "disabled" and dist.is_initialized():
            # The writer thread's collectives must not interleave with FSDP's on the default group.
            self._async_pg = dist.new_group(backend="gloo")
        if self.c.async_mode == "async_with_pinned_mem":
            if device.type == "cuda":
                self._stager = DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False,
                                                            use_async_staging=False, use_non_blocking_copy=False))
            else:
                log("checkpoint: async_with_pinned_mem stages into pinned memory for CUDA copies; on CPU it is async")
        if dist.is_initialized() and dist.get_backend() != "gloo":
            # agree on a stop signal and on checkpoint decisions without a device sync
            self._flag_pg = dist.new_group(backend="gloo")
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    # --- resume ------------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Restore load_step, else this run's newest complete checkpoint, else initial_load_path; else do nothing."""
        try:
            self._load()
        except BaseException:
            self.close()  # the run ends here: give SIGTERM/SIGINT back their usual meaning
            raise

    def _plan(self) -> tuple:
        """Rank 0: the checkpoint to load (plan_load), and the complete ones before it, newest first, to fall back
        to when it turns out corrupt (only when resuming without a load_step)."""
        plan = plan_load(self.cfg)
        if plan is None or not plan.resume or self.c.load_step >= 0:
            return plan, []
        steps = complete_steps(self.folder)
        return plan, [steps[s] for s in sorted(steps, reverse=True) if steps[s] != plan.path]

    def _load(self) -> None:
        plan, older = self._on_rank0(self._plan, "choosing the checkpoint to load")  # read from disk once, by rank 0
        if plan is None:
            return
        start = time.perf_counter()
        if plan.hf:
            try:
                load_hf_weights(self.state.model, plan.path, self.model_args)
            except ValueError as e:
                raise ConfigError(f"checkpoint.initial_load_path = {str(plan.path)!r}: {e}") from None
            parts = ["model (HF)"]
        else:
            while (problem := self._verify(plan.path)) is not None:
                if not older:
                    fix = "set checkpoint.load_step to another complete step, or -1 for the newest that loads" if self.c.load_step >= 0 else \
                        f"move it out of {self.folder} to start from checkpoint.initial_load_path or from scratch"
                    raise CheckpointError(f"checkpoint {plan.path} is corrupt: {problem}; {fix}")
                self._set_aside(plan.path, problem, older[0])
                plan.path = older.pop(0)
            parts = ["model"] if plan.model_only else \
                [p for p in self.state.parts() if p not in self.c.exclude_from_loading]
            parts = self.state.load(plan.path, parts)
        self.log(f"checkpoint: {'resumed from' if plan.resume else 'initial load from'} {plan.path} "
                 f"({', '.join(parts)}) in {time.perf_counter() - start:.2f}s")

    def _verify(self, path: Path) -> str | None:
        """What makes the DCP checkpoint at `path` unloadable, or None. Rank 0 reads its metadata; the ranks then
        split its data files and check sizes and CRC-32s (each reads about 1/world of the checkpoint)."""
        def listing():
            files, problem = files_to_check(path)
            return files, problem, bool((read_marker(path) or {}).get("checksums"))

        files, problem, checksums = self._on_rank0(listing, f"checking {path}")
        if problem is not None:
            return problem
        world = dist.get_world_size() if dist.is_initialized() else 1
        found = []
        for name, needed in files[self.rank::world]:
            try:
                found.append(check_file(path, name, needed, checksums))
            except OSError as e:
                found.append(f"{name} cannot be read ({type(e).__name__}: {e})")
        found = [p for p in found if p]
        if dist.is_initialized():
            every = [None] * world
            dist.all_gather_object(every, found, group=self._flag_pg)
            found = [p for rank_found in every for p in rank_found]
        return None if not found else found[0] + (f" (and {len(found) - 1} more files)" if len(found) > 1 else "")

    def _set_aside(self, path: Path, problem: str, older: Path) -> None:
        """A complete checkpoint found corrupt is renamed step-N.corrupt (kept for a look, never loaded or deleted
        by us), so that the run can save step N again; the resume falls back to `older`."""
        def rename():
            target, n = path.with_name(path.name + ".corrupt"), 1
            while target.exists():
                n += 1
                target = path.with_name(f"{path.name}.corrupt{n}")
            path.rename(target)
            return target

        target = self._on_rank0(rename, f"setting aside {path}")
        self.log(f"checkpoint: {path} is corrupt ({problem}); moved to {target.name}, resuming from {older} instead")

    # --- save --------------------------------------------------------------------------------------------------

    def save(self, step: int, *, last: bool = False, force: bool = False) -> None:
        """Call after every step. Saves a full checkpoint when due (every `interval` steps, after step 1 with
        enable_first_step_checkpoint, or `force`d by a stop signal); with `last` (after the final step) the final
        save: a model-only export (last_save_model_only) or a full checkpoint."""
        if not self.c.enable or self.c.load_only:
            return
        if last:
            if self.c.last_save_model_only:
                self._export(step)
            else:
                self._save_full(step, asynchronous=False)
        elif force or step % self.c.interval == 0 or (step == 1 and self.c.enable_first_step_checkpoint):
            self._save_full(step, asynchronous=self.c.async_mode != "disabled" and not force)

    def _info(self, step: int, model_only: bool, fmt: str) -> dict:
        state = self.state
        return {"step": step, "model": state.model_name, "model_only": model_only, "format": fmt,
                "dp_degree": state.dp_degree, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "seq_len": self.cfg.training.seq_len, **{name: obj.state_dict() for name, obj in state.states.items()}}

    def _claim(self, path: Path) -> bool:
        """Make `path` ready for a new save. False (skip) when it is complete already: never overwritten. A partial
        save left by a killed run is removed first.

        Every rank must take the same decision, or their DCP collectives no longer match: a path this run saved is
        known from in-process state alike on every rank; for one left by an earlier run, rank 0 looks at the disk
        (where another rank may not see rank 0's marker yet) and tells the others."""
        if path in self._saved:
            return False

        def claim() -> bool:
            if (path / MARKER).is_file():
                return False
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            return True

        claimed = self._on_rank0(claim, f"preparing {path}")  # the broadcast is also the barrier after mkdir
        if not claimed:
            self.log(f"checkpoint: {path} is complete already; not overwritten")
        return claimed

    def _on_rank0(self, decide, what: str):
        """`decide()` evaluated on rank 0 and broadcast (on gloo), so every rank acts on the same answer. What it
        raises there is raised on every rank: a ConfigError as it is, anything else as a CheckpointError naming
        `what` and the cause; no rank is left waiting in a collective for one that failed."""
        box = [None]
        if self.rank == 0:
            try:
                box[0] = ("ok", decide())
            except ConfigError as e:
                box[0] = (type(e), str(e))
            except Exception as e:
                box[0] = (CheckpointError, f"checkpoint: {what} failed: {dcp_cause(e)}")
        if dist.is_initialized():
            dist.broadcast_object_list(box, src=0, group=self._flag_pg)
        kind, value = box[0]
        if kind != "ok":
            raise kind(value)
        return value

    def _save_full(self, step: int, asynchronous: bool) -> None:
        path = self.folder / f"step-{step}"
        self.wait()  # one save at a time: the next one starts when the previous one is complete
        if not self._claim(path):
            return
        start, state, info = time.perf_counter(), self.state.state_dict(), self._info(step, False, "dcp")
        if not asynchronous:
            try:
                dcp.save(state, storage_writer=ChecksummedWriter(str(path)))
            except CheckpointException as e:  # raised on every rank, whichever rank's write failed
                raise self._save_failed(path, dcp_cause(e)) from None
            # dcp.save returns on rank 0 only after every rank's write results reached it and .metadata is written.
            self._on_rank0(lambda: self._complete(path, info, start), f"completing {path}")
            self._saved.add(path)
            return
        # The state is copied to fresh CPU memory (staged) before async_save returns, so training may go on.
        future = dcp.async_save(state, storage_writer=ChecksummedWriter(str(path)), process_group=self._async_pg,
                                async_stager=self._stager)
        self._pending = pending = _PendingSave(future, path, info, start)
        self._saved.add(path)
        if self.rank == 0:
            # Rank 0's future completes only after every rank's writes did (DCP gathers them to write .metadata).
            future.add_done_callback(lambda _: self._complete_pending(pending))
        else:
            pending.done.set()
        self.log(f"checkpoint: {path.name} staged in {time.perf_counter() - start:.2f}s; writing in the background")

    def _complete_pending(self, pending: _PendingSave) -> None:
        """Rank 0, in the writer thread: mark the async save complete as soon as it is."""
        try:
            pending.future.result()
            self._complete(pending.path, pending.info, pending.start)
        except BaseException as e:  # raised in the training thread by wait()
            pending.error = e
        finally:
            pending.done.set()

    def _save_failed(self, path: Path, cause: str) -> CheckpointError:
        newest = complete_steps(self.folder)
        kept = f"{newest[max(newest)]} is the newest complete checkpoint" if newest else "no complete checkpoint"
        # A full disk shows as ENOSPC, or as a torch.save "unexpected pos" error when it fills inside a pickle.
        free = shutil.disk_usage(self.folder).free / 2**20 if self.folder.exists() else float("nan")
        return CheckpointError(f"checkpoint: saving {path} failed ({cause}); it is left unmarked and is never "
                               f"loaded ({kept}); {free:.0f} MiB are free there: free space or fix the storage "
                               f"under {self.folder}, then resume")

    def _complete(self, path: Path, info: dict, start: float, purge: bool = True) -> None:
        """Rank 0: write the marker, then delete what keep_latest_k no longer keeps."""
        size = folder_bytes(path)
        if (path / ".metadata").is_file():
            info = {**info, **metadata_record(path)}
        write_marker(path, {**info, "bytes": size, "save_seconds": round(time.perf_counter() - start, 3)})
        self.log(f"checkpoint: saved {path} ({size / 2**20:.1f} MiB) in {time.perf_counter() - start:.2f}s")
        if purge and self.c.keep_latest_k > 0:
            steps = complete_steps(self.folder)
            for step in sorted(steps)[:-self.c.keep_latest_k]:
                (steps[step] / MARKER).unlink()  # first, so a half-deleted folder never looks complete
                shutil.rmtree(steps[step], ignore_errors=True)
            for child in self.folder.iterdir():  # partial saves of killed runs, older than a complete one
                match = STEP_RE.fullmatch(child.name)
                if match and int(match.group(1)) < max(steps) and int(match.group(1)) not in steps:
                    shutil.rmtree(child, ignore_errors=True)

    def _export(self, step: int) -> None:
        """The final model-only save in export_dtype: DCP, or an HF folder with last_save_in_hf."""
        path = self.folder / "export" / f"step-{step}"
        if not self._claim(path):
            return
        start, dtype = time.perf_counter(), getattr(torch, self.c.export_dtype)
        if self.c.last_save_in_hf:
            save_hf_weights(self.state.model, path, self.model_args, dtype)  # rank 0 writes every file
        else:
            model_sd = {name: value.to(dtype) for name, value in get_model_state_dict(self.state.model).items()}
            try:
                dcp.save({"model": model_sd}, storage_writer=ChecksummedWriter(str(path)))
            except CheckpointException as e:
                raise self._save_failed(path, dcp_cause(e)) from None
        info = self._info(step, True, "hf" if self.c.last_save_in_hf else "dcp")
        self._on_rank0(lambda: self._complete(path, info, start, purge=False), f"completing {path}")
        self._saved.add(path)

    def wait(self) -> None:
        """Block until the async save in flight, if any, is complete on every rank; raise on every rank if it
        failed on any (the write on some rank, or rank 0's marker)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        failure = None
        try:
            pending.future.result()
        except BaseException as e:
            failure = e
        pending.done.wait()
        failure = failure or pending.error
        if dist.is_initialized():  # the writer threads are done: the flag group is free
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, failure and dcp_cause(failure), group=self._flag_pg)
            cause = next((c for c in every if c), None)
        else:
            cause = failure and dcp_cause(failure)
        if cause is not None:
            raise self._save_failed(pending.path, cause)

    # --- stop signals ------------------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self._signal = signal.Signals(signum).name

    def stop_requested(self) -> bool:
        """Whether any rank got SIGTERM or SIGINT. Every rank calls it at the same point of every step (one tiny
        all-reduce), so all stop after the same step."""
        if not self.c.enable:
            return False
        stop = self._signal is not None
        if dist.is_initialized():
            flag = torch.tensor([int(stop)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._flag_pg)
            stop = bool(flag.item())
        return stop

    def close(self) -> None:
        """Restore the signal handlers and free the stager. Does not wait: after an error an unfinished async save
        stays unmarked, so it is never loaded (the normal path calls wait() at the end of training)."""
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}
        if self._stager is not None:
            self._stager.close()
            self._stager = None
