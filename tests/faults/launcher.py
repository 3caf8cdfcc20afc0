"""A launcher for runs that lose ranks. One process imports torch and the trainer once, then per launch forks the
ranks of one job with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, a fresh MASTER_PORT) and a process
that hosts their rendezvous store (as torchrun's agent does: it outlives any rank), and supervises them as the
agent does: when a rank dies, the others get SIGTERM, and SIGKILL after GRACE seconds. It
reports every rank's exit status (-9 for a SIGKILL). Unlike a pool (tests/distributed/pool.py) it outlives its
ranks, so a run that loses one costs a fork, not an interpreter start per rank.

    python launcher.py DIR      serve DIR/launch-K.json {"ranks", "job", "out", "argv"} -> DIR/launch-K.done

Jobs: JOBS of tests/distributed/jobs.py and `fault` (tests/faults/inject.py). Each rank's stdout and stderr go to
DIR/launch-K.rankR.{out,err}.
"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GRACE = 10.0  # seconds the surviving ranks get to end on their own after one died


def _rank(rank: int, world: int, port: int, job: dict, base: str) -> None:
    """In the forked rank: its environment and output files, the process group, the job; never returns."""
    import torch.distributed as dist

    from tests.distributed.worker import run_job
    from trainer.distributed import shutdown

    for fd, suffix in ((1, "out"), (2, "err")):
        target = os.open(f"{base}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "TORCHELASTIC_USE_AGENT_STORE": "True", **job.get("env", {})})
    code = 1
    try:
        dist.init_process_group("gloo", timeout=timedelta(seconds=job.get("timeout", 300)))
        code = run_job(job)
    finally:
        shutdown(code, clean=code == 0)


def _launch(job: dict, base: str) -> list[int]:
    """Fork the job's ranks and wait for all of them; their exit codes (negative: killed by that signal)."""
    from tests.distributed.worker import _free_port

    world, port = job["ranks"], _free_port()
    store = os.fork()
    if store == 0:  # the rendezvous store, hosted outside the ranks as torchrun's agent hosts it
        try:
            import torch.distributed as dist

            server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
            while server is not None:  # until the launcher kills it
                signal.pause()
        finally:
            os._exit(0)
    pids = {}
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            try:
                _rank(rank, world, port, job, f"{base}.rank{rank}")
            finally:
                os._exit(1)
        pids[pid] = rank
    codes: list[int | None] = [None] * world
    kill_at = None
    while None in codes:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid in pids:
            codes[pids[pid]] = os.waitstatus_to_exitcode(status)
            if codes[pids[pid]] != 0 and kill_at is None:  # a rank failed: stop the others, as torchrun does
                kill_at = time.monotonic() + GRACE
                for other, rank in pids.items():
                    if codes[rank] is None:
                        os.kill(other, signal.SIGTERM)
            continue
        if kill_at is not None and time.monotonic() > kill_at:
            for other, rank in pids.items():
                if codes[rank] is None:
                    os.kill(other, signal.SIGKILL)
            kill_at = float("inf")
        time.sleep(0.01)
    os.kill(store, signal.SIGKILL)
    os.waitpid(store, 0)
    return codes


def serve(folder: Path) -> None:
    from tests.distributed.worker import _threads

    index = 0
    while True:
        request = folder / f"launch-{index}.json"
        while not request.exists():
            time.sleep(0.05)
        job = json.loads(request.read_text())
        if job.get("stop"):
            return
        assert len(_threads()) == 1, f"the launcher must fork from a single thread, but it runs {_threads()}"
        start = time.monotonic()
        codes = _launch(job, str(folder / f"launch-{index}"))
        done = folder / f"launch-{index}.done"
        done.with_suffix(".tmp").write_text(json.dumps({"codes": codes, "seconds": time.monotonic() - start}))
        os.replace(done.with_suffix(".tmp"), done)
        index += 1


@dataclass
class Launch:
    codes: list[int]
    seconds: float
    stdout: str  # every rank's, in rank order
    stderr: str  # every rank's lines, prefixed with [rank R]


class Launcher:
    """The test side: one launcher process for the session; `launch` runs a job and returns its Launch."""

    def __init__(self, folder: Path):
        from tests.distributed.launch import rank_env
        from tests.distributed.pool import SINGLE_THREADED

        self.folder, self.index = folder, 0
        folder.mkdir(parents=True, exist_ok=True)
        log = open(folder / "launcher.log", "w")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(folder)],
                                     env={**rank_env(), **SINGLE_THREADED}, cwd=ROOT, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def _request(self, job: dict) -> int:
        index, self.index = self.index, self.index + 1
        path = self.folder / f"launch-{index}.json"
        path.with_suffix(".tmp").write_text(json.dumps(job))
        os.replace(path.with_suffix(".tmp"), path)
        return index

    def launch(self, ranks: int, job: str, out, argv: list[str], timeout: float = 300) -> Launch:
        index = self._request({"ranks": ranks, "job": job, "out": str(out), "argv": [str(a) for a in argv]})
        done, deadline = self.folder / f"launch-{index}.done", time.monotonic() + timeout
        while not done.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                log = (self.folder / "launcher.log").read_text()[-3000:]
                raise RuntimeError(f"launch {index} ({job} on {ranks} ranks) did not finish:\n{log}")
            time.sleep(0.02)
        result = json.loads(done.read_text())
        text = {(r, kind): (self.folder / f"launch-{index}.rank{r}.{kind}").read_text()
                for r in range(ranks) for kind in ("out", "err")}
        return Launch(result["codes"], result["seconds"], "".join(text[r, "out"] for r in range(ranks)),
                      "".join(f"[rank {r}] {line}\n" for r in range(ranks) for line in text[r, "err"].splitlines()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self._request({"stop": True})
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from tests.distributed.jobs import JOBS  # the imports every rank needs, done once before any fork
    from tests.faults.inject import fault_train

    JOBS["fault"] = fault_train

    serve(Path(sys.argv[1]))
