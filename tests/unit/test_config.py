"""Config precedence, nested sections, help text, the parallel-degree resolver and the LR schedule, against
hand-computed values."""

import math

import pytest

from trainer.config import ConfigError, help_text, load_config
from trainer.config.job_config import LRScheduler
from trainer.optim import lr_factor
from trainer.parallel_dims import ParallelDims


def test_precedence_cli_over_toml_over_defaults(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[training]\nsteps = 7\nseq_len = 32\n[optimizer]\nlr = 0.5\n")
    cfg = load_config(["--job.config_file", str(path), "--training.steps=9", "--optimizer.lr", "0.25"])
    assert (cfg.training.steps, cfg.training.seq_len, cfg.optimizer.lr) == (9, 32, 0.25)
    assert cfg.training.local_batch_size == 8  # default
    assert load_config(["--metrics.enable_tensorboard"]).metrics.enable_tensorboard is True
    assert load_config(["--lr_scheduler.decay_ratio", "none"]).lr_scheduler.decay_ratio is None


def test_help_documents_every_field():
    text = help_text()
    assert "--training.global_batch_size (int, default -1)" in text
    assert "gradient accumulation" in text  # the docstring itself, not only the name
    blank = [line for line in text.splitlines() if line.startswith("      ") and not line.strip()]
    assert not blank, "a field without a docstring"


@pytest.mark.parametrize("world", range(1, 17))
def test_resolver_fills_dp_shard(world):
    cfg = load_config([])
    dims = ParallelDims.resolve(cfg.parallelism, world)
    assert (dims.dp_shard, dims.dp, dims.fsdp_enabled) == (world, world, world > 1)
    if world % 2 == 0:
        cfg = load_config(["--parallelism.data_parallel_replicate_degree", "2"])
        dims = ParallelDims.resolve(cfg.parallelism, world)
        assert (dims.dp_replicate, dims.dp_shard) == (2, world // 2)
    else:
        with pytest.raises(ConfigError, match="does not divide the world size"):
            ParallelDims.resolve(load_config(["--parallelism.data_parallel_replicate_degree", "2"]).parallelism, world)


def test_resolver_rejects_wrong_product():
    cfg = load_config(["--parallelism.data_parallel_shard_degree", "4"])
    with pytest.raises(ConfigError, match=r"= 4, but the world size \(NGPU\) is 8 \(too few by a factor of 2\)"):
        ParallelDims.resolve(cfg.parallelism, 8)


def test_context_parallel_replicating_parameters_runs_on_ddp():
    def dims(world, *args):
        return ParallelDims.resolve(load_config(["--parallelism.context_parallel_replicate_parameters", "true",
                                                 *args]).parallelism, world)

    cp = ["--parallelism.context_parallel_degree", "2"]
    d = dims(2, *cp)  # dp_shard -1 resolves to 1: DDP over the cp ranks
    assert (d.dp_shard, d.ddp_enabled, d.fsdp_enabled) == (1, True, False)
    d = dims(4, *cp, "--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree",
             "1")
    assert (d.ddp_enabled, d.fsdp_enabled) == (True, False)
    assert dims(1).ddp_enabled is False  # no cp: nothing to replicate over
    default = ParallelDims.resolve(load_config(cp).parallelism, 2)
    assert (default.ddp_enabled, default.fsdp_enabled) == (False, True)  # torchtitan's: FSDP2 over cp
    for extra in (["--parallelism.data_parallel_shard_degree", "2"], ["--parallelism.tensor_parallel_degree", "2"],
                  ["--parallelism.pipeline_parallel_degree", "2"]):
        with pytest.raises(ConfigError, match=r"^parallelism.context_parallel_replicate_parameters = true .* but the "
                                              r"layout has dp_shard \d x tp \d x pp \d; set it to false"):
            dims(4, *cp, *extra)


def test_lr_schedule_by_hand():
    cfg = LRScheduler(warmup_steps=4, decay_ratio=0.5, decay_type="linear", min_lr_factor=0.1)
    # 20 steps: warmup 0..3, stable 4..11, decay over the last 8 (steps 12..19)
    assert [lr_factor(s, cfg, 20) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert all(lr_factor(s, cfg, 20) == 1.0 for s in range(4, 12))
    assert lr_factor(16, cfg, 20) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(20, cfg, 20) == pytest.approx(0.1)
    cos = LRScheduler(warmup_steps=0, decay_type="cosine")
    assert lr_factor(5, cos, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    sqrt = LRScheduler(warmup_steps=0, decay_type="sqrt")
    assert lr_factor(4, sqrt, 16) == pytest.approx(1 - math.sqrt(0.25))


def test_nested_tables_and_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[training]\nsteps = 7\n[training.dataloader]\nnum_workers = 0\n"
                    "[quantize.linear.float8]\nfilter_fqns = [\"output\"]\nemulate = true\n")
    cfg = load_config(["--job.config_file", str(path), "--quantize.linear.float8.filter_fqns=output,layers.0",
                       "--quantize.linear.float8.emulate", "false", "--quantize.linear.mx.recipe_name", "x"])
    assert cfg.training.steps == 7 and cfg.training.dataloader.num_workers == 0
    assert cfg.quantize.linear.float8.filter_fqns == ["output", "layers.0"]  # CLI over TOML, one level deeper
    assert cfg.quantize.linear.float8.emulate is False and cfg.quantize.linear.mx.recipe_name == "x"
    # a bare nested switch sets it
    assert load_config(["--validation.dataloader.pin_memory"]).validation.dataloader.pin_memory is True
    text = help_text()
    assert "[training.dataloader]" in text and "--training.dataloader.num_workers (int, default 0)" in text


def test_torchtitan_cli_spellings():
    assert load_config(["--checkpoint.no_initial_load_model_only"]).checkpoint.initial_load_model_only is False
    assert load_config(["--checkpoint.no-initial-load-model-only"]).checkpoint.initial_load_model_only is False
    assert load_config(["--job.print-config"]).job.print_config is True


@pytest.mark.parametrize("toml,args,expected", [
    (None, ["--training.dataloader.num_workerz", "0"],
     "unknown config key training.dataloader.num_workerz; did you mean 'num_workers'?"),
    (None, ["--training.dataloadr.num_workers=0"], "unknown config section [training.dataloadr]; did you mean "
                                                   "'dataloader'?"),
    ("[quantize.linear.float9]\nemulate = false\n", [], "unknown config section [quantize.linear.float9]; did you "
                                                        "mean 'float8'?"),
    ("[quantize.linear.float8]\nemulat = false\n", [], "unknown config key quantize.linear.float8.emulat; did you "
                                                       "mean 'emulate'?"),
    ("[fooo.bar]\n", [], "unknown config section [fooo]; valid: "),
    ("[training]\ndataloader = 2\n", [], "training.dataloader is a section, not a key: set its keys, e.g. "
                                         "training.dataloader.num_workers"),
    (None, ["--training.steps.x", "1"], "training.steps is a key, not a section"),
    (None, ["--quantize.linear.float8"], "quantize.linear.float8 is a section, not a key"),
    (None, ["--training.dataloader.prefetch_factor"], "--training.dataloader.prefetch_factor needs a value"),
])
def test_nested_mistakes_are_one_line(toml, args, expected, tmp_path):
    if toml is not None:
        (tmp_path / "c.toml").write_text(toml)
        args = ["--job.config_file", str(tmp_path / "c.toml"), *args]
    with pytest.raises(ConfigError) as e:
        load_config(args)
    assert "\n" not in str(e.value) and str(e.value).startswith(expected), str(e.value)
