"""Every mistake a user can make ends in one line naming the key and value, and a non-zero exit.

Each case runs the real entry point (DRY_RUN, the same check run_train.sh does before torchrun) in a fresh
process, so the exit code and the exact stderr a user would see are what is asserted.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CASES = [  # (name, NGPU, toml text or None, CLI args, substrings the one-line error must contain)
    ("unknown key with suggestion", 1, None, ["--training.stepz", "3"], ["training.stepz", "did you mean 'steps'"]),
    ("unknown section", 1, "[trainin]\nsteps = 3\n", [], ["[trainin]", "did you mean 'training'"]),
    ("unknown key in TOML", 1, "[optimizer]\nlearning_rate = 1e-3\n", [], ["optimizer.learning_rate"]),
    ("wrong type on CLI", 1, None, ["--training.steps", "ten"], ["training.steps", "'ten'", "expected int"]),
    ("wrong type in TOML", 1, "[training]\nseq_len = \"long\"\n", [], ["training.seq_len", "expected int"]),
    ("bool expected", 1, "[metrics]\nenable_tensorboard = 1\n", [], ["metrics.enable_tensorboard", "true or false"]),
    ("out of range", 1, None, ["--training.local_batch_size", "0"], ["training.local_batch_size = 0", ">= 1"]),
    ("bad choice", 1, None, ["--lr_scheduler.decay_type", "exp"], ["lr_scheduler.decay_type = 'exp'", "cosine"]),
    ("bad dtype", 1, None, ["--training.mixed_precision_param", "float16"], ["mixed_precision_param", "float16"]),
    ("layout product", 8, None, ["--parallelism.data_parallel_shard_degree", "3"],
     ["dp_shard 3 = 3", "world size (NGPU) is 8", "data_parallel_shard_degree = 8"]),
    ("layout not divisible", 6, None, ["--parallelism.data_parallel_replicate_degree", "4"],
     ["dp_replicate 4", "does not divide the world size 6"]),
    ("global batch not divisible", 2, None, ["--training.global_batch_size", "12", "--training.local_batch_size", "4"],
     ["training.global_batch_size = 12", "4 x data-parallel degree 2 = 8"]),
    ("dimension not landed", 2, None, ["--parallelism.pipeline_parallel_degree", "2"],
     ["pipeline_parallel_degree = 2", "not landed"]),
    ("unknown flavor", 1, None, ["--model.flavor", "9B"], ["model.flavor = '9B'", "8B"]),
    ("missing config file", 1, None, ["--job.config_file", "/nonexistent/x.toml"], ["/nonexistent/x.toml", "no such file"]),
    ("invalid TOML", 1, "[training\nsteps = 3\n", [], ["invalid TOML"]),
    ("override without value", 1, None, ["--training.steps"], ["--training.steps needs a value"]),
    ("stray argument", 1, None, ["steps=3"], ["unexpected argument 'steps=3'"]),
    ("bad NGPU", "two", None, [], ["NGPU = 'two'"]),
    ("bad AC mode", 1, None, ["--activation_checkpoint.mode", "partial"],
     ["activation_checkpoint.mode = 'partial'", "selective"]),
    ("bad selective AC option", 1, None, ["--activation_checkpoint.selective_ac_option", "x"],
     ["activation_checkpoint.selective_ac_option = 'x'", '"op" or a positive integer']),
    ("selective AC option 0", 1, None, ["--activation_checkpoint.selective_ac_option", "0"],
     ["selective_ac_option = '0'"]),
    ("selective AC option unquoted in TOML", 1, "[activation_checkpoint]\nselective_ac_option = 2\n", [],
     ["activation_checkpoint.selective_ac_option = 2", "quote it"]),
    ("bad compile component", 1, None, ["--compile.components", "model,optimizer"],
     ["compile.components = 'optimizer'", "loss"]),
    ("bad compile backend", 1, None, ["--compile.enable", "--compile.backend", "inductr"],
     ["compile.backend = 'inductr'", "inductor"]),
    ("profiler window longer than freq", 1, None, ["--profiling.enable_profiling", "--profiling.profile_freq", "3",
                                                   "--profiling.profiler_warmup", "3"],
     ["profiling.profiler_warmup 3 + profiler_active 1 > profile_freq 3"]),
    ("profile_freq 0", 1, None, ["--profiling.profile_freq", "0"], ["profiling.profile_freq = 0", ">= 1"]),
]


def _run(ngpu, args, tmp_path, toml):
    if toml is not None:
        path = tmp_path / "bad.toml"
        path.write_text(toml)
        args = ["--job.config_file", str(path), *args]
    env = {**os.environ, "NGPU": str(ngpu), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "trainer.dry_run", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name,ngpu,toml,args,expected", CASES, ids=[c[0] for c in CASES])
def test_one_line_error(name, ngpu, toml, args, expected, tmp_path):
    proc = _run(ngpu, args, tmp_path, toml)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"


def test_launcher_stops_before_torchrun(tmp_path):
    # run_train.sh checks the config first, so a mistake is one line, not a torchrun failure report per rank.
    env = {**os.environ, "NGPU": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([str(ROOT / "run_train.sh"), "--parallelism.data_parallel_shard_degree", "3"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "dp_shard 3" in proc.stderr


def test_valid_configs_pass_dry_run(tmp_path):
    # Each shipped config is valid for the NGPU it is written for.
    for config, ngpu in (("configs/debug_model.toml", 1), ("configs/llama3_8b.toml", 8),
                         ("configs/smollm_1.7b.toml", 8)):
        proc = _run(ngpu, ["--job.config_file", config], tmp_path, None)
        assert proc.returncode == 0 and "dry run OK" in proc.stdout, (config, proc.stderr)


def test_gpu_only_features_pass_dry_run_on_cpu(tmp_path):
    # The dry-run host is not the training host: CUDA memory snapshots and compile are checked where they run.
    proc = _run(8, ["--job.config_file", "configs/llama3_8b.toml", "--profiling.enable_memory_snapshot",
                    "--profiling.enable_profiling", "--compile.enable", "--activation_checkpoint.mode", "full"],
                tmp_path, None)
    assert proc.returncode == 0 and "dry run OK" in proc.stdout, proc.stderr
    assert "warning" not in proc.stdout + proc.stderr
