"""torch.profiler traces and CUDA memory snapshots on a step schedule: one context manager around the loop.

    with maybe_profile(cfg, rank, device, start_step=trainer.step) as profiler:
        for each step: train_step(...); profiler.step()

Traces: every profiling.profile_freq steps each rank writes
{dump_folder}/{save_traces_folder}/iteration_N/rankR_trace.json (Chrome trace format: Perfetto, chrome://tracing),
after `profiler_warmup` unrecorded and `profiler_active` recorded steps ending at step N. Inside a trace the
steps are the profiler's `ProfilerStep#k` spans, k counting from 0 at start_step. A window cut short by the end
of training is not written, so traces appear only at multiples of profile_freq.

Memory snapshots (CUDA): the allocator history since start, every profile_freq steps and on out-of-memory, as
{dump_folder}/{save_memory_snapshot_folder}/iteration_N[_exit]/rankR_memory_snapshot.pickle.
"""

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from trainer import torch_private
from trainer.config import JobConfig


class _TraceWindows:
    """torch.profiler on a (wait, warmup, active) cycle aligned so each window ends at a multiple of freq."""

    def __init__(self, cfg: JobConfig, rank: int, device: torch.device, start_step: int):
        p = cfg.profiling
        self.folder = Path(cfg.job.dump_folder) / p.save_traces_folder
        self.rank, self.freq, self.start_step = rank, p.profile_freq, start_step
        cycle = torch.profiler.schedule(wait=p.profile_freq - p.profiler_warmup - p.profiler_active,
                                        warmup=p.profiler_warmup, active=p.profiler_active)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        # The profiler counts its own steps from 0; shifting the cycle by start_step keeps windows on global steps
        # after a resume.
        self.profiler = torch.profiler.profile(activities=activities, schedule=lambda s: cycle(s + start_step),
                                               on_trace_ready=self._save, record_shapes=True)

    def _save(self, prof: torch.profiler.profile) -> None:
        step = self.start_step + prof.step_num  # the last step the window recorded
        if step % self.freq:
            return  # training ended inside a window: the profiler flushes it on exit, we drop it
        folder = self.folder / f"iteration_{step}"
        folder.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(folder / f"rank{self.rank}_trace.json"))


class _MemorySnapshots:
    """CUDA allocator history, dumped every freq steps and on out-of-memory."""

    def __init__(self, cfg: JobConfig, rank: int, start_step: int):
        self.folder = Path(cfg.job.dump_folder) / cfg.profiling.save_memory_snapshot_folder
        self.rank, self.freq, self.step_num = rank, cfg.profiling.profile_freq, start_step
        torch_private.record_cuda_memory_history(True)

    def step(self) -> None:
        self.step_num += 1
        if self.step_num % self.freq == 0:
            self.dump(f"iteration_{self.step_num}")

    def dump(self, name: str) -> None:
        folder = self.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        torch_private.dump_cuda_memory_snapshot(str(folder / f"rank{self.rank}_memory_snapshot.pickle"))

    def close(self) -> None:
        torch_private.record_cuda_memory_history(False)


class Profiler:
    """What the loop sees: `step()` after every training step (a no-op when profiling is off)."""

    def __init__(self, traces: _TraceWindows | None, memory: _MemorySnapshots | None):
        self.traces, self.memory = traces, memory

    def step(self) -> None:
        """Mark the end of one training step."""
        if self.traces is not None:
            self.traces.profiler.step()
        if self.memory is not None:
            self.memory.step()


def memory_snapshot_unavailable(cfg: JobConfig, device: torch.device) -> str | None:
    """The warning to print when memory snapshots are asked for on a device without CUDA's allocator history."""
    if cfg.profiling.enable_memory_snapshot and device.type != "cuda":
        # A warning, not an error: snapshots only observe the run, and a GPU config should still run on CPU.
        return (f"warning: profiling.enable_memory_snapshot = true has no effect on {device.type} (CUDA allocator "
                "history only); no memory snapshots are written, peak RSS is in the step line")
    return None


@contextlib.contextmanager
def maybe_profile(cfg: JobConfig, rank: int, device: torch.device, start_step: int,
                  log: Callable[[str], None] = print) -> Iterator[Profiler]:
    """Profile the steps after `start_step` as config [profiling] says; yields a Profiler to `step()` each step."""
    p = cfg.profiling
    if (warning := memory_snapshot_unavailable(cfg, device)) is not None:
        log(warning)
    traces = _TraceWindows(cfg, rank, device, start_step) if p.enable_profiling else None
    memory = _MemorySnapshots(cfg, rank, start_step) if p.enable_memory_snapshot and device.type == "cuda" else None
    with traces.profiler if traces is not None else contextlib.nullcontext():
        try:
            yield Profiler(traces, memory)
        except torch.OutOfMemoryError:
            if memory is not None:  # the history up to the failing allocation, which is what explains an OOM
                memory.dump(f"iteration_{memory.step_num + 1}_exit")
            raise
        finally:
            if memory is not None:
                memory.close()
