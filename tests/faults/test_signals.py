"""SIGTERM from outside, to the launch script and to the torchrun agent itself (a rank signalled alone:
tests/distributed/test_checkpoint.py's "SIGTERM after step 5" cases).

- run_train.sh gets SIGTERM (a scheduler stopping the job, kill, k8s): it sends it to the ranks only, they finish
  the step, save it and exit 0, and so do torchrun and the script.
- torchrun gets SIGTERM itself: it forwards it and the ranks save the step, but torchrun exits 1 whatever they did
  (its own choice); when the save cannot finish in torchrun's shutdown timeout, the ranks are SIGKILLed mid-save
  and the folder is left without its marker, so it is never loaded.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.distributed.launch import ROOT, rank_env
from tests.distributed.layouts import layout_overrides
from trainer.checkpoint_files import MARKER, complete_steps

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def signal_after_step(cmd: list[str], step: int, env: dict, timeout: float = 240) -> tuple[int, str, float]:
    """Start `cmd`, SIGTERM it once its log shows `step`; (exit code, its output, seconds from signal to exit)."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, sent = [], None
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if sent is None and f"step: {step:5d}" in line:
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
        assert time.monotonic() < deadline, "".join(lines[-50:])
    proc.wait(timeout=60)
    assert sent is not None, "".join(lines[-50:])
    return proc.returncode, "".join(lines), time.monotonic() - sent


def overrides(tmp_path, layout: str, **extra) -> tuple[int, list[str]]:
    return layout_overrides(layout, **{"training.steps": 200, "metrics.log_freq": 1, "checkpoint.enable": True,
                                       "job.dump_folder": str(tmp_path), "checkpoint.interval": 2, **extra})


@pytest.mark.parametrize("layout", ["dp_shard=2", "1 process"])  # under torchrun; one rank without its agent
def test_sigterm_to_run_train_saves_and_exits_0(layout, tmp_path):
    ranks, args = overrides(tmp_path, layout)
    env = {**rank_env(), "NGPU": str(ranks)}
    code, log, _ = signal_after_step(["bash", str(ROOT / "run_train.sh"), *args], 3, env)
    assert code == 0, log[-4000:]
    stopped = [int(line.split("after step ")[1].split(";")[0]) for line in log.splitlines()
               if "stopped by a signal after step" in line]
    assert len(stopped) == 1 and stopped[0] >= 3, log[-4000:]
    assert max(complete_steps(tmp_path / "checkpoint")) == stopped[0]


def torchrun_cmd(ranks: int, args: list[str], out, switches: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc-per-node={ranks}",
            str(ROOT / "tests/distributed/worker.py"), "--job", "train", str(out), *switches, *args]


def test_sigterm_to_torchrun_saves_the_step(tmp_path):
    ranks, args = overrides(tmp_path, "1 process")
    code, log, _ = signal_after_step(torchrun_cmd(ranks, args, tmp_path / "out.pt"), 3, rank_env())
    assert code == 1 and "SignalException" in log, log[-4000:]  # torchrun's own exit code, not the ranks'
    stopped = int(log.split("stopped by a signal after step ")[1].split(";")[0])
    assert max(complete_steps(tmp_path / "checkpoint")) == stopped >= 3, log[-4000:]


def test_sigterm_to_torchrun_with_a_save_too_slow_for_its_shutdown_timeout(tmp_path):
    # Writes take 30 s more than usual; torchrun waits 3 s for the ranks after forwarding SIGTERM, then SIGKILLs.
    ranks, args = overrides(tmp_path, "1 process", **{"checkpoint.interval": 100})
    env = {**rank_env(), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "3"}
    cmd = torchrun_cmd(ranks, args, tmp_path / "out.pt", ["--slow-writes", "30"])
    code, log, seconds = signal_after_step(cmd, 3, env)
    assert code != 0 and seconds < 25, (code, seconds, log[-4000:])
    folder = tmp_path / "checkpoint"
    partial = list(folder.iterdir())
    assert len(partial) == 1 and not (partial[0] / MARKER).exists(), sorted(os.listdir(folder))
    assert "stopped by a signal" not in log and not complete_steps(folder)
