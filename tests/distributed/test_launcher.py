"""The README's run command end to end: run_train.sh on the default config, from another working directory."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.distributed.launch import ROOT

pytestmark = pytest.mark.distributed

TAGS = {"loss_metrics/global_avg_loss", "loss_metrics/global_max_loss", "grad_norm", "lr", "throughput(tps)",
        "tflops", "mfu(%)", "memory/max_reserved(GiB)", "time_metrics/end_to_end(s)",
        "time_metrics/data_loading(s)"}


def launch(tmp_path: Path, ngpu: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NGPU": str(ngpu), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("OMP_NUM_THREADS", None)
    return subprocess.run([str(ROOT / "run_train.sh"), "--job.dump_folder", str(tmp_path / "out"), *args],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def scalars(dump: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = list((dump / "tb").iterdir())
    acc = EventAccumulator(str(run))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_default_config_trains_and_logs_every_tag(tmp_path):
    proc = launch(tmp_path, 1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logged = scalars(tmp_path / "out")
    assert TAGS <= logged.keys(), TAGS - logged.keys()
    loss = dict(logged["loss_metrics/global_avg_loss"])
    assert sorted(loss) == list(range(1, 11))
    assert loss[10] < loss[1]
    steps = [int(s) for s in re.findall(r"step:\s+(\d+)", proc.stdout)]
    assert steps == list(range(1, 11))


@pytest.mark.slow
def test_two_ranks_only_log_rank_prints(tmp_path):
    proc = launch(tmp_path, 2, "--training.steps", "3", "--training.seq_len", "64", "--training.local_batch_size", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    # LOG_RANK defaults to 0: one log line per step, not one per rank.
    assert [int(s) for s in re.findall(r"step:\s+(\d+)", proc.stdout)] == [1, 2, 3]
    assert "dp_shard=2" in proc.stdout
