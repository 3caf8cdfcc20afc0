"""Helpers for tests that start real multi-process runs on CPU with gloo."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def torchrun(nproc: int, script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Start `script` on `nproc` gloo ranks; returns the finished process (check returncode yourself)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COMM_BACKEND": "gloo",
           "CUDA_VISIBLE_DEVICES": "", "LOG_RANK": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
           f"--nproc-per-node={nproc}", script, *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def run_steps(nproc: int, out: Path, overrides: list[str]) -> dict:
    """Run tests/distributed/run_steps.py and load what rank 0 saved."""
    proc = torchrun(nproc, str(ROOT / "tests/distributed/run_steps.py"), [str(out), *overrides])
    assert proc.returncode == 0, f"run failed ({nproc} ranks, {overrides}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out, weights_only=True)
