"""Every mistake a user can make ends in one line naming the key and value, and a non-zero exit.

Each case runs the real entry point (trainer.dry_run.main: DRY_RUN, and with --preflight the same checks as a
training run, assets included) and asserts its exit code and exact stderr. Most run in this process for speed; a few
run in a fresh process, and the launcher at a few NGPU, where the ranks make the checks, to show the in-process
result is what a user sees.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    ("tp does not divide the heads", 3, None, ["--parallelism.tensor_parallel_degree", "3"],
     ["tensor_parallel_degree = 3", "n_heads = 16", "1, 2, 4, 8, 16"]),
    ("tp does not divide the kv heads", 4, None, ["--model.name", "smollm", "--parallelism.tensor_parallel_degree", "4"],
     ["tensor_parallel_degree = 4", "n_kv_heads = 2", ": 1, 2"]),
    ("tp does not divide seq_len", 2, None, ["--parallelism.tensor_parallel_degree", "2", "--training.seq_len", "127"],
     ["training.seq_len = 127", "tensor_parallel_degree = 2", "multiple of 2"]),
    ("more pipeline stages than layers", 8, None, ["--parallelism.pipeline_parallel_degree", "8",
                                                   "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B"],
     ["16 pipeline stages but the model has only 6 layers", "use fewer stages"]),
    ("too few microbatches for 1F1B", 4, None, ["--parallelism.pipeline_parallel_degree", "4",
                                                "--training.local_batch_size", "2"],
     ["pipeline_parallel_schedule = '1F1B' needs at least one microbatch per stage (4)", "= 2 microbatches"]),
    ("too few microbatches for DualPipeV", 2, None, ["--parallelism.pipeline_parallel_degree", "2",
                                                    "--parallelism.pipeline_parallel_schedule", "DualPipeV",
                                                    "--training.local_batch_size", "3"],
     ["'DualPipeV' needs at least one microbatch per stage (4)", "= 3 microbatches"]),
    ("interleaved microbatch rounds", 2, None, ["--parallelism.pipeline_parallel_degree", "2",
                                               "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
                                               "--training.local_batch_size", "5"],
     ["'Interleaved1F1B' needs the microbatch count", "use a multiple of 2"]),
    ("unknown pipeline schedule", 2, None, ["--parallelism.pipeline_parallel_degree", "2",
                                           "--parallelism.pipeline_parallel_schedule", "ZeroBubble"],
     ["pipeline_parallel_schedule = 'ZeroBubble' is not one of GPipe, 1F1B, Interleaved1F1B, LoopedBFS, "
      "InterleavedZeroBubble, ZBVZeroBubble, DualPipeV"]),
    ("microbatch size does not divide", 2, None, ["--parallelism.pipeline_parallel_degree", "2",
                                                 "--parallelism.pipeline_parallel_microbatch_size", "3"],
     ["training.local_batch_size = 8 is not a multiple of parallelism.pipeline_parallel_microbatch_size = 3"]),
    ("single-stage schedule with many stages", 2, None, ["--parallelism.pipeline_parallel_degree", "2",
                                                        "--parallelism.pipeline_parallel_layers_per_stage", "2"],
     ["makes 4 stages", "'1F1B' needs 1 per rank"]),
    ("explicit stages out of order", 2, None, ["--parallelism.pipeline_parallel_degree", "2",
                                              "--parallelism.module_fqns_per_model_part",
                                              '[["tok_embeddings", "layers.0", "layers.2"], ["layers.1", "layers.3", '
                                              '"layers.4", "layers.5", "norm", "output"]]'],
     ["module_fqns_per_model_part: 'layers.2' is out of order"]),
    ("nested list not in TOML syntax", 1, None, ["--parallelism.module_fqns_per_model_part", "[[layers.0]]"],
     ["parallelism.module_fqns_per_model_part = '[[layers.0]]': not a valid TOML list"]),
    ("unknown flavor", 1, None, ["--model.flavor", "9B"], ["model.flavor = '9B'", "8B"]),
    ("missing config file", 1, None, ["--job.config_file", "/nonexistent/x.toml"], ["/nonexistent/x.toml", "no such file"]),
    ("invalid TOML", 1, "[training\nsteps = 3\n", [], ["invalid TOML"]),
    ("override without value", 1, None, ["--training.steps"], ["--training.steps needs a value"]),
    ("stray argument", 1, None, ["steps=3"], ["unexpected argument 'steps=3'"]),
    ("bad NGPU", "two", None, [], ["NGPU = 'two'"]),
    ("cp does not split seq_len", 4, None, ["--parallelism.context_parallel_degree", "4", "--training.seq_len", "100"],
     ["training.seq_len = 100", "2 x context_parallel_degree = 8"]),
    ("bad rotate method", 2, None, ["--parallelism.context_parallel_degree", "2",
                                    "--parallelism.context_parallel_rotate_method", "ring"],
     ["context_parallel_rotate_method = 'ring'", "alltoall"]),
    ("unknown dataset", 1, None, ["--preflight", "--training.dataset", "c5"], ["training.dataset = 'c5'", "c4_test"]),
    ("missing dataset path", 1, None, ["--preflight", "--training.dataset", "jsonl", "--training.dataset_path",
                                       "/nope.jsonl"], ["training.dataset_path = '/nope.jsonl' does not exist"]),
    ("missing tokenizer", 1, None, ["--preflight", "--model.hf_assets_path", "/nope"],
     ["model.hf_assets_path = '/nope'", "download_hf_assets.py"]),
    ("validation freq 0", 1, "[validation]\nenable = true\nfreq = 0\n", [], ["validation.freq = 0", ">= 1"]),
    ("validation steps 0", 1, None, ["--validation.steps", "0"], ["validation.steps = 0", "-1 or >= 1"]),
    ("validation seq_len past RoPE table", 1, None, ["--validation.enable", "--training.seq_len", "128",
                                                     "--validation.seq_len", "256"],
     ["validation.seq_len = 256 exceeds training.seq_len = 128", "at most 128"]),
    ("validation seq_len vs cp", 2, None, ["--validation.enable", "--parallelism.context_parallel_degree", "2",
                                           "--training.seq_len", "64", "--validation.seq_len", "30"],
     ["validation.seq_len = 30", "2 x context_parallel_degree = 4"]),
    ("validation of endless synthetic data", 1, None, ["--validation.enable", "--validation.dataset", "synthetic"],
     ["validation.steps = -1", "synthetic dataset is endless"]),
    ("unknown validation dataset", 1, None, ["--preflight", "--validation.enable", "--validation.dataset", "c5"],
     ["validation.dataset = 'c5'", "c4_validation"]),
    ("bad async_mode", 1, None, ["--checkpoint.async_mode", "threads"],
     ["checkpoint.async_mode = 'threads'", "async_with_pinned_mem"]),
    ("bad export dtype", 1, "[checkpoint]\nexport_dtype = \"fp8\"\n", [],
     ["checkpoint.export_dtype = 'fp8'", "bfloat16"]),
    ("checkpoint interval 0", 1, None, ["--checkpoint.interval", "0"], ["checkpoint.interval = 0", ">= 1"]),
    ("unknown part to exclude", 1, None, ["--checkpoint.exclude_from_loading", "dataloader,optim"],
     ["'optim'", "did you mean 'optimizer'"]),
    ("HF export of a full checkpoint", 1, None, ["--checkpoint.last_save_in_hf", "--checkpoint.last_save_model_only",
                                                 "false"], ["last_save_in_hf = true", "last_save_model_only = true"]),
    ("HF import without a path", 1, "[checkpoint]\ninitial_load_in_hf = true\n", [],
     ["initial_load_in_hf = true needs checkpoint.initial_load_path"]),
    ("load_step that does not exist", 1, None, ["--checkpoint.enable", "--checkpoint.load_step", "7",
                                                "--job.dump_folder", "/nonexistent/run"],
     ["checkpoint.load_step = 7", "/nonexistent/run/checkpoint/step-7 is not a complete checkpoint", "none"]),
    ("initial_load_path missing", 1, None, ["--checkpoint.enable", "--checkpoint.initial_load_path", "/nonexistent/c",
                                            "--job.dump_folder", "/nonexistent/run"],
     ["checkpoint.initial_load_path = '/nonexistent/c'", "no .metadata there"]),
    ("HF initial_load_path without config.json", 1, None,
     ["--checkpoint.enable", "--checkpoint.initial_load_in_hf", "--checkpoint.initial_load_path", "/nonexistent/hf",
      "--job.dump_folder", "/nonexistent/run"], ["no config.json there", "HF model folder"]),
    ("unknown converter", 1, None, ["--model.converters", "int8"],
     ["model.converters = ['int8']", "'int8' is not a converter", "quantize.linear.float8, quantize.linear.mx"]),
    ("float8 on CPU without emulate", 1, None, ["--device", "cpu", "--model.converters", "float8"],
     ["model.converters = ['float8']", "compute capability 8.9+", "on cpu", "quantize.linear.float8.emulate = true"]),
    ("MX on CPU", 1, None, ["--device", "cpu", "--model.converters", "quantize.linear.mx"],
     ["MX training needs an NVIDIA GPU of compute capability 10.x (e.g. B200)", "on cpu"]),
    ("float8 recipe with float8 all-gather", 1, "[quantize.linear.float8]\nrecipe_name = \"rowwise\"\n"
     "enable_fsdp_float8_all_gather = true\n", ["--model.converters", "float8"],
     ["recipe_name = 'rowwise' with enable_fsdp_float8_all_gather = true", "unset one of them"]),
    ("unknown float8 recipe", 1, None, ["--model.converters", "float8", "--quantize.linear.float8.recipe_name", "row"],
     ["quantize.linear.float8.recipe_name = 'row'", "tensorwise, rowwise, rowwise_with_gw_hp"]),
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


def _args(args, tmp_path, toml):
    if toml is not None:
        path = tmp_path / "bad.toml"
        path.write_text(toml)
        args = ["--job.config_file", str(path), *args]
    return args


def _run(ngpu, args, tmp_path, toml):
    env = {**os.environ, "NGPU": str(ngpu), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "trainer.dry_run", *_args(args, tmp_path, toml)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def _run_in_process(ngpu, args, tmp_path, toml, monkeypatch, capsys) -> tuple[int, str, str]:
    from trainer.dry_run import main

    monkeypatch.setenv("NGPU", str(ngpu))
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(_args(args, tmp_path, toml))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def _dry_run(ngpu, args, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """trainer.dry_run.main in this process, as `DRY_RUN=1 NGPU=ngpu ./run_train.sh args` runs it."""
    from trainer.dry_run import main

    monkeypatch.setenv("NGPU", str(ngpu))
    monkeypatch.chdir(ROOT)
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def _assert_one_line(code, out, err, expected):
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"


@pytest.mark.parametrize("name,ngpu,toml,args,expected", CASES, ids=[c[0] for c in CASES])
def test_one_line_error(name, ngpu, toml, args, expected, tmp_path, monkeypatch, capsys):
    _assert_one_line(*_run_in_process(ngpu, args, tmp_path, toml, monkeypatch, capsys), expected)


# A fresh interpreter costs seconds: `-m "not slow"` keeps one (test_one_line_error checks every case's line).
@pytest.mark.parametrize("case", [CASES[0], pytest.param(CASES[9], marks=pytest.mark.slow),
                                  pytest.param(CASES[-1], marks=pytest.mark.slow)],
                         ids=lambda c: c[0])
def test_one_line_error_in_a_fresh_process(case, tmp_path):
    name, ngpu, toml, args, expected = case
    proc = _run(ngpu, args, tmp_path, toml)
    _assert_one_line(proc.returncode, proc.stdout, proc.stderr, expected)


# (NGPU, run_train.sh arguments, substring of the one line): a wrong key, an impossible layout, a missing file. Every
# kind of mistake takes the same way out of the ranks (rank 0 prints the ConfigError); a bad value, whose line
# test_one_line_error checks, is left out (a torchrun launch is seconds on 2 cores).
LAUNCHER_CASES = [
    (1, ["--training.stepz", "3"], "did you mean 'steps'"),
    (2, ["--parallelism.data_parallel_shard_degree", "3"], "dp_shard 3"),
    pytest.param(4, ["--model.hf_assets_path", "/nope"], "model.hf_assets_path = '/nope'", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("ngpu,args,expected", LAUNCHER_CASES, ids=lambda v: str(v) if isinstance(v, int) else None)
def test_launcher_config_error_is_one_line(ngpu, args, expected, tmp_path):
    # The ranks check the config themselves (no check in a process of its own before them): rank 0 prints one line,
    # and neither torchrun's failure report nor a traceback follows; run_train.sh exits 2 at any NGPU.
    env = {**os.environ, "NGPU": str(ngpu), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([str(ROOT / "run_train.sh"), "--job.dump_folder", str(tmp_path / "out"), *args], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and expected in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and not proc.stdout, proc.stdout + proc.stderr


def test_launcher_reports_other_failures_as_torchrun_does():
    # trainer/launch.py silences torchrun's report only when rank 0 exited 2 (it printed the line) and every other
    # failed rank exited 2 too or was stopped by the agent.
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from trainer.launch import is_config_error

    def failed(*codes: int) -> ChildFailedError:
        return ChildFailedError("trainer.train", {rank: ProcessFailure(rank, 100 + rank, code, "<N/A>")
                                                  for rank, code in enumerate(codes) if code is not None})

    assert is_config_error(failed(2, 2)) and is_config_error(failed(2, -15)) and is_config_error(failed(2, None))
    assert not is_config_error(failed(1, 2))  # a bug on rank 0
    assert not is_config_error(failed(2, 1))  # a bug on rank 1 beside the config error
    assert not is_config_error(failed(None, 2))  # rank 1 alone: rank 0 printed nothing
    assert not is_config_error(failed(-9, 2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
# run_train.sh is slow-marked: the fast subset has the launcher's one-line error in test_launcher_config_error_is_one_line
@pytest.mark.parametrize("entry", [pytest.param("run_train.sh", marks=pytest.mark.slow), "trainer.train"])
def test_async_tensor_parallel_refused_on_cpu(entry, tmp_path):
    # A device check: run_train.sh makes it before torchrun, the Trainer itself when started another way.
    args = ["--parallelism.tensor_parallel_degree", "2", "--parallelism.enable_async_tensor_parallel"]
    env = {**os.environ, "NGPU": "2", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    cmd = ([str(ROOT / "run_train.sh"), *args] if entry == "run_train.sh" else
           [sys.executable, "-m", "trainer.train", "--job.config_file", str(ROOT / "configs/debug_model.toml"), *args])
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "enable_async_tensor_parallel = true needs CUDA" in lines[0] and "on cpu" in lines[0]


def test_dry_run_plans_for_cuda_unless_told_cpu(monkeypatch, capsys):
    # DRY_RUN checks a config for NGPU ranks of a CUDA machine by default, so a CUDA-only feature is not refused on
    # a laptop; --device cpu checks it for CPU ranks, where it is.
    args = ["--parallelism.tensor_parallel_degree", "2", "--parallelism.enable_async_tensor_parallel",
            "--compile.enable"]
    proc = _dry_run(2, args, monkeypatch, capsys)
    assert proc.returncode == 0 and "dry run OK" in proc.stdout, proc.stderr
    proc = _dry_run(2, [*args, "--device", "cpu"], monkeypatch, capsys)
    _assert_one_line(proc.returncode, proc.stdout, proc.stderr, [])
    assert "on cpu" in proc.stderr.lower(), proc.stderr


def test_valid_configs_pass_dry_run(monkeypatch, capsys):
    # Each shipped config is valid, as written, for the NGPU it is written for.
    for config, ngpu in (("configs/debug_model.toml", 1), ("configs/llama3_8b.toml", 8),
                         ("configs/smollm_1.7b.toml", 8), ("configs/smollm_1.7b_3d.toml", 8),
                         ("configs/cpu_3d.toml", 8)):
        proc = _dry_run(ngpu, ["--job.config_file", config], monkeypatch, capsys)
        assert proc.returncode == 0 and "dry run OK" in proc.stdout, (config, proc.stderr)


def test_dry_run_memory_uses_the_dtype_of_the_planned_device(monkeypatch, capsys):
    # mixed_precision_param = auto is bf16 on CUDA and fp32 on CPU: the activation estimate follows, and says so.
    args = ["--job.config_file", "configs/llama3_8b.toml", "--training.mixed_precision_param", "auto"]
    reports = {device: _dry_run(8, [*args, "--device", device], monkeypatch, capsys) for device in ("cuda", "cpu")}
    for device, dtype in (("cuda", "bfloat16"), ("cpu", "float32")):
        proc = reports[device]
        assert proc.returncode == 0, proc.stderr
        assert f"device: {device}; compute dtype {dtype} (mixed_precision_param = auto on {device}" in proc.stdout
    act = {device: float(re.search(r"activations ([\d.]+) GiB", p.stdout).group(1)) for device, p in reports.items()}
    assert act["cpu"] > 1.5 * act["cuda"], act  # fp32 activations, logits aside, are twice bf16's


def test_gpu_only_features_pass_dry_run_on_cpu(tmp_path):
    # The dry-run host is not the training host: CUDA memory snapshots and compile are checked where they run.
    proc = _run(8, ["--job.config_file", "configs/llama3_8b.toml", "--profiling.enable_memory_snapshot",
                    "--profiling.enable_profiling", "--compile.enable", "--activation_checkpoint.mode", "full"],
                tmp_path, None)
    assert proc.returncode == 0 and "dry run OK" in proc.stdout, proc.stderr
    assert "warning" not in proc.stdout + proc.stderr


FLOAT8_TOML = """[model]
converters = ["float8"]

