"""torchtitan's run options, each against what it must do: job.save_config_file, lr_scheduler.total_steps,
checkpoint.load_only and create_seed_checkpoint, debug.deterministic_warn_only, training.gc_debug."""

import dataclasses
import gc
import json
import sys
from pathlib import Path

import pytest
import torch

from trainer.build import plan_run
from trainer.checkpoint_files import MARKER
from trainer.config import ConfigError, load_config
from trainer.optim import lr_factor
from trainer.train import LoopObserver, Trainer

ROOT = Path(__file__).resolve().parents[2]


def args(dump: Path, *overrides: str) -> list[str]:
    """The debug model on synthetic data, small and fp32."""
    return ["--job.config_file", str(ROOT / "configs/debug_model.toml"), "--job.dump_folder", str(dump),
            "--training.dataset", "synthetic", "--training.seq_len", "32", "--training.local_batch_size", "2",
            "--training.mixed_precision_param", "float32", "--metrics.enable_tensorboard", "false",
            "--metrics.log_freq", "1", *overrides]


class Losses(LoopObserver):
    def __init__(self):
        self.losses = {}

    def after_step(self, trainer, step, loss):
        self.losses[step] = loss


def train(*argv: str) -> tuple[Trainer, dict[int, float]]:
    recorder = Losses()
    trainer = Trainer(load_config(list(argv)), observers=(recorder,))
    try:
        trainer.train()
    finally:
        trainer.close()
        gc.enable()
    return trainer, recorder.losses


@pytest.mark.parametrize("name", ["run.toml", "run.json"])
def test_saved_config_is_the_resolved_config(name, tmp_path):
    argv = args(tmp_path, "--training.steps", "0", "--job.save_config_file", name, "--optimizer.lr", "3e-4",
                "--parallelism.context_parallel_load_balance", "false")
    train(*argv)
    saved = tmp_path / name
    if name.endswith(".json"):  # torchtitan's format: the config as nested JSON objects
        assert json.loads(saved.read_text())["optimizer"]["lr"] == 3e-4
        return
    again = load_config(["--job.config_file", str(saved)])  # TOML: a config file again, giving the same config
    expected = load_config(argv)
    expected.job.config_file = again.job.config_file
    assert dataclasses.asdict(again) == dataclasses.asdict(expected)


@pytest.mark.slow  # the fast subset's time (5 min); runs in CI's full suite
def test_total_steps_lays_the_schedule_over_more_steps(tmp_path):
    trainer, _ = train(*args(tmp_path, "--training.steps", "3", "--lr_scheduler.total_steps", "10",
                             "--lr_scheduler.warmup_steps", "2"))
    cfg = trainer.cfg
    expected = cfg.optimizer.lr * lr_factor(3, cfg.lr_scheduler, 10)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(expected)
    assert expected != pytest.approx(cfg.optimizer.lr * lr_factor(3, cfg.lr_scheduler, 3))  # the option mattered


def test_load_only_never_saves(tmp_path):
    train(*args(tmp_path, "--training.steps", "2", "--checkpoint.enable", "--checkpoint.interval", "1",
                "--checkpoint.load_only"))
    assert not (tmp_path / "checkpoint").exists()


def test_seed_checkpoint_is_step_0_and_runs_start_from_it(tmp_path):
    trainer, losses = train(*args(tmp_path / "seed", "--training.steps", "5", "--checkpoint.enable",
                                  "--checkpoint.create_seed_checkpoint"))
    assert trainer.step == 0 and losses == {}  # saved, not trained
    seed = tmp_path / "seed/checkpoint/step-0"
    assert (seed / MARKER).is_file()
    # A run started from the seed trains exactly as a run that initializes its own weights.
    _, fresh = train(*args(tmp_path / "fresh", "--training.steps", "3"))
    _, from_seed = train(*args(tmp_path / "from_seed", "--training.steps", "3", "--checkpoint.enable",
                               "--checkpoint.initial_load_path", str(seed)))
    assert from_seed == fresh


