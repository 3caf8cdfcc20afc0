"""torchtitan's run options, each against what it must do: job.save_config_file, lr_scheduler.total_steps,
checkpoint.load_only and create_seed_checkpoint, debug.deterministic_warn_only, training.gc_debug."""

import dataclasses
import gc
import json
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
