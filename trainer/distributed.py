"""Process start and stop for torchrun-launched ranks (or one plain process): process-group setup, errors every
rank agrees on, the one-line report and exit code of a failed run, and the gloo-safe teardown."""

import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.config import ConfigError
from trainer.parallel_dims import device_type
from trainer.torch_private import (abort_process_groups, nvshmem_available, set_process_group_timeouts,
                                   use_nvshmem_symmetric_memory)


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    log_ranks: frozenset[int]

    @property
    def should_log(self) -> bool:
        """Whether this rank prints (LOG_RANK, default rank 0)."""
        return self.rank in self.log_ranks


def _log_ranks() -> frozenset[int]:
    raw = os.environ.get("LOG_RANK", "0")
    try:
        return frozenset(int(r) for r in raw.split(",") if r.strip())
    except ValueError:
        raise ConfigError(f"LOG_RANK = {raw!r}: expected a rank or a comma-separated list of ranks, e.g. 0 or 0,4")


def _flight_recorder_env(comm, dump_folder: str) -> None:
    """NCCL's flight recorder (comm.trace_buf_size entries per rank), dumped into comm.save_traces_folder when a
    collective times out. Environment variables NCCL reads at init; other backends ignore them."""
    os.environ["TORCH_FR_BUFFER_SIZE"] = str(comm.trace_buf_size)
    if comm.trace_buf_size > 0:
        folder = os.path.join(dump_folder, comm.save_traces_folder)
        os.makedirs(folder, exist_ok=True)
        os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] = "1"
        os.environ["TORCH_FR_DUMP_TEMP_FILE"] = os.path.join(folder, comm.save_traces_file_prefix)
        # The watchdog must not clean up a timed-out collective before the recorder dumped it.
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "3"


def init_distributed(comm=None, dump_folder: str = ".", cpu_backend: bool = False) -> DistInfo:
    """Read torchrun's environment, pick the device and backend (COMM_BACKEND) and init the process group, whose
    collectives may wait comm.init_timeout_seconds (the [comm] section; torch's default without one).

    A run without torchrun's variables is one process and gets no process group at all; a process group that is
    already initialized is kept. gloo (COMM_BACKEND, or the kept group's backend) trains on CPU even where GPUs are
    visible, and says so. `cpu_backend` (CPU offload): NCCL for CUDA tensors and gloo for host ones, since the
    gradient norm is then reduced over shards in host memory.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_type() == "cuda"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    info = DistInfo(rank, local_rank, world_size, device, _log_ranks())
    if not cuda and torch.cuda.is_available() and info.should_log:
        why = "COMM_BACKEND = gloo" if os.environ.get("COMM_BACKEND") == "gloo" else "the process group is gloo"
        print(f"{why}: training on CPU although {torch.cuda.device_count()} GPU(s) are visible; unset COMM_BACKEND "
              f"(or set nccl) to train on the GPUs", flush=True)
    if dist.is_initialized() or (world_size == 1 and "MASTER_ADDR" not in os.environ):
        return info  # a process group already up (a test worker running several jobs) is used as it is
    backend = os.environ.get("COMM_BACKEND") or ("nccl" if cuda else "gloo")
    if backend == "nvshmem":
        if not (cuda and nvshmem_available()):
            raise ConfigError("COMM_BACKEND = 'nvshmem': NVSHMEM is not available with this torch build or device; "
                              "use nccl (CUDA) or gloo (CPU)")
        backend = "nccl"
    elif backend not in ("nccl", "gloo"):
        raise ConfigError(f"COMM_BACKEND = {backend!r} is not one of nccl, gloo, nvshmem")
    elif backend == "nccl" and not cuda:
        raise ConfigError("COMM_BACKEND = 'nccl' needs CUDA, and no GPU is visible; use gloo (the default on CPU)")
    timeout = None
    if comm is not None:
        timeout = timedelta(seconds=comm.init_timeout_seconds)
        if backend == "nccl":
            _flight_recorder_env(comm, dump_folder)
    nccl = backend == "nccl"
    if nccl and cpu_backend:
        backend = "cuda:nccl,cpu:gloo"
    dist.init_process_group(backend=backend, device_id=device if nccl else None, timeout=timeout)
    if os.environ.get("COMM_BACKEND") == "nvshmem":
        use_nvshmem_symmetric_memory()
    return info


@contextmanager
def agreed_errors():
    """Every rank leaves the block alike. Setup that reads files per rank (the dataset, the tokenizer) can fail on
    some ranks only, e.g. a path that not every node sees: a ConfigError raised in the block on any rank is raised
    on every rank (the lowest failing rank's message, naming the ranks that failed), so none goes on into a
    collective that the failed ones never join, and rank 0 prints it. One all-gather, at start-up only."""
    error = None
    try:
        yield
    except ConfigError as e:
        error = str(e)
    if not dist.is_initialized():
        if error is not None:
            raise ConfigError(error)
        return
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [rank for rank, message in enumerate(errors) if message is not None]
    if failed:
        only = "" if len(failed) == len(errors) else \
            f" (on rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} only: a path not every node sees?)"
        raise ConfigError(errors[failed[0]] + only)


def set_timeouts(seconds: int, device: torch.device) -> None:
    """Every process group's collectives may wait `seconds` from now on (comm.train_timeout_seconds after the first
    step). All ranks meet first, so no rank starts waiting under the new limit while another is still in a step
    that the old one allowed."""
    if not dist.is_initialized():
        return
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    set_process_group_timeouts(timedelta(seconds=seconds))


def collective_failure(e: BaseException, rank: int) -> str | None:
    """One line for a collective that timed out or lost a peer (a rank stalled or died), naming the ranks that
    did not report the failure too (absent_ranks), else None (a bug)."""
    text = str(e)
    if "imed out" in text or "Timeout" in text:
        what = "a collective timed out on this rank: another rank stalled or died (limits: comm.init_timeout_seconds, "\
               "then comm.train_timeout_seconds)"
    elif "Connection closed by peer" in text or "Connection reset by peer" in text:
        what = "a peer rank closed its connection mid-collective: it died or exited"
    else:
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    absent = absent_ranks(rank)
    if absent:
        if len(absent) == 1:
            what += f"; rank {absent[0]} did not report it: that rank died or hangs (see its log)"
        else:  # a rank blocked in a collective with a surviving rank only learns when that one exits
            what += (f"; ranks {', '.join(map(str, absent))} did not report it in 5 s: the rank that died or hangs "
                     f"is among them (see their logs)")
    return f"rank {rank}: {what} [{type(e).__name__}: {first[:200]}]"


def absent_ranks(rank: int, grace: float = 5.0) -> list[int] | None:
    """After a failed collective: the ranks that did not also report a failure within `grace` seconds, i.e. those
    that died or hang. Each failing rank writes a key into the rendezvous store (torchrun's agent hosts it, so it
    outlives any rank; without torchrun rank 0 does) and reads the others'. With one rank missing and the rest in,
    there is nothing more to wait for. None when the store cannot be reached or there is no process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or "MASTER_ADDR" not in os.environ:
        return None
    prefix = f"trainer/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=grace), wait_for_workers=False)
        store.set(f"{prefix}{rank}", "1")
        deadline = time.monotonic() + grace
        while True:
            missing = [r for r in range(world) if not store.check([f"{prefix}{r}"])]
            if len(missing) <= 1 or time.monotonic() > deadline:
                return missing
            time.sleep(0.1)
    except Exception:  # the store went down with the rank that hosted it
        return None


