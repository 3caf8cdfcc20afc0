"""One-off multi-process launches on CPU with gloo, for what a pooled worker cannot run (a rank killed with -9, the
launcher itself, scripts with their own entry point)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def rank_env() -> dict[str, str]:
    """The environment every test rank runs in: gloo on CPU, one thread per rank (the ranks share the cores)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COMM_BACKEND": "gloo",
            "CUDA_VISIBLE_DEVICES": "", "LOG_RANK": "0"}


def torchrun(nproc: int, script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Start `script` on `nproc` gloo ranks; returns the finished process (check returncode yourself)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
           f"--nproc-per-node={nproc}", script, *args]
    return subprocess.run(cmd, env=rank_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def torchrun_job(nproc: int, job: str, out, argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run one job of tests/distributed/jobs.py in a fresh launch of its own."""
    return torchrun(nproc, str(ROOT / "tests/distributed/worker.py"), ["--job", job, str(out), *map(str, argv)],
                    timeout)