def test_seed_checkpoint_needs_one_rank_and_checkpointing(tmp_path):
    cfg = load_config(args(tmp_path, "--checkpoint.enable", "--checkpoint.create_seed_checkpoint"))
    with pytest.raises(ConfigError, match="needs one rank"):
        plan_run(cfg, 2, "cpu")
    cfg.checkpoint.enable = False
    with pytest.raises(ConfigError, match="checkpoint.enable = true"):
        plan_run(cfg, 1, "cpu")


def test_deterministic_warn_only(tmp_path):
    try:
        train(*args(tmp_path, "--training.steps", "1", "--debug.deterministic", "--debug.deterministic_warn_only"))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.slow  # the fast subset's time (5 min); runs in CI's full suite
def test_gc_debug_collects_every_step(tmp_path, monkeypatch):
    calls = []
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(a) or collect(*a))
    _, debug = train(*args(tmp_path / "debug", "--training.steps", "3", "--training.gc_debug"))
    assert calls.count(()) >= 3  # a full collection after every step
    _, plain = train(*args(tmp_path / "plain", "--training.steps", "3"))
    assert debug == plain  # collecting changes no number


def test_fake_backend_mode_checks_the_layout_as_dry_run_does(tmp_path, monkeypatch, capsys):
    from trainer.train import run

    monkeypatch.setenv("NGPU", "8")
    code = run(["--job.config_file", str(ROOT / "configs/llama3_8b.toml"), "--comm.mode", "fake_backend"])
    out = capsys.readouterr().out
    assert code == 0 and "mesh: 8 ranks" in out and "dry run OK" in out


def test_custom_modules_add_a_flavor_and_a_section(tmp_path):
    # experimental.custom_import registers a flavor on import; job.custom_config_module's JobConfig adds [extra].
    module = "tests.assets.custom.extension"
    toml = tmp_path / "run.toml"
    toml.write_text(f'[job]\ncustom_config_module = "{module}"\n[experimental]\ncustom_import = "{module}"\n'
                    f'[extra]\ntemperature = 0.5\n')
    overrides = args(tmp_path, "--training.steps", "1", "--model.flavor", "tiny_test", "--extra.enabled")
    overrides[1] = str(toml)  # --job.config_file: the file above instead of the debug config
    trainer, losses = train(*overrides)
    assert (trainer.cfg.extra.temperature, trainer.cfg.extra.enabled) == (0.5, True)
    assert trainer.plan.model_args.n_layers == 2 and sorted(losses) == [1]
    with pytest.raises(ConfigError, match="unknown config section \\[extra\\]"):
        load_config(["--extra.enabled"])  # without the module the section does not exist
    with pytest.raises(ConfigError, match="job.custom_config_module = 'no.such.module' cannot be imported"):
        load_config(["--job.custom_config_module", "no.such.module"])


def test_wandb_gets_every_scalar_tensorboard_gets(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import subprocess

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name, value in {"WANDB_MODE": "offline", "WANDB_PROJECT": "trainer-test", "WANDB_RUN_NAME": "offline-check",
                        "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)
    # A fixed peak: a CPU peak measured while the machine is loaded can fall below the step's FLOP/s, and then MFU
    # (one of the scalars counted below) is not reported.
    train(*args(tmp_path, "--training.steps", "3", "--metrics.enable_wandb", "--metrics.enable_tensorboard",
                "--metrics.peak_flops", "1e15"))
    (run,) = list((tmp_path / "tb").iterdir())
    tb = EventAccumulator(str(run))
    tb.Reload()
    tensorboard = {(tag, e.step): e.value for tag in tb.Tags()["scalars"] for e in tb.Scalars(tag)}
    # The offline run's transaction log, read back with wandb's own reader.
    records = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(tmp_path / "wandb")],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    history = [json.loads(line)["history"] for line in records.splitlines() if '"type":"history"' in line]
    logged = {(tag, h["step"]["num"]): value for h in history for tag, value in h["item"].items()
              if not tag.startswith("_")}
    assert logged.keys() == tensorboard.keys() and len(logged) == 3 * 10
    for key, value in tensorboard.items():  # TensorBoard keeps float32
        assert logged[key] == pytest.approx(value, rel=1e-6), key
    header = [json.loads(line)["run"] for line in records.splitlines() if '"type":"run"' in line][0]
    assert (header["project"], header["display_name"]) == ("trainer-test", "offline-check")
