"""Profiling through the real entry point on 2 ranks: one trace per rank at exactly the configured steps."""

import json

import pytest


pytestmark = pytest.mark.distributed


def test_one_trace_per_rank_at_the_configured_steps(pool, tmp_path):
    # The training entry point's own run (trainer.train.run), in a pooled worker.
    proc = pool.run(2, "cli", tmp_path / "unused", [
        "--job.config_file", "configs/debug_model.toml", "--job.dump_folder", str(tmp_path),
        "--metrics.enable_tensorboard", "false", "--metrics.log_freq", "2", "--training.steps", "6",
        "--training.seq_len", "64", "--training.local_batch_size", "2",
        "--profiling.enable_profiling", "--profiling.profile_freq", "3", "--profiling.profiler_warmup", "1",
        "--profiling.profiler_active", "1"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == [f"profile_traces/iteration_{step}/rank{rank}_trace.json" for step in (3, 6) for rank in (0, 1)]
    for path in written:  # each is a complete Chrome trace holding the one recorded step (profiler counts from 0)
        names = {e.get("name") for e in json.loads((tmp_path / path).read_text())["traceEvents"]}
        step = int(path.split("iteration_")[1].split("/")[0])
        assert f"ProfilerStep#{step - 1}" in names and f"ProfilerStep#{step - 2}" not in names
    # The step line carries the time breakdown: seconds per step and the share spent waiting for data.
    step_lines = [line for line in proc.stdout.splitlines() if "loss:" in line]
    assert len(step_lines) == 4 and all("s/step (data " in line for line in step_lines), proc.stdout