def report_failure(e: BaseException, rank: int) -> int:
    """Report the exception that ended this rank's run and return the exit code: 2 for a ConfigError (every rank
    reaches the same verdict, so one line on stderr from rank 0), 1 for a failed collective (one line per rank) or
    a bug (its traceback)."""
    if isinstance(e, ConfigError):
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        elif "TORCHELASTIC_RUN_ID" in os.environ:
            _leave_the_report_to_rank0()
        return 2
    if (line := collective_failure(e, rank)) is not None:
        print(f"error: {line}", file=sys.stderr, flush=True)
    else:
        traceback.print_exception(e)
    return 1


def _leave_the_report_to_rank0(limit_s: float = 60) -> None:
    """Under torchrun the first rank to exit makes the agent stop the others: a rank that exits before rank 0 has
    printed the config error gets rank 0 killed unheard (seen at NGPU=8 on 2 cores). So the other ranks wait to be
    stopped, SIGTERM ending them at once, and exit by themselves only if nobody does within `limit_s`."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(limit_s)


def shutdown(exit_code: int, clean: bool) -> None:
    """End the process without the gloo exit abort: barrier, destroy, flush, os._exit.

    `clean` is False after an error on this rank: a barrier would then wait for ranks that may never come, and on
    NCCL destroying the groups waits for the collectives still pending (up to the watchdog's 10 minutes), so they
    are aborted instead. os._exit skips atexit handlers, so writers must be closed before this.
    """
    if dist.is_initialized():
        if clean:
            dist.barrier()
            dist.destroy_process_group()
        elif "nccl" in dist.get_backend():  # also "cuda:nccl,cpu:gloo" (CPU offload)
            abort_process_groups()
        else:  # gloo's collectives fail at once when a peer is gone: nothing to wait for
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
