"""The test side of the worker pool: one pool of forked ranks per world size, kept alive across tests (worker.py).

`WorkerPool.run(ranks, job, out, argv)` hands a job to the pool of that size, starting it on first use, and returns
a CompletedProcess-like JobResult with every rank's stdout (in rank order; with LOG_RANK=0 only rank 0 prints) and
stderr. Between its jobs a pool is paused (SIGSTOP): gloo's threads wake up even in an idle process group, and on
2 cores fifteen idle ranks would take a third of a core from the pool at work. Pools of other sizes are closed when
the ranks alive would exceed MAX_RANKS (memory: a worker holds torch, datasets and a model's worth of allocator
caches). A pool keeps DTensor's sharding caches warm across its jobs (a fresh pool's first job of a 4-rank layout ran
4.6 s over the next ones) and its ranks reuse their mesh groups (worker.py): without that, every job's new gloo
groups made the next job slower (an 8-rank layout 7.7 s -> 14.2 s over 13 jobs; with it 7.5 s flat). A pool is
restarted after MAX_JOBS jobs, for memory only (a rank grows ~1.5 MB a job). A job that does not finish in time,
or a pool that died, is reported with its logs, and the pool is killed so that the next job starts a fresh one.
"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.distributed.launch import ROOT, rank_env

MAX_RANKS = 16
# The pool forks its ranks after its imports, so those must leave it single-threaded: pyarrow's jemalloc starts a
# background purging thread unless told not to (OpenBLAS's thread server stays off with OMP_NUM_THREADS=1).
SINGLE_THREADED = {"JE_ARROW_MALLOC_CONF": "background_thread:false"}
MAX_JOBS = 200


@dataclass
class JobResult:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class _Pool:
    ranks: int
    folder: Path
    proc: subprocess.Popen
    next_job: int = 0
    last_used: float = field(default_factory=time.monotonic)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _signal(self, sig: int) -> None:
        """Send `sig` to the pool's process group: its launcher, the ranks it forked and what they started (ranks
        left behind by a launcher that died too)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def pause(self, paused: bool) -> None:
        """Stop (or continue) every process of the pool."""
        self._signal(signal.SIGSTOP if paused else signal.SIGCONT)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        self.proc.wait()


class WorkerPool:
    def __init__(self, root: Path):
        self.root = root
        self.pools: dict[int, _Pool] = {}
        self._starts = 0

    def _start(self, ranks: int) -> _Pool:
        for size in sorted(self.pools, key=lambda s: self.pools[s].last_used):  # least recently used first
            if sum(self.pools) + ranks <= MAX_RANKS:
                break
            self.close_pool(size)
        self._starts += 1
        folder = self.root / f"pool{ranks}-{self._starts}"
        folder.mkdir(parents=True)
        cmd = [sys.executable, str(ROOT / "tests/distributed/worker.py"), "--pool", str(folder), "--ranks", str(ranks)]
        log = open(folder / "pool.log", "w")
        env = {**rank_env(), **SINGLE_THREADED, "POOL_PARENT_PID": str(os.getpid())}  # the pool dies with us
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return _Pool(ranks, folder, proc)

    def run(self, ranks: int, job: str, out: Path | str, argv: list[str], timeout: float = 600,
            env: dict[str, str] | None = None) -> JobResult:
        """Run `job` (a name in jobs.JOBS) on `ranks` ranks, with `env` added to the environment for its duration;
        rank 0 writes its result to `out`."""
        pool = self.pools.get(ranks)
        if pool is not None and pool.next_job >= MAX_JOBS:
            self.close_pool(ranks)
            pool = None
        if pool is None or not pool.alive():
            pool = self.pools[ranks] = self._start(ranks)
        pool.pause(False)
        index, pool.next_job = pool.next_job, pool.next_job + 1
        job_file = pool.folder / f"job-{index}.json"
        tmp = job_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"job": job, "out": str(out), "argv": [str(a) for a in argv], "env": env or {}}))
        os.replace(tmp, job_file)
        done, deadline = pool.folder / f"job-{index}.done", time.monotonic() + timeout
        while not done.exists() and pool.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        pool.last_used = time.monotonic()
        logs = [(pool.folder / f"job-{index}.rank{r}.{kind}") for kind in ("out", "err") for r in range(ranks)]
        text = {path: path.read_text() if path.exists() else "" for path in logs}
        stdout = "".join(text[pool.folder / f"job-{index}.rank{r}.out"] for r in range(ranks))
        stderr = "".join(f"[rank {r}] {line}\n" for r in range(ranks)
                         for line in text[pool.folder / f"job-{index}.rank{r}.err"].splitlines())
        if done.exists():
            pool.pause(True)
            codes = json.loads(done.read_text())["codes"]
            return JobResult(next((c for c in codes if c), 0), stdout, stderr)
        why = "timed out" if pool.alive() else f"pool died (exit {pool.proc.returncode})"
        pool.kill()
        del self.pools[ranks]
        pool_log = (pool.folder / "pool.log").read_text()[-4000:]
        return JobResult(124 if why == "timed out" else 1, stdout,
                         f"{job} on {ranks} ranks: {why}\n{stderr}\n--- pool ---\n{pool_log}")

    def close_pool(self, ranks: int) -> None:
        pool = self.pools.pop(ranks)
        pool.pause(False)
        if pool.alive():
            stop = pool.folder / f"job-{pool.next_job}.json"
            stop.with_suffix(".tmp").write_text(json.dumps({"stop": True}))
            os.replace(stop.with_suffix(".tmp"), stop)
            try:
                pool.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        pool.kill()

    def close(self) -> None:
        for ranks in list(self.pools):
            self.close_pool(ranks)
