"""The [validation] section's defaults, the TensorBoard tags, and the Validator in one process: every pass starts at
the beginning of the split, and a pass changes nothing of the training state. (Correctness of the loss against a
hand evaluation, and multi-rank runs, are in tests/distributed/test_validation.py.)"""

from pathlib import Path

import pytest
import torch

from trainer.config import ConfigError, JobConfig, load_config
from trainer.data.datasets import C4_TEST_PATH
from trainer.metrics import MetricsLogger
from trainer.train import Trainer
from trainer.validate import check_validation_data, validation_data

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_come_from_training():
    cfg = load_config(["--training.seq_len", "64", "--training.local_batch_size", "3"])
    assert validation_data(cfg) == validation_data(cfg).__class__("c4_test", None, 64, 3)
    # A local training dataset lends its path; a named validation dataset has its own location.
    folder = str(C4_TEST_PATH)
    cfg = load_config(["--training.dataset", "jsonl", "--training.dataset_path", folder, "--validation.seq_len", "32",
                       "--validation.local_batch_size", "2"])
    assert validation_data(cfg) == validation_data(cfg).__class__("jsonl", folder, 32, 2)
    cfg = load_config(["--training.dataset", "jsonl", "--training.dataset_path", folder,
                       "--validation.dataset", "c4_validation"])
    assert (validation_data(cfg).dataset, validation_data(cfg).dataset_path) == ("c4", None)


def test_a_training_file_has_no_validation_split():
    cfg = load_config(["--training.dataset", "jsonl", "--training.dataset_path", str(C4_TEST_PATH / "train.jsonl"),
                       "--validation.enable"])
    with pytest.raises(ConfigError, match="is a single file, which has no validation split"):
        check_validation_data(cfg)
    cfg.validation.dataset_path = str(C4_TEST_PATH / "validation.jsonl")
    check_validation_data(cfg)


def test_tensorboard_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = JobConfig()
    cfg.job.dump_folder, cfg.metrics.enable_tensorboard = str(tmp_path), True
    logger = MetricsLogger(cfg, torch.device("cpu"), 1, 1e12, enabled=True, tokens_divisor=1)
    logger.log_validation(5, 2.0, 7.389, 640, 10, 0.1)
    logger.close()
    (events,) = list(tmp_path.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    for tag, value in (("validation_metrics/loss", 2.0), ("validation_metrics/perplexity", 7.389)):
        (event,) = acc.Scalars(tag)
        assert event.step == 5 and event.value == pytest.approx(value)


def test_passes_restart_and_leave_training_alone(tmp_path):
    val_file = tmp_path / "validation.jsonl"
    val_file.write_text((C4_TEST_PATH / "validation.jsonl").read_text(encoding="utf-8").splitlines()[0] + "\n")
    cfg = load_config(["--job.config_file", str(ROOT / "configs/debug_model.toml"), "--job.dump_folder", str(tmp_path),
                       "--training.seq_len", "64", "--training.local_batch_size", "2",
                       "--training.mixed_precision_param", "float32", "--metrics.enable_tensorboard", "false",
                       "--metrics.peak_flops", "1e12", "--validation.enable", "--validation.dataset", "jsonl",
                       "--validation.dataset_path", str(val_file), "--validation.seq_len", "32",
                       "--validation.local_batch_size", "2"])
    trainer = Trainer(cfg)
    parts, validator = trainer.model, trainer.validator
    model = parts.model
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    loader_state, rng = trainer.dataloader.state_dict(), torch.get_rng_state()

    whole = validator.validate(parts, 1)
    assert (whole.batches, whole.tokens) == (5, 5 * 2 * 32)  # 11 windows of 32 tokens, batches of 2
    validator.steps = 2
    cut = validator.validate(parts, 2)
    assert (cut.batches, cut.tokens) == (2, 2 * 2 * 32)
    validator.steps = -1
    again = validator.validate(parts, 3)  # a pass cut short does not shift the next one
    assert (again.loss, again.tokens) == (whole.loss, whole.tokens)
    assert whole.perplexity == pytest.approx(torch.tensor(whole.loss).exp().item())

    assert model.training and torch.equal(rng, torch.get_rng_state())
    assert trainer.dataloader.state_dict() == loader_state
    for name, p in model.named_parameters():
        assert p.grad is None and torch.equal(p.detach(), params[name]), name
    trainer.close()


def test_pipeline_parallel_validation_batch_splits_into_the_microbatches():
    from trainer.parallel_dims import ParallelDims
    from trainer.validate import check_validation_layout

    def check(val_batch: int) -> None:
        cfg = load_config(["--parallelism.pipeline_parallel_degree", "2", "--parallelism.data_parallel_shard_degree",
                           "1", "--training.local_batch_size", "4", "--validation.enable",
                           "--validation.local_batch_size", str(val_batch)])
        check_validation_layout(cfg, ParallelDims.resolve(cfg.parallelism, 2))

    check(4)
    check(8)
    with pytest.raises(ConfigError) as e:
        check(6)
    assert str(e.value) == ("validation.local_batch_size = 6 with pipeline parallel: the schedule cuts a batch into "
                            "4 microbatches (training.local_batch_size 4 / pipeline_parallel_microbatch_size 1); "
                            "use a multiple of 4")