[quantize.linear.float8]
enable_fsdp_float8_all_gather = true
precompute_float8_dynamic_scale_for_fsdp = true
filter_fqns = ["output"]
"""


@pytest.mark.parametrize("extra", [[], ["--parallelism.tensor_parallel_degree", "2"]], ids=["fsdp", "fsdp x tp"])
def test_float8_config_passes_dry_run_for_cuda(extra, tmp_path, monkeypatch, capsys):
    # torchtitan's llama3_405b.toml float8 settings (under the older name "float8"), planned for 8 GPUs: the model is
    # converted and sharded on the meta device, with torchao's float8 tensor-parallel styles under tp.
    pytest.importorskip("torchao.float8")
    proc = _dry_run(8, [*_args([], tmp_path, FLOAT8_TOML), *extra], monkeypatch, capsys)
    assert proc.returncode == 0 and "dry run OK" in proc.stdout, proc.stderr
    assert "converters = ['float8']" in proc.stdout and "enable_fsdp_float8_all_gather = True" in proc.stdout


def test_mx_passes_dry_run_for_cuda(monkeypatch, capsys):
    # The hardware it needs is checked where the run starts; DRY_RUN plans for CUDA anywhere.
    proc = _dry_run(8, ["--model.converters", "quantize.linear.mx"], monkeypatch, capsys)
    assert proc.returncode == 0 and "dry run OK" in proc.stdout, proc.stderr
