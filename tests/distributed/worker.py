"""Test ranks that run jobs (tests/distributed/jobs.py) in one gloo process group.

    python worker.py --pool DIR --ranks N                  fork N ranks that run job after job from DIR until told to stop
    torchrun --nproc-per-node N worker.py --job NAME OUT ARGS   run one job, then exit with its code

Pool mode is what makes the distributed suite fast. Its process imports torch, the trainer and the jobs once and
forks its N ranks (with torch.multiprocessing, as torchrun's environment would set them up: RANK, WORLD_SIZE,
MASTER_ADDR, ...): on 2 cores, N fresh interpreters importing all that cost about 3 CPU-seconds each, which was most
of a pool's start. Nothing in the parent starts a thread or a process group before the fork. Protocol (see pool.py):
the client writes DIR/job-K.json ({"job", "out", "argv", "env"} or {"stop": true}) for K = 0, 1, ...; every rank
waits for it, runs it with its stdout/stderr in DIR/job-K.rankR.{out,err}; rank 0 gathers the exit codes and writes
DIR/job-K.done. A job that fails on some ranks only can leave the others in a collective: the client's timeout then
kills the whole pool, and the next job starts a fresh one.

The one-off mode is a real torchrun launch, for what a pool cannot run (a rank killed with -9 takes its launch down).
"""

import contextlib
import gc
import json
import signal
import os
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.distributed.jobs import JOBS  # noqa: E402
from trainer.distributed import shutdown  # noqa: E402
from trainer.torch_private import process_groups, reuse_device_mesh_groups  # noqa: E402

# A collective may wait this long: a job that hangs is killed by the client first (pool.py).
IDLE_LIMIT = timedelta(hours=2)


def run_job(job: dict) -> int:
    """Run one job on this rank; its exit code (1 with the traceback on stderr for an exception)."""
    try:
        return JOBS[job["job"]](job["out"], list(job["argv"]))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _next_job(folder: Path, index: int) -> dict:
    """Wait for job `index`. Every rank polls for the file (written whole, by a rename) instead of waiting in a
    collective: gloo polls its sockets while it waits, so idle pools would take CPU from the one at work."""
    path = folder / f"job-{index}.json"
    while not path.exists():
        time.sleep(0.1)
    return json.loads(path.read_text())


def serve(folder: Path) -> None:
    """Pool mode: run jobs until a stop job arrives."""
    rank = dist.get_rank()
    # A job builds its meshes anew, with new gloo groups, and jobs ran slower the more the pool had run: an 8-rank
    # layout took 7.7 s in its second job and 14.2 s in its fourteenth, its ranks' gloo TCP loop threads 2.1 and
    # 5.6 CPU-seconds a job (idle groups alone do not do that: 60 extra groups on 8 ranks left an all_reduce on
    # another group as fast; the cause is not pinned down). Reusing the groups removes it: 7.5 s flat. They cannot
    # be destroyed after a job instead: DTensor's sharding cache hands later jobs specs holding the earlier job's
    # meshes (DeviceMesh compares equal by layout, not by group). One group shared by two mesh dims over the same
    # ranks is sound here, where every collective runs in order on one thread.
    mesh_groups = reuse_device_mesh_groups()
    index = 0
    while not (job := _next_job(folder, index)).get("stop"):
        groups_before = set(process_groups())
        base = folder / f"job-{index}.rank{rank}"
        saved_env = dict(os.environ)
        os.environ.update(job.get("env", {}))  # e.g. LOG_RANK for this job only
        with open(f"{base}.out", "w") as out, open(f"{base}.err", "w") as err, \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run_job(job)
        os.environ.clear()
        os.environ.update(saved_env)
        codes = [None] * dist.get_world_size()
        dist.all_gather_object(codes, code)
        # What one job leaves behind must not reach the next: the groups it made outside its meshes (the
        # checkpointer's, the pipeline's pairs; every rank is past the job's last collective), compiled graphs,
        # deterministic mode, garbage.
        kept = set(mesh_groups.values())
        for group in process_groups():
            if group not in groups_before and group not in kept:
                dist.destroy_process_group(group)
        torch.compiler.reset()
        torch.use_deterministic_algorithms(False)
        gc.collect()
        if rank == 0:
            _write_atomic(folder / f"job-{index}.done", json.dumps({"codes": codes}))
        index += 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(parent: int) -> None:
    """Be killed when `parent` dies: a pool paused by SIGSTOP whose pytest was killed (by the OOM killer, say) would
    otherwise hold its ranks' memory until the machine restarts (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the call
        os._exit(1)


def _pool_rank(rank: int, world_size: int, port: int, folder: Path, launcher: int) -> None:
    """One forked rank of a pool: torchrun's environment for it, the process group, then jobs until told to stop."""
    _die_with_parent(launcher)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", timeout=IDLE_LIMIT)
    serve(folder)
    shutdown(0, clean=True)


def _threads() -> list[str]:
    return [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]


def main() -> None:
    if sys.argv[1] == "--pool":
        folder, ranks = Path(sys.argv[2]), int(sys.argv[4])
        assert sys.argv[3] == "--ranks", "usage: worker.py --pool DIR --ranks N"
        # A fork copies only the calling thread: a lock another thread held stays locked in every rank (seen as heap
        # corruption). pool.py turns off the threads the imports would start (pyarrow's jemalloc purger, OpenBLAS).
        assert len(_threads()) == 1, f"the pool must fork from a single thread, but it runs {_threads()}"
        _die_with_parent(int(os.environ["POOL_PARENT_PID"]))
        mp.start_processes(_pool_rank, args=(ranks, _free_port(), folder, os.getpid()), nprocs=ranks,
                           start_method="fork")
        return
    assert sys.argv[1] == "--job", "usage: worker.py --pool DIR --ranks N | --job NAME OUT ARGS..."
    dist.init_process_group("gloo", timeout=IDLE_LIMIT)
    code = run_job({"job": sys.argv[2], "out": sys.argv[3], "argv": sys.argv[4:]})
    shutdown(code, clean=code == 0)


if __name__ == "__main__":
    main()
